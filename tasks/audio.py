"""Audio stage: fetch a row's narration, decode it with PyAV, and find pause-aware chunk cuts.

Sits between manifest validation and planning: probe_audio() gives the exact duration and a 16-bit
WAV master copy; find_cut_points() picks where long narration is split; write_chunk_wav() cuts it.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import av
import fsspec
import numpy as np

from avatarflow.tasks.media import open_media
from avatarflow.tasks.records import V1_GRID, AudioInfo, FrameGrid
from avatarflow.tasks.redact import public_url, redact, url_secrets
from avatarflow.tasks.storage import temp_path, write_local, writing

with warnings.catch_warnings():
    # pydub warns at import when no ffmpeg is on PATH; it only ever handles WAV/PCM here.
    warnings.simplefilter("ignore", RuntimeWarning)
    # ... and imports audioop, which Python 3.11+ deprecates (pydub's problem, not a caller's).
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    from pydub import AudioSegment

MIN_DURATION_S = 0.5  # shorter than this is not narration (and below one model frame window)
SILENCE_PEAK_DBFS = -60.0  # a file whose peak never rises above this carries no signal
FRAME_S = 0.010  # analysis frame for pause detection
PAUSE_BELOW_DB = 16.0  # a frame is "quiet" this far below the file's own RMS loudness
_MAGIC = (b"RIFF", b"ID3", b"fLaC", b"OggS", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2", b"\xff\xf1")
_AUDIO_EXTENSIONS = {".wav", ".mp3", ".m4a", ".aac", ".mp4", ".flac", ".ogg", ".opus", ".oga"}


class AudioError(Exception):
    """A row's narration cannot be used; `kind` says why in one machine-readable word."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        # missing, not_a_file, empty, fetch_failed, not_audio, corrupt, too_short, silent
        self.kind = kind
        self.reason = reason


def probe_audio(
    url: str, audio_dir: Path, storage_options: dict[str, Any] | None = None
) -> AudioInfo:
    """Fetch `url` into audio_dir (content-addressed), decode it and return its AudioInfo."""
    local, sha = fetch_file(url, audio_dir, storage_options or {})
    cached, pcm_path = audio_dir / f"{sha}.json", audio_dir / f"{sha}.pcm.wav"
    if cached.exists() and pcm_path.exists():
        return AudioInfo(**{**json.loads(cached.read_text()), "source": url})
    shown = public_url(url)
    samples, rate, codec = _decode(local, shown)
    duration_s = samples.shape[0] / rate
    if duration_s < MIN_DURATION_S:
        raise AudioError(
            "too_short", f"{shown}: {duration_s:.3f} s of audio, need ≥ {MIN_DURATION_S}"
        )
    peak = max(int(samples.max()), -int(samples.min()))
    if peak == 0 or 20 * math.log10(peak / 32768) < SILENCE_PEAK_DBFS:
        raise AudioError("silent", f"{shown}: no signal above {SILENCE_PEAK_DBFS:.0f} dBFS")
    _write_wav(samples, rate, pcm_path)
    info = AudioInfo(url, sha, duration_s, rate, samples.shape[1], codec, str(pcm_path), str(local))
    write_local(cached, json.dumps(asdict(info)).encode())
    return info


