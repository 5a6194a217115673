"""Synthetic test media: speech-like narration with known pauses, encoded to any common format.

Tests across the suite use these to build narrations quickly without a TTS engine, plus broken
files (empty, corrupt, not audio) for the error paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

# container format and encoder per file format; opus only encodes at 8/12/16/24/48 kHz
_FORMATS = {
    "wav": ("wav", "pcm_s16le"),
    "mp3": ("mp3", "libmp3lame"),
    "m4a": ("ipod", "aac"),
    "flac": ("flac", "flac"),
    "ogg": ("ogg", "libopus"),
}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
# fastest encoder settings: test media needs valid streams, not quality (3-4x faster for mp3/aac)
_ENCODER_OPTIONS = {"libmp3lame": {"compression_level": "9"}, "aac": {"aac_coder": "fast"}}


def speechlike(
    duration_s: float,
    sample_rate: int = 16000,
    pauses: Sequence[tuple[float, float]] = (),
    seed: int = 0,
    noise_floor_db: float | None = None,
) -> np.ndarray:
    """Return float32 mono narration: voiced syllables (~5/s) with true silence at `pauses`."""
    rng = np.random.default_rng(seed)
    n = round(duration_s * sample_rate)
    out = np.zeros(n, dtype=np.float32)
    t = 0.0
    while t < duration_s:
        syllable_s = rng.uniform(0.12, 0.24)
        _add_syllable(out, sample_rate, t, syllable_s, rng)
        # short, not silent, gaps between syllables: like the dips inside real words
        t += syllable_s + rng.uniform(0.0, 0.04)
    if noise_floor_db is not None:
        out += rng.normal(0.0, 10 ** (noise_floor_db / 20), n).astype(np.float32)
    for start, end in pauses:
        out[round(start * sample_rate) : round(end * sample_rate)] = 0.0
    return np.clip(out, -1.0, 1.0)


def _add_syllable(
    out: np.ndarray, sample_rate: int, start_s: float, length_s: float, rng: np.random.Generator
) -> None:
    """Mix one harmonic burst (a vowel-ish tone with a Hann envelope) into `out` in place."""
    i0 = round(start_s * sample_rate)
    i1 = min(len(out), i0 + round(length_s * sample_rate))
    if i1 <= i0:
        return
    t = np.arange(i1 - i0) / sample_rate
    f0 = rng.uniform(100.0, 220.0)
    tone = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 5))
    envelope = np.hanning(i1 - i0) * rng.uniform(0.2, 0.5)
    out[i0:i1] += (tone * envelope + rng.normal(0, 0.01, i1 - i0)).astype(np.float32)


def write_audio(path: Path | str, samples: np.ndarray, sample_rate: int, format: str) -> Path:
    """Encode float samples, shape (n,) or (n, channels), to wav/mp3/m4a/flac/ogg with PyAV."""
    container_format, codec = _FORMATS[format]
    pcm = np.asarray(samples, dtype=np.float32)
    pcm = pcm[:, None] if pcm.ndim == 1 else pcm
    layout = "mono" if pcm.shape[1] == 1 else "stereo"
    interleaved = (np.clip(pcm, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
    rate = sample_rate
    if codec == "libopus" and rate not in _OPUS_RATES:
        rate = 48000
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream(
            codec, rate=rate, layout=layout, options=_ENCODER_OPTIONS.get(codec, {})
        )
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = 0  # an explicit start lets the mp4 muxer record AAC priming in its edit list
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_narration(
    path: Path | str,
    duration_s: float,
    format: str = "wav",
    sample_rate: int = 16000,
    pause_every_s: float = 3.7,
    seed: int = 0,
) -> Path:
    """Write speech-like narration with a 0.4 s pause every pause_every_s (cuttable at pauses)."""
    count = int(duration_s // pause_every_s)
    pauses = [(pause_every_s * (i + 1) - 0.4, pause_every_s * (i + 1)) for i in range(count)]
    samples = speechlike(duration_s, sample_rate, pauses, seed=seed)
    return write_audio(path, samples, sample_rate, format)


def write_corrupt_audio(path: Path | str, seed: int = 0) -> Path:
    """Write random bytes under an audio extension: a file that cannot be decoded."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).bytes(4096))
    return path


def write_empty_file(path: Path | str) -> Path:
    """Write a 0-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_not_audio(path: Path | str) -> Path:
    """Write a small PNG (or text, by extension): a readable file with no audio stream."""
    path = Path(path)
    if path.suffix == ".png":
        Image.new("RGB", (32, 32), (200, 120, 90)).save(path)
    else:
        path.write_text("this is a text file, not narration\n" * 20)
    return path


def write_mp4(path: Path | str, seconds: float = 1.0, size: tuple[int, int] = (64, 48)) -> Path:
    """Write a tiny H.264 MP4 whose frames brighten over time (for thumbnails)."""
    path = Path(path)
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        frames = round(seconds * 16)
        for i in range(frames):
            level = int(255 * i / max(1, frames - 1))
            image = np.full((height, width, 3), level, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_silence(path: Path | str, duration_s: float, format: str = "wav") -> Path:
    """Write digital silence: decodable narration with no signal at all."""
    return write_audio(path, np.zeros(round(duration_s * 16000), np.float32), 16000, format)


def write_image(path: Path | str, size: tuple[int, int] = (64, 80)) -> Path:
    """Write a small, valid PNG portrait-ish image."""
    path = Path(path)
    Image.new("RGB", size, (180, 140, 120)).save(path, format="PNG")
    return path


def write_truncated_image(path: Path | str, size: tuple[int, int] = (64, 80)) -> Path:
    """Write a PNG cut off halfway: a valid header and signature, then nothing."""
    path = write_image(path, size)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path
