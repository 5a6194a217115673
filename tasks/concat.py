"""Concatenate stage: join a row's rendered chunks into one MP4 and mux the master narration once.

The master AAC track is made early (encode_master_audio) so joining is a pure stream copy; chunks
are re-encoded only when a copy cannot be exact (mismatched streams, a cut inside a B-frame run).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
from av.audio.stream import AudioStream
from av.container import InputContainer, OutputContainer
from av.packet import Packet
from av.stream import Stream
from av.video.stream import VideoStream

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.media import VideoProbe, open_media, probe_container, probe_video
from avatarflow.tasks.records import ChunkVideo, RowPlan
from avatarflow.tasks.storage import writing
from avatarflow.tasks.workdir import WorkDir

log = logging.getLogger(__name__)

# Sample rates the AAC encoder accepts; anything else is resampled to 48 kHz.
AAC_SAMPLE_RATES = {
    8000,
    11025,
    12000,
    16000,
    22050,
    24000,
    32000,
    44100,
    48000,
    64000,
    88200,
    96000,
}
DEFAULT_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1", 8: "7.1"}
REENCODE_OPTIONS = {"crf": "18", "preset": "veryfast"}  # visually lossless, still ~realtime on CPU

if TYPE_CHECKING:
    AnyPacket = Packet[Any]  # PyAV's packets are generic only in its type stubs
# A function that adds the video stream to the output and returns it with its packets, in order.
VideoSource = Callable[[OutputContainer], "tuple[Stream, Iterator[AnyPacket]]"]


class _CannotCopy(Exception):
    """A chunk cannot be cut exactly by stream copy; the caller re-encodes instead."""


def encode_master_audio(source_path: str | Path, dest_path: str | Path) -> str:
    """Write the narration as an AAC .m4a: copied untouched if already AAC, else encoded once."""
    dest = Path(dest_path)
    with writing(dest) as tmp, open_media(source_path) as src:
        if not src.streams.audio:
            raise ValueError(f"{source_path}: no audio stream")
        stream = src.streams.audio[0]
        with av.open(str(tmp), "w", format="mp4") as out:
            if stream.codec_context.name == "aac":
                _copy_audio(src, stream, out)
            else:
                _encode_aac(src, stream, out)
    return str(dest)


def _copy_audio(src: InputContainer, stream: AudioStream, out: OutputContainer) -> None:
    """Remux the AAC packets as they are (an ADTS source gets its headers moved by the muxer)."""
    out_stream = out.add_stream_from_template(stream)
    for packet in src.demux(stream):
        if packet.dts is not None:
            packet.stream = out_stream
            out.mux(packet)


def _encode_aac(src: InputContainer, stream: AudioStream, out: OutputContainer) -> None:
    """Decode any audio and encode it to AAC at the source's rate and channel layout."""
    ctx = stream.codec_context
    rate = ctx.sample_rate if ctx.sample_rate in AAC_SAMPLE_RATES else 48000
    layout = ctx.layout.name
    if layout.endswith("channels"):  # unordered (e.g. WAV without a channel mask): pick the default
        layout = DEFAULT_LAYOUTS.get(ctx.channels, "stereo")
    # The "fast" coder: ~3.5× less CPU than the default two-loop search, and by its author
    # "very decent at 128kbps" (FFmpeg commit c92cc2d5); narration is speech at 128-192 kb/s.
    out_stream = out.add_stream("aac", rate=rate, layout=layout, options={"aac_coder": "fast"})
    out_stream.bit_rate = 128_000 if ctx.channels == 1 else 192_000
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    written = 0
    for frame in itertools.chain(src.decode(stream), [None]):
        if frame is not None:
            frame.pts = None  # sources may start late or jump; the master starts at sample 0
        for chunk in resampler.resample(frame):
            # Timestamps from sample 0 let the encoder mark its priming samples (pts < 0), which
            # the MP4 edit list then hides: otherwise the narration would start late.
            chunk.pts, chunk.time_base = written, Fraction(1, rate)
            written += chunk.samples
            out.mux(out_stream.encode(chunk))
    out.mux(out_stream.encode(None))


def check_uniform(probes: Sequence[VideoProbe]) -> list[str]:
    """List every stream parameter in which a chunk differs from chunk 0 (empty: uniform)."""
    return [
        f"chunk {index}: {difference}"
        for index, probe in enumerate(probes[1:], start=1)
        for difference in _differences(probe, probes[0])
    ]