def fetch_file(
    url: str, dest_dir: Path, storage_options: dict[str, Any] | None = None
) -> tuple[Path, str]:
    """Copy `url` into dest_dir as <sha256><ext>, hashing while streaming; return (path, sha)."""
    audio_dir, storage_options = Path(dest_dir), storage_options or {}
    audio_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(audio_dir / "fetch")
    digest, shown = hashlib.sha256(), public_url(url)
    try:
        with fsspec.open(url, "rb", **storage_options) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    except FileNotFoundError as exc:
        tmp.unlink(missing_ok=True)
        # fsspec's HTTP backend reports every failed request so: a 503 is not a missing file
        status = getattr(exc.__cause__, "status", None)
        if status not in (None, 404, 410):
            raise AudioError("fetch_failed", f"{shown}: HTTP {status}") from exc
        raise AudioError("missing", f"{shown}: not found") from exc
    except IsADirectoryError as exc:
        tmp.unlink(missing_ok=True)
        raise AudioError("not_a_file", f"{shown}: is a directory, not a file") from exc
    except Exception as exc:  # any backend's error (HTTP 5xx, auth, network) fails this row only
        tmp.unlink(missing_ok=True)
        raise AudioError(
            "fetch_failed", f"{shown}: cannot be read ({_describe(exc, url)})"
        ) from exc
    if tmp.stat().st_size == 0:
        tmp.unlink()
        raise AudioError("empty", f"{shown}: file is empty (0 bytes)")
    suffix = Path(url.split("?", 1)[0]).suffix.lower()[:8]
    local = audio_dir / f"{digest.hexdigest()}{suffix}"
    tmp.replace(local)
    return local, digest.hexdigest()


def _describe(exc: BaseException, url: str) -> str:
    """The error's type and text, with the URL's credentials (user, signed query) masked."""
    text = redact(str(exc).replace(url, public_url(url)), url_secrets(url))
    return f"{type(exc).__name__}: {text}"[:300]


def _decode(path: Path, name: str) -> tuple[np.ndarray, int, str]:
    """Decode the first audio stream to int16 (samples, channels) at its own rate with PyAV."""
    try:
        container = open_media(path)
    except av.FFmpegError as exc:
        head = path.read_bytes()[:12]
        looks_audio = path.suffix in _AUDIO_EXTENSIONS or head.startswith(_MAGIC) or b"ftyp" in head
        kind = "corrupt" if looks_audio else "not_audio"
        raise AudioError(kind, f"{name}: not a readable media file ({exc.strerror})") from exc
    with container:
        if not container.streams.audio:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise AudioError("not_audio", f"{name}: no audio stream (streams: {kinds})")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        channels = 1 if stream.codec_context.channels == 1 else 2
        # keep the source rate; only the sample format changes (and >2 channels fold to stereo)
        resampler = av.AudioResampler("s16", "mono" if channels == 1 else "stereo", rate)
        try:
            frames = [f for frame in container.decode(stream) for f in resampler.resample(frame)]
            frames += resampler.resample(None)
        except av.FFmpegError as exc:
            raise AudioError("corrupt", f"{name}: decoding failed ({exc.strerror})") from exc
        if not frames:
            raise AudioError("corrupt", f"{name}: no audio could be decoded")
        samples = np.concatenate([f.to_ndarray().reshape(-1, channels) for f in frames])
        return _trim_to_container(samples, stream, rate), rate, stream.codec_context.name


def _trim_to_container(samples: np.ndarray, stream: Any, rate: int) -> np.ndarray:
    """Drop encoder tail padding: trust the container's duration when it is within one frame."""
    if not stream.duration or not stream.time_base:
        return samples
    declared = round(float(stream.duration * stream.time_base) * rate)
    frame_size = stream.codec_context.frame_size or 0
    if 0 < samples.shape[0] - declared <= frame_size:
        return samples[:declared]
    return samples


def _write_wav(samples: np.ndarray, rate: int, dest: Path) -> None:
    """Write int16 (n, channels) samples as a WAV via pydub, atomically."""
    segment = AudioSegment(
        samples.tobytes(), sample_width=2, frame_rate=rate, channels=samples.shape[1]
    )
    with writing(dest) as tmp:  # unique per writer: threads of one worker may write the same file
        segment.export(str(tmp), format="wav").close()


def _read_wav(path: str | Path) -> AudioSegment:
    with open(path, "rb") as fh:  # pydub leaves a file it opened itself unclosed
        return AudioSegment.from_wav(fh)


def load_pcm(path: str | Path) -> tuple[np.ndarray, int]:
    """Read a 16-bit WAV as float32 mono in [-1, 1] and its sample rate (for analysis)."""
    segment = _read_wav(path)
    data = np.frombuffer(segment.raw_data, dtype=np.int16).reshape(-1, segment.channels)
    return data.mean(axis=1, dtype=np.float32) / 32768.0, segment.frame_rate


