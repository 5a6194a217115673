"""Verify stage: check each rendered chunk before it is joined, and the final MP4 before publishing.

Chunks get structural checks (codec, size, frames); a chunk that fails them fails the row. The final
video gets the structural checks (codec, length, AAC, faststart) plus the QC gates of tasks/qc.py;
a final video that fails any of them is *rejected*, not failed: it was paid for, so it is published
under _rejected/ for a person to judge. Only a final file that cannot be read at all fails the row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import av

from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.concat import chunk_frames
from avatarflow.tasks.config import QC_GATES, BatchConfig, QCSettings
from avatarflow.tasks.media import VideoProbe, count_audio_samples, decode_first_frame, probe_video
from avatarflow.tasks.qc import QCInputError, run_gates
from avatarflow.tasks.records import V1_GRID, ChunkVideo, QCReport, RowPlan

# Image-audio buckets keep the nominal area of their resolution within this ratio.
AREA_TOLERANCE = (0.8, 1.25)
AAC_FRAME_SAMPLES = 1024
AAC_MAX_PRIMING_SAMPLES = 2112  # the largest encoder delay in common use (Apple's encoder)
UNREADABLE = "unreadable video"


def verify_chunk(
    path: str | Path, expected_frames: int, expected_area: int | None, fps: int = V1_GRID.fps
) -> QCReport:
    """Check a rendered chunk before it is joined: H.264, even size of the right area, fps,
    enough frames, a first frame that decodes (the joined video's QC decodes every frame).

    expected_area None skips the size check (a checkpoint that renders at its own size).
    """
    try:
        probe = probe_video(path)
        first_ok = decode_first_frame(path)
    except (OSError, ValueError, av.FFmpegError) as exc:
        return QCReport(False, (f"{UNREADABLE}: {exc}",))
    reasons = _check_video_stream(probe, fps)
    if expected_area is not None:
        reasons += _check_size(probe, expected_area)
    if probe.frames < expected_frames:
        reasons.append(f"{probe.frames} frames, expected at least {expected_frames}")
    if not first_ok:
        reasons.append("first frame does not decode")
    measured = {**probe.to_json(), "expected_frames": expected_frames}
    return QCReport(
        not reasons, tuple(reasons), measured, frames=probe.frames, fps=float(probe.fps)
    )


def verify_final(
    path: str | Path, audio_duration_s: float, audio_sample_rate_hz: int, fps: int = V1_GRID.fps
) -> QCReport:
    """Check a final MP4: H.264 + AAC, length equal to the narration, faststart, sane streams."""
    try:
        probe = probe_video(path)
        samples, sample_rate = count_audio_samples(path) if probe.audio_codec else (0, 0)
        moov_first = _moov_before_mdat(Path(path))
    except (OSError, ValueError, av.FFmpegError) as exc:
        return QCReport(False, (f"{UNREADABLE}: {exc}",))
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
    return QCReport(
        not reasons, tuple(reasons), measured, frames=probe.frames, fps=float(probe.fps)
    )


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


def _raise_if_failed(reports: dict[str, QCReport]) -> None:
    failed = [f"{name}: {'; '.join(r.reasons)}" for name, r in reports.items() if not r.passed]
    if failed:
        raise QCError(" | ".join(failed))


def verify_chunks(plan: RowPlan, videos: list[ChunkVideo], config: BatchConfig) -> list[QCReport]:
    """Check every rendered chunk of a row (in chunk order) before anything is joined."""
    backend = renderer_class(config.backend)
    area = backend.expected_area(config, plan.row.resolution)
    reports = []
    for video in videos:
        chunk = plan.chunks[video.chunk_index]
        expected = backend.expected_frames(plan, chunk)
        reports.append(verify_chunk(video.path, expected, area, chunk.fps))
    _raise_if_failed({f"chunk {v.chunk_index}": r for v, r in zip(videos, reports, strict=True)})
    return reports


def qc_joins(plan: RowPlan, continuous: bool) -> list[int]:
    """Frame indices of the joined video where a chunk or a model segment begins.

    The concat stage keeps each chunk's first frame_span frames back to back. A per-chunk render
    starts its own segment grid (93, then every 80 frames) at its chunk's first frame; a continuous
    render is one sequence cut into chunks, so its grid runs over the whole row.
    """
    joins: set[int] = set()
    offset = 0
    for chunk, frames in zip(plan.chunks, chunk_frames(plan), strict=True):
        if offset:
            joins.add(offset)
        if not continuous:
            joins.update(
                offset + j for j in chunk.grid.segment_joins(chunk.num_frames) if j < frames
            )
        offset += frames
    if continuous:
        joins.update(plan.chunks[0].grid.segment_joins(offset))
    return sorted(joins)


def check_final(
    path: str | Path,
    plan: RowPlan,
    settings: QCSettings,
    skip: frozenset[str],
    continuous: bool,
) -> QCReport:
    """Structural checks and QC gates of a joined video; QCError only when it cannot be read."""
    fps = plan.chunks[0].fps
    structural = verify_final(path, plan.audio.duration_s, plan.audio.sample_rate_hz, fps)
    if structural.reasons[:1] and structural.reasons[0].startswith(UNREADABLE):
        raise QCError(f"final: {structural.reasons[0]}")
    try:
        report = run_gates(
            path,
            plan.audio.pcm_path,  # the row's master narration, as decoded once
            settings,
            skip,
            expected_frames=sum(chunk_frames(plan)),
            joins=qc_joins(plan, continuous),
        )
    except QCInputError as exc:
        raise QCError(f"final: {UNREADABLE}: {exc}") from None
    reasons = structural.reasons + report.reasons
    return dataclasses.replace(
        report, passed=not reasons, reasons=reasons, measured=structural.measured
    )


def verify_video(plan: RowPlan, video_path: str, config: BatchConfig) -> QCReport:
    """Check the joined, muxed video against the narration and the QC gates before publishing."""
    backend = renderer_class(config.backend)
    skip = config.qc_skip | backend.qc_not_applicable(config)  # e.g. no face in random weights
    skip &= frozenset(QC_GATES)  # the captions gate is judged with the captions
    return check_final(video_path, plan, config.qc, skip, backend.continuous)