def _differences(probe: VideoProbe, reference: VideoProbe) -> list[str]:
    """The stream parameters a stream copy needs to be equal, where probe differs from chunk 0."""
    found = []
    for name in ("codec", "profile", "width", "height", "fps", "pix_fmt", "time_base"):
        ours, theirs = getattr(probe, name), getattr(reference, name)
        if ours != theirs:
            found.append(f"{name} {ours} differs from chunk 0 ({theirs})")
    if probe.extradata_sha256 != reference.extradata_sha256:
        found.append("codec headers (SPS/PPS) differ from chunk 0")
    return found


def concat_row(
    chunk_paths: Sequence[str | Path],
    chunk_frames: Sequence[int],
    master_audio_path: str | Path,
    out_path: str | Path,
    fps: int = 16,
) -> str:
    """Join the first chunk_frames[k] frames of each chunk, mux the master audio, write out_path."""
    if not chunk_paths or len(chunk_paths) != len(chunk_frames) or min(chunk_frames) < 1:
        raise ValueError(f"{len(chunk_paths)} chunk files for frame counts {list(chunk_frames)}")
    paths = [str(path) for path in chunk_paths]
    end = Fraction(sum(chunk_frames), fps)
    try:
        _mux(out_path, master_audio_path, end, _copy_source(paths, chunk_frames, fps))
        return str(out_path)
    except _CannotCopy as exc:
        log.info("re-encoding %s: %s", out_path, exc)
    probes = [probe_video(path) for path in paths]
    for index, (probe, frames) in enumerate(zip(probes, chunk_frames, strict=True)):
        if probe.duration_s * fps < frames - 1e-6:
            raise ValueError(f"chunk {index} lasts {probe.duration_s:.3f} s, need {frames} frames")
    size = (probes[0].width // 2 * 2, probes[0].height // 2 * 2)
    _mux(out_path, master_audio_path, end, _reencode_source(probes, chunk_frames, fps, size))
    return str(out_path)


def _copy_source(paths: Sequence[str], chunk_frames: Sequence[int], fps: int) -> VideoSource:
    """Stream-copy the chunks' first packets, rewriting timestamps into one continuous timeline."""

    def add(out: OutputContainer) -> tuple[Stream, Iterator[AnyPacket]]:
        with av.open(paths[0]) as first:
            reference = probe_container(first, paths[0], count_frames=False)
            stream = out.add_stream_from_template(first.streams.video[0])
        step = 1 / (fps * reference.time_base)  # one frame in the stream's time base
        if reference.fps != fps or step.denominator != 1:
            raise _CannotCopy(f"chunk 0: {float(reference.fps):g} fps in {reference.time_base}")
        return stream, _copied_packets(paths, chunk_frames, reference, step.numerator)

    return add


def _copied_packets(
    paths: Sequence[str], chunk_frames: Sequence[int], reference: VideoProbe, step: int
) -> Iterator[AnyPacket]:
    """Yield the first chunk_frames[k] packets of each chunk with continuous timestamps."""
    offset, last_dts = 0, None
    for index, (path, frames) in enumerate(zip(paths, chunk_frames, strict=True)):
        packets = _first_packets(path, index, frames, reference, step)
        shift = offset - _pts(packets[0])
        for packet in packets:
            packet.pts = _pts(packet) + shift
            packet.dts = _dts(packet) + shift
            if last_dts is not None and packet.dts <= last_dts:
                raise _CannotCopy(f"chunk {index}: decode timestamps overlap the previous chunk")
            last_dts = packet.dts
            packet.duration = step
            yield packet
        offset += frames * step


def _first_packets(
    path: str, index: int, count: int, reference: VideoProbe, step: int
) -> list[AnyPacket]:
    """Demux a chunk's first count packets, or raise _CannotCopy if copying them is not exact."""
    with av.open(path) as container:
        differences = _differences(probe_container(container, path, False), reference)
        if differences:
            raise _CannotCopy(f"chunk {index}: {differences[0]}")
        timed = (p for p in container.demux(container.streams.video[0]) if p.pts is not None)
        packets = list(itertools.islice(timed, count))
    if len(packets) < count:
        raise ValueError(f"chunk {index} has {len(packets)} frames, need {count}")
    start = _pts(packets[0])
    # Exact only if these packets present exactly the first frames on the frame grid: then no kept
    # frame references a dropped one (a B-frame run cut in two fails this).
    presented = sorted(_pts(p) for p in packets)
    if not packets[0].is_keyframe or presented != list(range(start, start + count * step, step)):
        raise _CannotCopy(f"chunk {index}: cutting at frame {count} splits reordered frames")
    return packets


def _pts(packet: AnyPacket) -> int:
    """A demuxed packet's presentation time (only the final flush packet has none)."""
    assert packet.pts is not None
    return packet.pts


def _dts(packet: AnyPacket) -> int:
    """A packet's decode time (its presentation time when the muxer left it unset)."""
    return packet.dts if packet.dts is not None else _pts(packet)


def _reencode_source(
    probes: Sequence[VideoProbe], chunk_frames: Sequence[int], fps: int, size: tuple[int, int]
) -> VideoSource:
    """Decode the chunks, resample them to fps and size, and encode one uniform H.264 stream."""

    def add(out: OutputContainer) -> tuple[Stream, Iterator[AnyPacket]]:
        stream = out.add_stream("libx264", rate=fps, options=dict(REENCODE_OPTIONS))
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        return stream, _encoded_packets(stream, probes, chunk_frames, fps, size)

    return add


def _encoded_packets(
    stream: VideoStream,
    probes: Sequence[VideoProbe],
    chunk_frames: Sequence[int],
    fps: int,
    size: tuple[int, int],
) -> Iterator[AnyPacket]:
    """Encode the wanted frames of every chunk in order, then flush the encoder."""
    index = 0
    for probe, frames in zip(probes, chunk_frames, strict=True):
        for frame in _frames_on_grid(probe.path, frames, fps):
            out = frame.reformat(width=size[0], height=size[1], format="yuv420p")
            out.pts, out.time_base = index, Fraction(1, fps)
            index += 1
            yield from stream.encode(out)
    yield from stream.encode(None)


def _frames_on_grid(path: str, count: int, fps: int) -> Iterator[av.VideoFrame]:
    """Yield count frames at 1/fps steps: the frame on screen at each step, whatever the fps."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        emitted, shown, start = 0, None, None
        for frame in container.decode(stream):
            start = frame.time if start is None else start
            # Emit the previous frame for every grid step that passes before this one appears.
            while (
                shown is not None and emitted < count and frame.time - start > emitted / fps + 1e-6
            ):
                yield shown
                emitted += 1
            shown = frame
        while shown is not None and emitted < count:
            yield shown
            emitted += 1


def _mux(
    out_path: str | Path, master_audio_path: str | Path, end: Fraction, video: VideoSource
) -> None:
    """Write video plus the master audio (cut at the video's end) as a faststart MP4, atomically."""
    with (
        writing(out_path) as tmp,
        av.open(str(master_audio_path)) as master,
        av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"}) as out,
    ):
        video_stream, packets = video(out)
        audio_in = master.streams.audio[0]
        audio_stream = out.add_stream_from_template(audio_in)
        assert audio_in.time_base is not None  # set by the demuxer
        audio_tb = Fraction(audio_in.time_base)
        end_ticks = math.ceil(end / audio_tb)  # audio packets starting before the video ends
        audio = (p for p in master.demux(audio_in) if p.pts is not None and p.pts < end_ticks)
        pending, scale = next(audio, None), None
        for packet in packets:
            if scale is None:  # cross-multiplied time bases: compare timestamps as integers
                video_tb = packet.time_base
                scale = (
                    audio_tb.numerator * video_tb.denominator,
                    video_tb.numerator * audio_tb.denominator,
                )
            # Interleave by time so players can stream the file from the start.
            while pending is not None and _dts(pending) * scale[0] <= _dts(packet) * scale[1]:
                pending.stream = audio_stream
                out.mux(pending)
                pending = next(audio, None)
            packet.stream = video_stream
            out.mux(packet)
        for rest in itertools.chain([] if pending is None else [pending], audio):
            rest.stream = audio_stream
            out.mux(rest)


def prepare_master_audio(plan: RowPlan, config: BatchConfig) -> str:
    """Encode the row's narration to AAC once, while its chunks render."""
    dest = WorkDir(config.work_path).row(plan.row.id, plan.input_hash) / "master.m4a"
    if dest.exists():
        return str(dest)
    # An AAC source is copied untouched while it is still there; anything else is encoded from
    # the PCM master the audio stage decoded it to (no second decode of an MP3 or FLAC).
    source = plan.audio.local_path
    if plan.audio.codec != "aac" or not source or not Path(source).exists():
        source = plan.audio.pcm_path
    return encode_master_audio(source, dest)


def chunk_frames(plan: RowPlan) -> list[int]:
    """Frames of each chunk's span that the joined video keeps, in chunk order."""
    spans = [c.frame_span(plan.is_last(c)) for c in plan.chunks]
    return [last - first for first, last in spans]


def concat_chunks(plan: RowPlan, videos: list[ChunkVideo], master: str, config: BatchConfig) -> str:
    """Join each chunk's span of frames (chunks in order) and mux the master narration."""
    frames = chunk_frames(plan)
    out = WorkDir(config.work_path).row(plan.row.id, plan.input_hash) / f"{plan.row.id}.mp4"
    return concat_row([v.path for v in videos], frames, master, out, plan.chunks[0].fps)
