"""Typed records passed between the pipeline stages (manifest → plan → render → verify → publish).

Every record is a frozen dataclass of plain values (paths as strings) so Prefect can hash, pickle
and log it, and ``to_dict`` turns it into JSON for sidecars, the ledger and results.parquet.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Resolution = Literal["480p", "720p"]
RowStatus = Literal["published", "failed", "skipped"]

# LongCat-Video-Avatar 1.0 renders at 16 fps: 93 frames for the first segment, then 80 new frames
# for each continuation segment (13 of its 93 are conditioning frames carried over from the last).
FPS = 16
FIRST_SEGMENT_FRAMES = 93
CONTINUATION_FRAMES = 80


def to_dict(record: Any) -> dict[str, Any]:
    """Return a JSON-ready dict of a record (nested records included)."""
    return dataclasses.asdict(record)


@dataclass(frozen=True)
class Row:
    """One validated manifest row = one output video."""

    index: int  # 0-based position in the manifest file
    id: str
    audio: str  # absolute local path or fsspec URL, resolved against the manifest's folder
    prompt: str | None = None
    image: str | None = None  # absolute local path or fsspec URL
    negative_prompt: str | None = None
    resolution: Resolution = "480p"
    seed: int | None = None
    num_inference_steps: int | None = None
    text_guidance_scale: float | None = None
    audio_guidance_scale: float | None = None
    num_segments: int | None = None  # user override; None = derived from the audio duration
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough columns, untouched


@dataclass(frozen=True)
class RowError:
    """A problem with one row (or the whole manifest when row is None), before or during a run."""

    row: int | None
    id: str | None
    column: str | None
    reason: str
    kind: str = "invalid"  # machine-readable class, e.g. duplicate_id, missing_file, not_audio

    def __str__(self) -> str:
        where = "manifest" if self.row is None else f"row {self.row}"
        if self.id:
            where += f" (id={self.id})"
        if self.column:
            where += f", column '{self.column}'"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class AudioInfo:
    """What probing a row's narration found, plus the decoded PCM copy in the work dir."""

    source: str  # the row's audio URL/path as given (resolved)
    sha256: str  # of the source bytes
    duration_s: float  # exact: decoded samples / sample rate
    sample_rate_hz: int  # of the source
    channels: int
    codec: str
    pcm_path: str  # local 16-bit WAV, source rate and channels (≤2), decoded once: the master
    local_path: str | None = None  # the fetched source file, untouched (AAC is muxed as is)


@dataclass(frozen=True)
class Chunk:
    """A span of a row's audio that is rendered as one unit (one fal request)."""

    row_id: str
    index: int
    start_s: float
    end_s: float
    num_segments: int
    fps: int = FPS  # v1.0 (fal and local): 16; local v1.5: 25

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_frames(self) -> int:
        return FIRST_SEGMENT_FRAMES + CONTINUATION_FRAMES * (self.num_segments - 1)

    @property
    def video_s(self) -> float:
        return self.num_frames / self.fps

    def frame_span(self, is_last: bool, fps: int | None = None) -> tuple[int, int]:
        """Frames [first, last) of the row's video that belong to this chunk's audio span.

        Boundaries round to the nearest frame so neighbouring chunks neither overlap nor leave a
        gap; the last chunk rounds up so the video covers all of the narration.
        """
        fps = fps or self.fps
        first, last = round(self.start_s * fps), round(self.end_s * fps)
        if is_last:
            last = max(last, math.ceil(self.end_s * fps - 1e-6))
        return first, last


@dataclass(frozen=True)
class RowPlan:
    """A row with its probed audio, its chunks and what rendering it is expected to cost."""

    row: Row
    audio: AudioInfo
    chunks: tuple[Chunk, ...]
    seed: int  # the row's seed, or one derived from its id so reruns reproduce
    billable_units: float
    estimated_cost_usd: float
    input_hash: str  # sha256 over audio, image and every parameter that changes the render
    image_path: str | None = None  # local copy of the row's portrait, fetched and checked

    @property
    def num_segments(self) -> int:
        return sum(c.num_segments for c in self.chunks)

    @property
    def video_s(self) -> float:
        return sum(c.video_s for c in self.chunks)


@dataclass(frozen=True)
class ChunkVideo:
    """A rendered chunk: a local MP4 plus what the backend reported about it."""

    row_id: str
    chunk_index: int
    path: str  # local MP4 in the work dir
    sha256: str
    backend: str
    request_id: str | None = None
    seed: int | None = None
    billable_units: float = 0.0
    cost_usd: float = 0.0
    timings_s: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The outcome of a QC gate: passed, and if not, why (one reason per failed check)."""

    passed: bool
    reasons: tuple[str, ...] = ()
    measured: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RowResult:
    """One line of results.parquet."""

    id: str
    status: RowStatus
    video_url: str | None = None
    sidecar_url: str | None = None
    duration_s: float | None = None
    segments: int | None = None
    cost_usd: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
