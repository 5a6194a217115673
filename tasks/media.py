"""PyAV helpers shared by the media stages (verify, concat): exact probing and decode counts.

Container headers are not trusted: frame counts come from demuxed packets and audio lengths from
decoding, since a concatenated file's header can be off by seconds (docs/media.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
from av.container import InputContainer
from av.video.stream import VideoStream

# A PCM WAV's header says all FFmpeg needs; its probing (reading and decoding ahead to guess the
# parameters) cost ~4 ms an open, 20 times the cost of reading a 3 s narration.
_WAV_OPTIONS = {"probesize": "32", "analyzeduration": "0"}
_PCM_TAGS = {1, 3}  # WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT
_WAVE_FORMAT_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class VideoProbe:
    """What a video file really holds: first video stream, plus the first audio stream if any."""

    path: str
    codec: str
    profile: str | None
    width: int
    height: int
    fps: Fraction  # average frame rate
    frames: int  # demuxed video packets (one per frame in MP4)
    duration_s: float  # from the first frame's start to the last frame's end
    pix_fmt: str | None
    time_base: Fraction
    has_b_frames: bool  # decode order differs from presentation order
    extradata_sha256: str  # SPS/PPS: chunks joined by stream copy must share them
    audio_codec: str | None = None
    audio_sample_rate_hz: int | None = None
    audio_channels: int | None = None

    def to_json(self) -> dict[str, object]:
        """Return the probe as JSON-ready values (fractions as strings)."""
        return {
            "codec": self.codec,
            "profile": self.profile,
            "width": self.width,
            "height": self.height,
            "fps": str(self.fps),
            "frames": self.frames,
            "duration_s": round(self.duration_s, 6),
            "pix_fmt": self.pix_fmt,
            "has_b_frames": self.has_b_frames,
            "audio_codec": self.audio_codec,
            "audio_sample_rate_hz": self.audio_sample_rate_hz,
            "audio_channels": self.audio_channels,
        }


def open_media(path: str | Path) -> InputContainer:
    """av.open for reading; a plain PCM WAV (the narration masters the audio stage writes) skips
    FFmpeg's probing. Raises what av.open raises (OSError, av.FFmpegError)."""
    if _is_pcm_wav(Path(path)):
        return av.open(str(path), format="wav", options=_WAV_OPTIONS)
    return av.open(str(path))


def _is_pcm_wav(path: Path) -> bool:
    """Whether the file starts RIFF/WAVE with a PCM or float `fmt ` chunk first."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(48)
    except OSError:
        return False  # let av.open say why
    if len(head) < 22 or head[:4] != b"RIFF" or head[8:16] != b"WAVEfmt ":
        return False
    tag = int.from_bytes(head[20:22], "little")
    if tag == _WAVE_FORMAT_EXTENSIBLE and len(head) >= 46:
        tag = int.from_bytes(head[44:46], "little")  # the sub-format GUID's first two bytes
    return tag in _PCM_TAGS


def probe_video(path: str | Path, count_frames: bool = True) -> VideoProbe:
    """Probe a video file, counting its frames exactly by demuxing (no decoding)."""
    with av.open(str(path)) as container:
        return probe_container(container, str(path), count_frames)


def probe_container(container: InputContainer, path: str, count_frames: bool = True) -> VideoProbe:
    """Probe an open file; without count_frames, frames and duration are the header's claims."""
    if not container.streams.video:
        raise ValueError(f"{path}: no video stream")
    stream = container.streams.video[0]
    ctx = stream.codec_context
    time_base = Fraction(stream.time_base or 1)
    if count_frames:
        frames, span, reordered = _scan_packets(container, stream)
    else:
        frames, span, reordered = stream.frames, stream.duration or 0, ctx.has_b_frames
    audio = container.streams.audio[0] if container.streams.audio else None
    return VideoProbe(
        path=path,
        codec=ctx.name,
        profile=ctx.profile,
        width=stream.width,
        height=stream.height,
        fps=Fraction(stream.average_rate or stream.guessed_rate or 0),
        frames=frames,
        duration_s=float(span * time_base),
        pix_fmt=ctx.pix_fmt,
        time_base=time_base,
        has_b_frames=bool(reordered),
        extradata_sha256=hashlib.sha256(ctx.extradata or b"").hexdigest(),
        audio_codec=audio.codec_context.name if audio else None,
        audio_sample_rate_hz=audio.codec_context.sample_rate if audio else None,
        audio_channels=audio.codec_context.channels if audio else None,
    )


def _scan_packets(container: InputContainer, stream: VideoStream) -> tuple[int, int, bool]:
    """Demux a video stream: (packets, first start to last end in ticks, pts ever go backwards)."""
    frames, first, end, top = 0, 0, 0, 0
    reordered = False
    for packet in container.demux(stream):
        pts = packet.pts if packet.pts is not None else packet.dts
        if pts is None:
            continue  # the demuxer's final flush packet
        frames += 1
        stop = pts + (packet.duration or 0)
        if frames == 1:
            first, top, end = pts, pts, stop
            continue
        reordered = reordered or pts < top
        top, first, end = max(top, pts), min(first, pts), max(end, stop)
    return frames, end - first, reordered


def count_audio_samples(path: str | Path) -> tuple[int, int]:
    """Decode the first audio stream and return (samples per channel, sample rate in Hz)."""
    with open_media(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return samples, stream.codec_context.sample_rate


def decode_first_frame(path: str | Path) -> bool:
    """Return whether the first video frame of a file decodes.

    Decoding every frame (a renderer's short GOPs give no keyframe to seek to near the end) is
    left to the QC gates of the joined video, which decode each frame once.
    """
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return next(container.decode(stream), None) is not None
