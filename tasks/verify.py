"""QC gates: check each rendered chunk before it is joined, and the final MP4 before publishing.

Each gate returns a Verdict with one reason per failed check and what it measured, never raises on a
bad file: a broken file is a failed verdict that the flow records against the row.
"""

from __future__ import annotations

from pathlib import Path

import av
from prefect import task

from tasks.backends import renderer_class
from tasks.config import BatchConfig
from tasks.media import VideoProbe, count_audio_samples, decode_first_and_last_frame, probe_video
from tasks.records import V1_GRID, ChunkVideo, RowPlan, Verdict

# Image-audio buckets keep the nominal area of their resolution within this ratio.
AREA_TOLERANCE = (0.8, 1.25)
AAC_FRAME_SAMPLES = 1024
AAC_MAX_PRIMING_SAMPLES = 2112  # the largest encoder delay in common use (Apple's encoder)


def verify_chunk(
    path: str | Path, expected_frames: int, expected_area: int | None, fps: int = V1_GRID.fps
) -> Verdict:
    """Check a rendered chunk: H.264, even size of the right area, fps, enough frames, decodable.

    expected_area None skips the size check (a checkpoint that renders at its own size).
    """
    try:
        probe = probe_video(path)
        first_ok, last_ok = decode_first_and_last_frame(path)
    except (OSError, ValueError, av.FFmpegError) as exc:
        return Verdict(False, (f"unreadable video: {exc}",), {})
    reasons = _check_video_stream(probe, fps)
    if expected_area is not None:
        reasons += _check_size(probe, expected_area)
    if probe.frames < expected_frames:
        reasons.append(f"{probe.frames} frames, expected at least {expected_frames}")
    if not first_ok:
        reasons.append("first frame does not decode")
    if not last_ok:
        reasons.append("last frame does not decode")
    measured = {**probe.to_json(), "expected_frames": expected_frames}
    return Verdict(not reasons, tuple(reasons), measured)


def verify_final(
    path: str | Path, audio_duration_s: float, audio_sample_rate_hz: int, fps: int = V1_GRID.fps
) -> Verdict:
    """Check a final MP4: H.264 + AAC, length equal to the narration, faststart, sane streams."""
    try:
        probe = probe_video(path)
        samples, sample_rate = count_audio_samples(path) if probe.audio_codec else (0, 0)
        moov_first = _moov_before_mdat(Path(path))
    except (OSError, ValueError, av.FFmpegError) as exc:
        return Verdict(False, (f"unreadable video: {exc}",), {})
    reasons = _check_video_stream(probe, fps)
    frame_s = 1 / fps
    if abs(probe.frames - audio_duration_s * fps) > 1:
        reasons.append(f"{probe.frames} frames for {audio_duration_s:.3f} s of audio at {fps} fps")
    if abs(probe.duration_s - audio_duration_s) > frame_s:
        reasons.append(f"video lasts {probe.duration_s:.3f} s, audio {audio_duration_s:.3f} s")
    reasons += _check_audio(probe, samples, sample_rate, audio_duration_s, audio_sample_rate_hz)
    if not moov_first:
        reasons.append("moov atom is not before mdat (not faststart)")
    measured = {
        **probe.to_json(),
        "audio_samples": samples,
        "expected_audio_samples": round(audio_duration_s * audio_sample_rate_hz),
        "faststart": moov_first,
    }
    return Verdict(not reasons, tuple(reasons), measured)


def _check_video_stream(probe: VideoProbe, fps: int) -> list[str]:
    """Codec, frame rate, pixel format and even dimensions (H.264 4:2:0 needs them)."""
    reasons = []
    if probe.codec != "h264":
        reasons.append(f"video codec {probe.codec}, expected h264")
    if probe.fps != fps:
        reasons.append(f"frame rate {float(probe.fps):g} fps, expected {fps}")
    if probe.width <= 0 or probe.height <= 0 or probe.width % 2 or probe.height % 2:
        reasons.append(f"size {probe.width}x{probe.height} is not a positive even size")
    if probe.pix_fmt not in ("yuv420p", "yuvj420p"):
        reasons.append(f"pixel format {probe.pix_fmt}, expected yuv420p")
    if probe.frames == 0:
        reasons.append("no video frames")
    return reasons


def _check_size(probe: VideoProbe, expected_area: int) -> list[str]:
    """The frame area must match the requested resolution's within the bucket tolerance."""
    ratio = probe.width * probe.height / expected_area
    low, high = AREA_TOLERANCE
    if not low <= ratio <= high:
        return [f"size {probe.width}x{probe.height} does not have the planned area {expected_area}"]
    return []


def _check_audio(
    probe: VideoProbe, samples: int, sample_rate: int, duration_s: float, master_rate: int
) -> list[str]:
    """AAC at the master's rate, decoded length equal to the master's within one AAC frame."""
    if probe.audio_codec is None:
        return ["no audio stream"]
    reasons = []
    if probe.audio_codec != "aac":
        reasons.append(f"audio codec {probe.audio_codec}, expected aac")
    if sample_rate != master_rate:
        reasons.append(f"audio sample rate {sample_rate} Hz, master has {master_rate} Hz")
    if not probe.audio_channels or not 1 <= probe.audio_channels <= 8:
        reasons.append(f"audio has {probe.audio_channels} channels")
    expected = duration_s * sample_rate
    if abs(samples - expected) > AAC_FRAME_SAMPLES + AAC_MAX_PRIMING_SAMPLES:
        reasons.append(f"audio decodes to {samples} samples, master has {expected:.0f}")
    return reasons


def _moov_before_mdat(path: Path) -> bool:
    """Walk the top-level MP4 boxes: faststart files carry the index (moov) before the media."""
    with path.open("rb") as f:
        while header := f.read(8):
            if len(header) < 8:
                break
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if kind in (b"moov", b"mdat"):
                return kind == b"moov"
            if size == 1:  # 64-bit size follows the type
                size = int.from_bytes(f.read(8), "big") - 8
            elif size == 0:  # box runs to the end of the file
                break
            f.seek(size - 8, 1)
    return False


class QCError(RuntimeError):
    """A QC gate failed; the message lists every reason."""


def _raise_if_failed(verdicts: dict[str, Verdict]) -> None:
    failed = [f"{name}: {'; '.join(v.reasons)}" for name, v in verdicts.items() if not v.passed]
    if failed:
        raise QCError(" | ".join(failed))


@task(name="verify-chunks")
def verify_chunks(plan: RowPlan, videos: list[ChunkVideo], config: BatchConfig) -> list[Verdict]:
    """Check every rendered chunk of a row (in chunk order) before anything is joined."""
    backend = renderer_class(config.backend)
    area = backend.expected_area(config, plan.row.resolution)
    verdicts = []
    for video in videos:
        chunk = plan.chunks[video.chunk_index]
        expected = backend.expected_frames(plan, chunk)
        verdicts.append(verify_chunk(video.path, expected, area, chunk.fps))
    _raise_if_failed({f"chunk {v.chunk_index}": d for v, d in zip(videos, verdicts, strict=True)})
    return verdicts


@task(name="verify-video")
def verify_video(plan: RowPlan, video_path: str, config: BatchConfig) -> Verdict:
    """Check the joined, muxed video against the narration before it is published."""
    fps = plan.chunks[0].fps
    verdict = verify_final(video_path, plan.audio.duration_s, plan.audio.sample_rate_hz, fps)
    _raise_if_failed({"final": verdict})
    return verdict
