"""QC gates: measure a rendered avatar video, compare each measure with a threshold, record both.

Gates, in report order (the names are stable: they key JSON, results columns and --qc-skip):

- ``duration``: decoded video frames minus the planned frame count (the caller's, or the audio's
  duration times the frame rate for a standalone MP4).
- ``sync``: the audio track's decoded length (sample count / rate) minus the video's length.
- ``black``: the longest stretch of black frames, in seconds.
- ``freeze``: the longest stretch of frozen (unchanging) frames, in seconds; black is not frozen.
- ``face``: the share of sampled frames in which a face is found.
- ``lipsync``: the A/V offset, in frames, at which mouth-region motion correlates best with the
  narration's loudness changes (when it beats lag 0 clearly; else 0), and that correlation.
- ``seams``: the colour-histogram distance across each join (whole frame and face crop), plus the
  largest jump between any two consecutive frames.

The video is decoded once, scaled to ``analysis_width`` as YUV 4:2:0, and every gate works from
per-frame statistics gathered in that single pass, so memory stays flat with the video's length.

Face detector: OpenCV's Haar frontal-face cascade. ``opencv-python-headless`` 4.x ships the
cascade files inside its wheel (``cv2.data.haarcascades``; the 5.x wheels ship none, hence the
``<5`` pin), so it works offline with no download. It searches a 256-px frame in ~13 ms of CPU
(a few ms near the last face), and OpenCV also gives the other gates fast histograms and frame
differences. Rejected: mediapipe (its current releases ship no models, and the older ones that do
pull in a second OpenCV distribution) and scikit-image's LBP cascade (~64 ms for the same frame).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from avatarflow.tasks.config import QC_GATES, QCSettings
from avatarflow.tasks.media import open_media
from avatarflow.tasks.records import V1_GRID, GateResult, QCReport

GATES = QC_GATES

_HIST_BINS = 32
_FACE_BOXES_KEPT = 3  # the mouth is placed from the median of the last few face boxes
_MIN_LIPSYNC_FRAMES = 32  # fewer usable frames than this (2 s at 16 fps) cannot be correlated


class QCInputError(ValueError):
    """The video or audio cannot be read, or a gate name is unknown: nothing was judged."""


def run_gates(
    video_path: str | Path,
    audio_path: str | Path | None = None,
    settings: QCSettings | None = None,
    skip: Collection[str] = frozenset(),
    expected_frames: int | None = None,
    joins: Sequence[int] | None = None,
) -> QCReport:
    """Run every QC gate not in skip on one MP4 and return the report.

    audio_path is the narration the video was rendered from (default: the MP4's own audio track);
    expected_frames is the planned frame count (default: the narration's length times the fps);
    joins are the first frame indices of every chunk and model segment (default: the model's
    93 + 80k grid). Raises QCInputError when a file cannot be read or a gate name is unknown.
    """
    started = time.perf_counter()
    settings = settings or QCSettings()
    unknown = sorted(set(skip) - set(GATES))
    if unknown:
        raise QCInputError(f"unknown gate(s) {', '.join(unknown)}; gates: {', '.join(GATES)}")
    skip = frozenset(skip)
    video = _scan_video(
        Path(video_path),
        settings,
        find_faces=not {"face", "lipsync", "seams"} <= skip,
        colours="seams" not in skip,
    )
    track = narration = None
    if not {"duration", "sync", "lipsync"} <= skip:
        track = _read_audio(Path(video_path), required=False)
        narration = _read_audio(Path(audio_path), required=True) if audio_path else track
    if joins is None:
        joins = V1_GRID.segment_joins(video.frames)  # the model's grid: 93, then every 80
    gates = {
        "duration": lambda: _duration_gate(video, narration, expected_frames, settings),
        "sync": lambda: _sync_gate(video, track or narration, settings),
        "black": lambda: _black_gate(video, settings),
        "freeze": lambda: _freeze_gate(video, settings),
        "face": lambda: _face_gate(video, settings),
        "lipsync": lambda: _lipsync_gate(video, narration, settings),
        "seams": lambda: _seams_gate(video, joins, settings),
    }
    results = tuple(
        GateResult(name, "skipped", detail="skipped") if name in skip else gates[name]()
        for name in GATES
    )
    reasons = tuple(f"qc {g.name}: {g.detail}" for g in results if g.status == "failed")
    elapsed_s = round(time.perf_counter() - started, 3)
    return QCReport(not reasons, reasons, {}, results, video.frames, video.fps, elapsed_s)


# --- the decoding pass -------------------------------------------------------------------------


@dataclass
class _Scan:
    """Per-frame statistics of a video, gathered in one decoding pass at analysis size."""

    fps: float
    black: list[bool] = field(default_factory=list)
    diff: list[float] = field(default_factory=list)  # vs the previous frame: see _block_diff
    # (3, bins) Y/U/V, each sums to 1; whole frame and face box only; kept for the seams gate
    hist: list[np.ndarray] = field(default_factory=list)
    face_hist: list[np.ndarray | None] = field(default_factory=list)
    mouth: list[float] = field(default_factory=list)  # mouth-box motion; nan without a face
    face_samples: int = 0  # non-black frames the detector looked at
    face_hits: int = 0

    @property
    def frames(self) -> int:
        return len(self.black)


def _scan_video(path: Path, settings: QCSettings, find_faces: bool, colours: bool) -> _Scan:
    """Decode the video once at analysis size and gather what every gate needs.

    colours: keep Y/U/V histograms (only the seams gate reads them; chroma is otherwise unused).
    """
    try:
        container = av.open(str(path))
    except (OSError, av.FFmpegError) as exc:
        raise QCInputError(f"{path}: not a readable video ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise QCInputError(f"{path}: no video stream")
        stream = container.streams.video[0]
        # One decoding thread: rows are checked in parallel, and a codec's own threads cost more
        # to start than they save on a short clip (a 3 s row: 15.5 → 8.9 ms of CPU to decode).
        stream.codec_context.thread_count = 1
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0 or not stream.width:
            raise QCInputError(f"{path}: video stream without a frame rate or size")
        width = min(settings.analysis_width, stream.width) // 2 * 2
        height = max(2, round(stream.height * width / stream.width / 2) * 2)
        scan = _Scan(fps)
        faces = _FaceTracker(max(1, round(settings.face_every_s * fps))) if find_faces else None
        previous: np.ndarray | None = None
        try:
            for frame in container.decode(stream):
                luma, chroma = _analysis_planes(frame, width, height, colours)
                previous = _add_frame(
                    scan, luma, chroma, frame.color_range, previous, faces, settings
                )
        except av.FFmpegError as exc:
            reason = f"decoding failed at frame {scan.frames}: {_reason(exc)}"
            raise QCInputError(f"{path}: {reason}") from None
    if not scan.frames:
        raise QCInputError(f"{path}: no video frame decodes")
    return scan


def _analysis_planes(
    frame: av.VideoFrame, width: int, height: int, colours: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """The frame's luma (and, with colours, its two chroma planes) scaled to width × height.

    4:2:0 frames (what H.264 renders are) are scaled from the decoder's own planes, without the
    copy and converter pass of to_ndarray/reformat (together ~3× the cost of decoding a frame);
    other formats are converted to 4:2:0 at analysis size first.
    """
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        # Fast bilinear is enough for statistics, at under half the default scaler's cost.
        frame = frame.reformat(
            width=width, height=height, format="yuv420p", interpolation="FAST_BILINEAR"
        )
    luma = _scaled(_plane(frame, 0, frame.width, frame.height), width, height)
    if not colours:
        return luma, None
    half = (frame.width + 1) // 2, (frame.height + 1) // 2
    chroma = np.stack([_scaled(_plane(frame, i, *half), width // 2, height // 2) for i in (1, 2)])
    return luma, chroma


def _plane(frame: av.VideoFrame, index: int, width: int, height: int) -> np.ndarray:
    """A view of one decoded plane (rows are line_size bytes apart, padding cut off)."""
    plane = frame.planes[index]
    rows = np.frombuffer(memoryview(plane), np.uint8)[: plane.line_size * height]
    view: np.ndarray = rows.reshape(height, plane.line_size)[:, :width]
    return view


def _scaled(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """image at width × height (bilinear, as statistics need), as an array of its own."""
    if image.shape == (height, width):
        return image.copy()  # the decoder reuses its buffers
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def _add_frame(
    scan: _Scan,
    luma: np.ndarray,
    chroma: np.ndarray | None,
    color_range: int,
    previous: np.ndarray | None,
    faces: _FaceTracker | None,
    settings: QCSettings,
) -> np.ndarray:
    """Add one analysis-size frame's statistics to scan; return its luma for the next frame."""
    # Like ffmpeg's blackdetect: the pixel threshold is a share of the luma range in use.
    full_range = color_range == 2  # AVCOL_RANGE_JPEG
    black_level = (
        settings.black_pixel_max * 255 if full_range else 16 + settings.black_pixel_max * 219
    )
    black = np.count_nonzero(luma <= black_level) >= settings.black_frame_ratio * luma.size
    scan.black.append(bool(black))
    scan.diff.append(0.0 if previous is None else _block_diff(luma, previous))
    if chroma is not None:
        scan.hist.append(_histograms(luma, chroma))
    box = faces.observe(len(scan.black) - 1, luma, bool(black), scan) if faces else None
    if box is None:
        scan.face_hist.append(None)
        scan.mouth.append(np.nan)
        return luma
    x, y, w, h = box
    if chroma is not None:
        scan.face_hist.append(
            _histograms(
                luma[y : y + h, x : x + w],
                chroma[:, y // 2 : (y + h) // 2, x // 2 : (x + w) // 2],
            )
        )
    else:
        scan.face_hist.append(None)
    # The mouth sits in the lower middle of a Haar face box.
    mouth = (slice(y + round(0.68 * h), y + round(0.98 * h)), slice(x + w // 4, x + 3 * w // 4))
    if previous is None or black or scan.black[-2]:
        scan.mouth.append(np.nan)  # motion into or out of a black frame is not the mouth's
    else:
        scan.mouth.append(_mean_abs_diff(luma[mouth], previous[mouth]))
    return luma


def _block_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |a - b| (0-1) of the most-changed block in a 16-column grid.

    A mean over the whole frame would call a talking head whose mouth alone moves frozen; a
    re-encoded duplicate frame differs by encoder noise only, spread thinly over every block.
    """
    columns = 16
    rows = max(1, round(columns * a.shape[0] / a.shape[1]))
    blocks = cv2.resize(cv2.absdiff(a, b), (columns, rows), interpolation=cv2.INTER_AREA)
    return float(blocks.max()) / 255


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two uint8 images, as a share of 255."""
    return cv2.norm(a, b, cv2.NORM_L1) / (a.size * 255) if a.size else 0.0


def _histograms(luma: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """Y, U and V histograms, each normalised to sum to 1."""
    planes = (luma, chroma[0], chroma[1])
    counts = np.stack([cv2.calcHist([p], [0], None, [_HIST_BINS], [0, 256])[:, 0] for p in planes])
    normalised: np.ndarray = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return normalised


_THREAD = threading.local()


def _face_cascade() -> cv2.CascadeClassifier:
    """This thread's frontal-face Haar cascade, read from inside the opencv wheel once per thread.

    A CascadeClassifier keeps its scratch state (the scale pyramid) in the object, so threads that
    share one corrupt each other's searches (``getScaleData`` assertions, wrong boxes). A copy
    costs ~23 ms and ~0.5 MB once per thread (the flow's pool keeps its threads). A shared copy
    behind a lock cost the same on 2 cores, but would serialise every search on a larger machine.
    """
    cascade: cv2.CascadeClassifier | None = getattr(_THREAD, "face_cascade", None)
    if cascade is None:
        folder = cv2.data.haarcascades  # type: ignore[attr-defined]  # cv2's stubs miss `data`
        cascade = cv2.CascadeClassifier(folder + "haarcascade_frontalface_default.xml")
        if cascade.empty():
            raise RuntimeError(
                "OpenCV's frontal-face cascade is missing (opencv-python-headless<5)"
            )
        _THREAD.face_cascade = cascade
    return cascade


class _FaceTracker:
    """Looks for a face every `every` frames; holds the box the mouth and face crop come from."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.boxes: deque[np.ndarray] = deque(maxlen=_FACE_BOXES_KEPT)

    def observe(
        self, index: int, luma: np.ndarray, black: bool, scan: _Scan
    ) -> tuple[int, int, int, int] | None:
        """Detect on sampled, non-black frames (counted in scan); return the current face box."""
        if index % self.every == 0 and not black:
            scan.face_samples += 1
            found = self._detect(luma)
            if len(found):
                scan.face_hits += 1
                self.boxes.append(max(found, key=lambda b: b[2] * b[3]))
        return self.box

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """Median of the last few face boxes (x, y, w, h), or None before the first face."""
        if not self.boxes:
            return None
        x, y, w, h = (int(v) for v in np.median(np.stack(self.boxes), axis=0))
        return x, y, w, h

    def _detect(self, luma: np.ndarray) -> np.ndarray:
        """Face boxes in luma: near the last face first (a few times cheaper), else anywhere."""
        cascade = _face_cascade()
        if (box := self.box) is not None:
            x, y, w, h = box
            x0, y0 = max(0, x - w // 2), max(0, y - h // 2)
            region = luma[y0 : y + h + h // 2, x0 : x + w + w // 2]
            small, large = max(24, round(0.7 * w)), round(1.4 * w)
            found = cascade.detectMultiScale(
                region, 1.1, 4, minSize=(small, small), maxSize=(large, large)
            )
            if len(found):
                shifted: np.ndarray = np.asarray(found) + np.array([x0, y0, 0, 0])
                return shifted
        return np.asarray(cascade.detectMultiScale(luma, 1.1, 4, minSize=(24, 24)))


# --- audio ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Audio:
    """Decoded mono audio at the stream's own rate, less the encoder's tail padding."""

    samples: np.ndarray
    rate: int
    decoded: int  # samples as decoded, padding included: what a player plays

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.rate

    @property
    def decoded_s(self) -> float:
        return self.decoded / self.rate


def _read_audio(path: Path, required: bool) -> _Audio | None:
    """Decode the first audio stream to mono float; None when there is none and not required."""
    try:
        container = open_media(path)
    except (OSError, av.FFmpegError) as exc:
        raise QCInputError(f"{path}: not a readable audio file ({_reason(exc)})") from None
    with container:
        if not container.streams.audio:
            if required:
                raise QCInputError(f"{path}: no audio stream")
            return None
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        resampler = av.AudioResampler("flt", "mono", rate)
        try:
            chunks = [
                f.to_ndarray().ravel()
                for frame in container.decode(stream)
                for f in resampler.resample(frame)
            ]
            chunks += [f.to_ndarray().ravel() for f in resampler.resample(None)]
        except av.FFmpegError as exc:
            raise QCInputError(f"{path}: audio decoding failed ({_reason(exc)})") from None
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        # AAC pads its last frame: trust the container's length when the excess is under a frame.
        declared = 0
        if stream.duration and stream.time_base:
            declared = round(float(stream.duration * stream.time_base) * rate)
        excess = len(samples) - declared
        padded = declared and 0 < excess <= (stream.codec_context.frame_size or 0)
    return _Audio(samples[:declared] if padded else samples, rate, len(samples))


def _loudness(audio: _Audio, fps: float, frames: int) -> np.ndarray:
    """RMS level of the audio under each video frame (0 past the audio's end)."""
    edges = np.minimum(
        np.round(np.arange(frames + 1) * audio.rate / fps).astype(int), len(audio.samples)
    )
    squares = np.concatenate([[0.0], np.cumsum(audio.samples.astype(np.float64) ** 2)])
    sums = squares[edges[1:]] - squares[edges[:-1]]
    counts = np.maximum(np.diff(edges), 1)
    rms: np.ndarray = np.sqrt(sums / counts)
    return rms


# --- the gates -----------------------------------------------------------------------------------


def _duration_gate(
    video: _Scan, narration: _Audio | None, expected: int | None, settings: QCSettings
) -> GateResult:
    """Decoded frames against the plan, or against the narration's length."""
    limit = settings.duration_max_frames_off
    if expected is None:
        if narration is None:
            return GateResult("duration", "skipped", detail="no planned frame count and no audio")
        expected = round(narration.duration_s * video.fps)
        source = f"{narration.duration_s:.3f} s of audio"
    else:
        expected, source = int(expected), "the plan"
    off = video.frames - expected
    return GateResult(
        "duration",
        "passed" if abs(off) <= limit else "failed",
        off,
        limit,
        f"{video.frames} frames, {expected} expected from {source} (±{limit})",
        {"frames": video.frames, "expected_frames": expected},
    )


def _sync_gate(video: _Scan, audio: _Audio | None, settings: QCSettings) -> GateResult:
    """The audio's decoded length against the video's."""
    if audio is None:
        return GateResult("sync", "skipped", detail="no audio")
    video_s = video.frames / video.fps
    drift = audio.decoded_s - video_s
    limit = settings.sync_max_drift_s
    return GateResult(
        "sync",
        "passed" if abs(drift) <= limit else "failed",
        round(drift, 4),
        limit,
        f"audio {audio.decoded_s:.3f} s ({audio.decoded} samples at {audio.rate} Hz), "
        f"video {video_s:.3f} s",
        {"audio_s": round(audio.decoded_s, 6), "video_s": round(video_s, 6)},
    )


def _longest_run(flags: Sequence[bool] | np.ndarray) -> tuple[int, int]:
    """(start, length) of the longest run of True values; (0, 0) when there is none."""
    padded = np.concatenate(([False], np.asarray(flags, bool), [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    if not len(edges):
        return 0, 0
    starts, lengths = edges[0::2], edges[1::2] - edges[0::2]
    best = int(np.argmax(lengths))
    return int(starts[best]), int(lengths[best])


def _black_gate(video: _Scan, settings: QCSettings) -> GateResult:
    """The longest run of black frames."""
    start, length = _longest_run(video.black)
    seconds = length / video.fps
    limit = settings.black_max_s
    detail = "no black frames"
    if length:
        detail = f"longest black stretch {seconds:.2f} s from {start / video.fps:.2f} s"
        detail += f" ({sum(video.black)} black frames in all)"
    return GateResult(
        "black",
        "passed" if seconds <= limit else "failed",
        round(seconds, 4),
        limit,
        detail,
        {"start_frame": start, "frames": length},
    )


def _freeze_gate(video: _Scan, settings: QCSettings) -> GateResult:
    """The longest run of frames equal to their predecessor (black frames are the black gate's)."""
    black = np.asarray(video.black)
    still = np.asarray(video.diff) < settings.freeze_max_diff
    still[0] = False
    still[1:] &= ~black[1:] & ~black[:-1]
    start, length = _longest_run(still)
    # A run of n frames equal to the one before them shows one picture for n + 1 frames.
    frames = length + 1 if length else 0
    seconds = frames / video.fps
    limit = settings.freeze_max_s
    detail = "no frozen frames"
    if length:
        detail = f"longest frozen stretch {seconds:.2f} s from {(start - 1) / video.fps:.2f} s"
    return GateResult(
        "freeze",
        "passed" if seconds <= limit else "failed",
        round(seconds, 4),
        limit,
        detail,
        {"start_frame": start - 1 if length else 0, "frames": frames},
    )


def _face_gate(video: _Scan, settings: QCSettings) -> GateResult:
    """The share of sampled (non-black) frames with a face."""
    limit = settings.face_min_ratio
    if not video.face_samples:
        return GateResult("face", "failed", 0.0, limit, "no picture to look for a face in")
    ratio = video.face_hits / video.face_samples
    return GateResult(
        "face",
        "passed" if ratio >= limit else "failed",
        round(ratio, 4),
        limit,
        f"a face in {video.face_hits} of {video.face_samples} sampled frames",
        {"samples": video.face_samples, "faces": video.face_hits},
    )


def _lipsync_gate(video: _Scan, narration: _Audio | None, settings: QCSettings) -> GateResult:
    """Cross-correlate mouth motion with the narration's loudness changes over -N..+N frames.

    A positive offset means the sound comes after the mouth moves (audio late). Three things keep
    a good render from being called out of sync:

    - A jaw cannot follow loudness frame by frame: the sound side is the change of the loudness
      as seen through a few jaw responses (none, ~0.19 s, ~0.31 s moving averages), and the one
      that fits the mouth best is used.
    - Every lag is scored on the same mouth frames (the middle of the clip), so no lag wins by
      leaving out the frames that fit worst.
    - An offset other than 0 counts only when its r beats lag 0's by lipsync_min_offset_t
      standard errors (Williams' t for two correlations that share the mouth series, which
      knows how alike the sound is at the two lags). Speech is rhythmic: in a single sentence
      a few syllables later looks much like now, and a short clip cannot tell them apart, so
      its near-ties are read as in sync rather than as an offset. A clip too short to score
      passes with a note.
    """
    name = "lipsync"
    limit = settings.lipsync_max_offset_frames
    if narration is None:
        return GateResult(name, "skipped", detail="no audio")
    mouth = np.asarray(video.mouth)
    if np.count_nonzero(~np.isnan(mouth)) < _MIN_LIPSYNC_FRAMES:
        return GateResult(name, "skipped", detail="no face to find the mouth in")
    search = settings.lipsync_search_frames
    window = mouth[search : len(mouth) - search]  # frames every lag can be scored on
    frames = np.flatnonzero(~np.isnan(window)) + search
    if len(frames) < _MIN_LIPSYNC_FRAMES:
        detail = f"{len(frames)} frames with a mouth once ±{search} frames of search are set"
        detail += f" aside; {_MIN_LIPSYNC_FRAMES} needed: too little to judge, passed"
        return GateResult(name, "passed", None, limit, detail, {"frames": len(frames)})
    loud = _loudness(narration, video.fps, video.frames)
    if not np.abs(np.diff(loud)).any():
        return GateResult(name, "skipped", detail="the audio is silent")
    fit = max(
        (
            _lag_scores(mouth[frames], _jaw_motion(loud, width), frames, search)
            for width in _jaw_widths(video.fps)
        ),
        key=lambda f: -np.inf if np.isnan(f.best_r) else f.best_r,
    )
    if np.isnan(fit.best_r):
        detail = "the mouth region never moves while there is sound"
        return GateResult(name, "failed", None, limit, detail)
    t = fit.t_vs_zero(len(frames))
    offset = fit.best if t >= settings.lipsync_min_offset_t else 0
    ok = abs(offset) <= limit and fit.best_r >= settings.lipsync_min_corr
    ms = 1000 / video.fps
    detail = f"best offset {fit.best:+d} frames ({fit.best * ms:+.0f} ms), r = {fit.best_r:.2f}"
    detail += f" (min {settings.lipsync_min_corr})"
    if fit.best:
        verdict = "counts" if offset else "is no clear offset: read as in sync"
        detail += f"; against lag 0 (r = {fit.r[0]:.2f}) t = {t:.1f}"
        detail += f" (min {settings.lipsync_min_offset_t}): {verdict}"
    return GateResult(
        name,
        "passed" if ok else "failed",
        offset,
        limit,
        detail,
        {
            "corr": round(fit.best_r, 4),
            "min_corr": settings.lipsync_min_corr,
            "best_offset": fit.best,
            "corr_at_0": round(fit.r[0], 4),
            "t": round(t, 2),
            "frames": len(frames),
        },
    )


def _jaw_widths(fps: float) -> list[int]:
    """Odd moving-average widths, in frames, for jaw responses of 0, ~0.19 and ~0.31 s."""
    return sorted({max(1, round(s * fps)) | 1 for s in (0.0, 0.1875, 0.3125)})


def _jaw_motion(loud: np.ndarray, width: int) -> np.ndarray:
    """How much a jaw following loudness through a centred moving average moves each frame."""
    level = np.convolve(loud, np.ones(width) / width, mode="same") if width > 1 else loud
    motion: np.ndarray = np.abs(np.diff(level, prepend=level[:1]))
    return motion


@dataclass(frozen=True)
class _LagFit:
    """Pearson r of the mouth and the sound at each lag, and the sound's self-similarity."""

    r: dict[int, float]
    best: int
    sound_r: float  # r of the sound at lag `best` with the sound at lag 0, over the same frames

    @property
    def best_r(self) -> float:
        return self.r[self.best]

    def t_vs_zero(self, n: int) -> float:
        """Williams' t that r at the best lag exceeds r at lag 0 (dependent correlations)."""
        r12, r13, r23 = self.best_r, self.r[0], self.sound_r
        if self.best == 0 or r23 >= 1:
            return 0.0
        det = max(0.0, 1 - r12**2 - r13**2 - r23**2 + 2 * r12 * r13 * r23)
        mean = (r12 + r13) / 2
        spread = 2 * (n - 1) / (n - 3) * det + mean**2 * (1 - r23) ** 3
        return float((r12 - r13) * np.sqrt((n - 1) * (1 + r23) / spread)) if spread > 0 else 0.0


def _lag_scores(mouth: np.ndarray, sound: np.ndarray, frames: np.ndarray, search: int) -> _LagFit:
    """Score mouth (at `frames`) against sound[frames + lag] for every lag in -search..+search."""
    lagged = {lag: sound[frames + lag] for lag in range(-search, search + 1)}
    r = {lag: _pearson(mouth, s) for lag, s in lagged.items()}
    best = max(r, key=lambda lag: -np.inf if np.isnan(r[lag]) else r[lag])
    return _LagFit(r, best, _pearson(lagged[best], lagged[0]))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of a and b; nan when either is flat."""
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _hellinger(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hellinger distance (0 same, 1 disjoint) of histograms on the last axis."""
    distance: np.ndarray = np.sqrt(np.clip(1.0 - np.sqrt(p * q).sum(axis=-1), 0.0, 1.0))
    return distance


def _seams_gate(video: _Scan, joins: Sequence[int], settings: QCSettings) -> GateResult:
    """Colour/identity distance across each join, and the largest frame-to-frame jump."""
    black = np.asarray(video.black)
    hist = np.stack(video.hist)
    # frame-to-frame: the worst channel of each consecutive pair, pairs touching black left out
    steps = _hellinger(hist[1:], hist[:-1]).max(axis=1) if video.frames > 1 else np.zeros(0)
    steps[black[1:] | black[:-1]] = 0.0
    jump_at = int(np.argmax(steps)) + 1 if len(steps) else 0
    jump = float(steps.max()) if len(steps) else 0.0
    window = settings.seam_window_frames
    measured = {int(j): _join_distance(video, j, window) for j in joins if 0 < j < video.frames}
    distances = {j: d for j, d in measured.items() if d is not None}
    worst = max(distances, key=lambda j: distances[j]) if distances else None
    value = round(distances[worst], 4) if worst is not None else None
    ok = (
        value is None or value <= settings.seam_max_distance
    ) and jump <= settings.jump_max_distance
    detail = f"{len(distances)} joins"
    if worst is not None:
        detail += f", worst at frame {worst} ({value:.3f})"
    detail += f"; largest frame-to-frame jump {jump:.3f} at frame {jump_at}"
    detail += f" (max {settings.jump_max_distance})"
    return GateResult(
        "seams",
        "passed" if ok else "failed",
        value,
        settings.seam_max_distance,
        detail,
        {
            "joins": len(distances),
            "worst_join_frame": worst,
            "jump": round(jump, 4),
            "jump_frame": jump_at,
            "jump_max": settings.jump_max_distance,
        },
    )


def _join_distance(video: _Scan, join: int, window: int) -> float | None:
    """Distance between the mean histograms of `window` frames before and after a join.

    The whole frame and the face crop (when a face was found on both sides) are compared; the
    worse channel of the worse of the two counts. None when one side is all black.
    """
    before = [i for i in range(max(0, join - window), join) if not video.black[i]]
    after = [i for i in range(join, min(video.frames, join + window)) if not video.black[i]]
    if not before or not after:
        return None
    distances = []
    for hists in (video.hist, video.face_hist):
        a = [h for i in before if (h := hists[i]) is not None]
        b = [h for i in after if (h := hists[i]) is not None]
        if a and b:
            distances.append(float(_hellinger(np.mean(a, axis=0), np.mean(b, axis=0)).max()))
    return max(distances)


def _reason(exc: BaseException) -> str:
    """A one-line reason for a failed open or decode."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