def write_chunk_wav(info: AudioInfo, start_s: float, end_s: float, dest: Path) -> str:
    """Write the samples [start_s, end_s) of the row's PCM master to dest (sample-exact WAV)."""
    segment = _read_wav(info.pcm_path)
    rate = segment.frame_rate
    first = max(0, round(start_s * rate))
    last = min(int(segment.frame_count()), round(end_s * rate))
    if last <= first:
        raise ValueError(f"empty chunk {start_s}–{end_s} s of {info.source}")
    with writing(dest) as tmp:
        segment.get_sample_slice(first, last).export(str(tmp), format="wav").close()
    return str(dest)


def find_cut_points(
    samples: np.ndarray,
    sample_rate: int,
    target_s: float,
    window_s: float,
    min_s: float,
    grid: FrameGrid = V1_GRID,
) -> list[float]:
    """Return cut times (s) that split narration into chunks on the model's segment grid at pauses.

    Each chunk is at most `span` = the video length of the most segments fitting in target_s, so it
    never needs more segments than that; the cut is the middle of the longest pause (quietest point
    when there is none) inside [start + span − window_s, start + span]. Cuts also keep min_s before
    and after them, so no chunk (the last included) is shorter than min_s.
    """
    duration_s = len(samples) / sample_rate
    span_s = grid.longest_span_s(target_s)
    if 2 * min_s > span_s:
        raise ValueError(
            f"min_s={min_s} is more than half a {span_s} s chunk (target_s={target_s})"
        )
    if duration_s <= span_s:
        return []
    frame_db, threshold_db = _frame_loudness(samples, sample_rate)
    cuts: list[float] = []
    start = 0.0
    while duration_s - start > span_s:
        hi = min(start + span_s, duration_s - min_s)
        lo = max(start + min_s, hi - window_s)
        cut = _pause_point(frame_db, threshold_db, lo, hi)
        start = round(cut * sample_rate) / sample_rate  # sample-exact, so chunks tile the audio
        cuts.append(start)
    return cuts


def _frame_loudness(samples: np.ndarray, sample_rate: int) -> tuple[np.ndarray, float]:
    """Return RMS dBFS per 10 ms frame and the quiet threshold relative to the file's loudness."""
    hop = max(1, round(FRAME_S * sample_rate))
    count = len(samples) // hop
    frames = samples[: count * hop].astype(np.float64).reshape(count, hop)
    frame_db = 20 * np.log10(np.sqrt(np.mean(frames**2, axis=1)) + 1e-10)
    file_db = 20 * np.log10(np.sqrt(np.mean(samples.astype(np.float64) ** 2)) + 1e-10)
    # relative, not absolute: a noise floor or a quiet recording moves both levels together
    return frame_db, file_db - PAUSE_BELOW_DB


def _pause_point(frame_db: np.ndarray, threshold_db: float, lo: float, hi: float) -> float:
    """Middle of the longest quiet run of frames in [lo, hi] (latest on ties), else the quietest."""
    first = math.ceil(lo / FRAME_S - 1e-9)
    last = min(len(frame_db), math.floor(hi / FRAME_S + 1e-9))
    if last <= first:
        return hi
    quiet = np.concatenate(([False], frame_db[first:last] < threshold_db, [False]))
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts):
        lengths = ends - starts
        best = len(lengths) - 1 - int(np.argmax(lengths[::-1]))
        middle = (first + (starts[best] + ends[best]) / 2) * FRAME_S
    else:
        # no pause here: a 50 ms moving average finds the deepest dip between syllables
        window = frame_db[first:last]
        smooth = np.convolve(window, np.ones(5) / 5, mode="same") if len(window) >= 5 else window
        middle = (first + int(np.argmin(smooth)) + 0.5) * FRAME_S
    return float(min(max(middle, lo), hi))
