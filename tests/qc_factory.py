"""Synthetic talking-head renders for the QC gates: a real face whose mouth follows the narration.

The face is scikit-image's bundled `astronaut` photo (a frontal face shipped inside the wheel, so
nothing is downloaded); the mouth opens with the narration's loudness frame by frame and the whole
picture sways slightly, like a render. Defects are derived from one good render in memory and
muxed to H.264 + AAC MP4s with PyAV.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import numpy as np
from skimage import data

from tests.media_factory import speechlike

# Head-and-shoulders crop of the 512x512 astronaut photo (framed like an avatar render), and the
# mouth's centre and half-width in that crop, found by eye.
_HEAD_CROP = (slice(0, 300), slice(75, 375))
_MOUTH_XY, _MOUTH_HALF_WIDTH = (149, 146), 17
_MOUTH_RGB = (70, 25, 30)


@dataclass(frozen=True)
class Render:
    """A render in memory: RGB frames (n, h, w, 3) and mono float narration."""

    frames: np.ndarray
    audio: np.ndarray
    sample_rate: int
    fps: int

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps


def narration(
    duration_s: float, sample_rate: int = 16000, seed: int = 0, single_phrase: bool = False
) -> np.ndarray:
    """Speech-like audio: syllables in words of 0.5-2 s separated by 0.15-0.6 s pauses, or with
    single_phrase one unbroken sentence between a short lead-in and tail of silence."""
    rng = np.random.default_rng(seed)
    if single_phrase:
        lead, tail = rng.uniform(0.1, 0.3), rng.uniform(0.2, 0.4)
        return speechlike(
            duration_s, sample_rate, [(0.0, lead), (duration_s - tail, duration_s)], seed=seed
        )
    pauses, t = [], rng.uniform(0.5, 2.0)
    while t < duration_s:
        gap = rng.uniform(0.15, 0.6)
        pauses.append((t, t + gap))
        t += gap + rng.uniform(0.5, 2.0)
    return speechlike(duration_s, sample_rate, pauses, seed=seed)


def talking_head(
    duration_s: float = 12.0,
    size: tuple[int, int] = (256, 256),
    fps: int = 16,
    sample_rate: int = 16000,
    seed: int = 0,
    face: bool = True,
    single_phrase: bool = False,
    jaw_s: float = 0.0,
) -> Render:
    """A render of size (w, h): the portrait (or with face=False a faceless photo) lip-syncing
    to narration(duration_s, sample_rate, seed, single_phrase).

    The mouth opens with the loudness of each frame; jaw_s > 0 smooths that loudness over time
    (a Gaussian of that many seconds, centred, so still in sync) like a real jaw or model, which
    cannot open and close fully on every 60-ms frame.
    """
    audio = narration(duration_s, sample_rate, seed, single_phrase)
    width, height = size
    photo = data.astronaut()[_HEAD_CROP] if face else data.coffee()[:, 100:500]
    scale = height / photo.shape[0]
    side = round(photo.shape[1] * scale)
    portrait = cv2.resize(photo, (side, height), interpolation=cv2.INTER_AREA)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = photo[5, 5]  # the photo's backdrop colour fills the sides
    x0 = (width - side) // 2
    lo, hi = max(0, -x0), min(side, width - x0)
    canvas[:, x0 + lo : x0 + hi] = portrait[:, lo:hi]
    mouth = (round(x0 + _MOUTH_XY[0] * scale), round(_MOUTH_XY[1] * scale))
    half_width = max(2, round(_MOUTH_HALF_WIDTH * scale))
    openness = _openness(audio, sample_rate, fps, round(duration_s * fps), jaw_s)
    frames = np.empty((len(openness), height, width, 3), np.uint8)
    for i, amount in enumerate(openness):
        image = canvas.copy()
        half_height = max(1, round((1 + 8 * amount) * scale * 1.2))
        cv2.ellipse(image, mouth, (half_width, half_height), 0, 0, 360, _MOUTH_RGB, -1)
        # a slow sub-pixel sway: every frame differs a little, as in a real render
        t = i / fps
        shift = np.float32([[1, 0, 1.5 * np.sin(t * 2.3)], [0, 1, 1.0 * np.sin(t * 1.6)]])
        frames[i] = cv2.warpAffine(image, shift, (width, height), borderMode=cv2.BORDER_REFLECT)
    return Render(frames, audio, sample_rate, fps)


def _openness(
    audio: np.ndarray, sample_rate: int, fps: int, count: int, jaw_s: float = 0.0
) -> np.ndarray:
    """Mouth opening 0..1 per frame: the frame's RMS loudness (smoothed over jaw_s seconds)
    against the loud frames'."""
    edges = np.round(np.arange(count + 1) * sample_rate / fps).astype(int)
    rms = np.array(
        [np.sqrt(np.mean(audio[a:b] ** 2)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    )
    if jaw_s > 0:
        sigma = jaw_s * fps
        taps = np.arange(-round(3 * sigma), round(3 * sigma) + 1)
        kernel = np.exp(-0.5 * (taps / sigma) ** 2)
        rms = np.convolve(rms, kernel / kernel.sum(), mode="same")
    return np.clip(rms / (np.percentile(rms, 95) + 1e-9), 0.0, 1.0)


def with_black(render: Render, start_s: float, length_s: float) -> Render:
    """Black frames over [start_s, start_s + length_s)."""
    frames = render.frames.copy()
    frames[round(start_s * render.fps) : round((start_s + length_s) * render.fps)] = 0
    return dataclasses.replace(render, frames=frames)


def with_freeze(render: Render, start_s: float, length_s: float) -> Render:
    """The frame at start_s held for length_s (the audio goes on)."""
    frames = render.frames.copy()
    first = round(start_s * render.fps)
    frames[first : first + round(length_s * render.fps)] = frames[first]
    return dataclasses.replace(render, frames=frames)


def with_audio_delay(render: Render, frames: int) -> Render:
    """The narration starts `frames` video frames late (same length: its tail is cut)."""
    shift = round(frames * render.sample_rate / render.fps)
    audio = np.concatenate([np.zeros(shift, np.float32), render.audio[: len(render.audio) - shift]])
    return dataclasses.replace(render, audio=audio)


def with_colour_jump(render: Render, frame: int, rgb_shift: tuple[int, int, int]) -> Render:
    """Every frame from `frame` on tinted by rgb_shift (a colour jump at that join)."""
    frames = render.frames.copy()
    tinted = frames[frame:].astype(np.int16) + np.array(rgb_shift, np.int16)
    frames[frame:] = np.clip(tinted, 0, 255).astype(np.uint8)
    return dataclasses.replace(render, frames=frames)


def write_render(
    path: Path | str,
    render: Render,
    preset: str = "ultrafast",
    with_audio: bool = True,
    crf: int = 23,
    pix_fmt: str = "yuv420p",
) -> Path:
    """Mux the render to an H.264 (pix_fmt) + AAC (mono) MP4 at its fps (AAC only with_audio)."""
    path = Path(path)
    height, width = render.frames.shape[1:3]
    with av.open(str(path), "w") as container:
        options = {"preset": preset, "crf": str(crf)}
        video = container.add_stream("libx264", rate=render.fps, options=options)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        # every stream is added before the first packet is muxed
        audio = None
        if with_audio:
            audio = container.add_stream(
                "aac", rate=render.sample_rate, layout="mono", options={"aac_coder": "fast"}
            )
        for index, image in enumerate(render.frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is None:
            return path
        pcm = (np.clip(render.audio, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
        sound = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        sound.sample_rate, sound.pts = render.sample_rate, 0
        container.mux(audio.encode(sound))
        container.mux(audio.encode(None))
    return path
