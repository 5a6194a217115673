"""Typed records passed between the stages (manifest → plan → render → verify → publish) and kept
in the run ledger, the sidecar and the progress stream.

Every record is a frozen dataclass of plain values (paths as strings), so Prefect can hash, pickle
and log it; `to_json` / `from_json` round-trip any of them through pydantic, which also gives the
sidecar its JSON Schema (manifests/sidecar.schema.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from avatarflow.tasks.config import CaptionSettings

Resolution = Literal["480p", "720p"]
# A row's final state: its video is at <id>.mp4, it has none, or it failed QC (_rejected/<id>.mp4).
RowStatus = Literal["published", "failed", "rejected"]
# What this run did for a row: rendered (paid or computed) something, reused only the ledger's
# chunks, skipped it (already published, or held back by the budget), or failed before a verdict.
RunAction = Literal["rendered", "reused", "skipped", "failed"]
GateStatus = Literal["passed", "failed", "skipped"]
T = TypeVar("T")

MAX_INFERENCE_STEPS = 200
MAX_GUIDANCE_SCALE = 20.0
MAX_PROMPT_CHARS = 2000  # far above any useful prompt; stops a pasted document reaching the model


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    """One pydantic adapter per record type (building one is slow; a race only builds it twice)."""
    adapter = _ADAPTERS.get(kind)
    if adapter is None:
        adapter = _ADAPTERS[kind] = TypeAdapter(kind)
    return adapter


def to_json(record: Any) -> dict[str, Any]:
    """A JSON-ready dict of a record (nested records included)."""
    doc: dict[str, Any] = _adapter(type(record)).dump_python(record, mode="json")
    return doc


def from_json(kind: type[T], doc: Any) -> T:
    """Rebuild a record of `kind` from what to_json wrote (raises pydantic.ValidationError)."""
    record: T = _adapter(kind).validate_python(doc)
    return record


def json_schema(kind: type) -> dict[str, Any]:
    """The JSON Schema of a record type."""
    schema = _adapter(kind).json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_bytes(record: Any) -> bytes:
    """A record as stable, indented JSON bytes (sidecars, ledger documents)."""
    return json.dumps(to_json(record), indent=2, sort_keys=True).encode() + b"\n"


# --- the model's frame grid ----------------------------------------------------------------------


@dataclass(frozen=True)
class FrameGrid:
    """The segment grid a LongCat-Video-Avatar render follows.

    The first segment renders 93 frames; each continuation segment 80 new ones (13 of its 93 are
    conditioning frames carried over). v1.0 runs at 16 fps (5.8125 s, then +5 s per segment); the
    local v1.5 checkpoint at 25 fps.
    """

    fps: int = 16
    first_frames: int = 93
    continuation_frames: int = 80

    def frames(self, num_segments: int) -> int:
        """Frames that num_segments segments render: 93 + 80(n − 1)."""
        return self.first_frames + self.continuation_frames * (num_segments - 1)

    def video_s(self, num_segments: int) -> float:
        """Seconds of video that num_segments segments render."""
        return self.frames(num_segments) / self.fps

    def segments_for(self, duration_s: float) -> int:
        """Segments needed to cover duration_s: 1 + ceil(max(0, D − 93/fps) / (80/fps))."""
        # counted in frames, rounded to a millionth of a frame (far below one audio sample), so
        # float noise never adds a segment: 5.8125 s is exactly 93 frames at 16 fps
        extra_frames = max(0.0, round(duration_s * self.fps - self.first_frames, 6))
        return 1 + math.ceil(extra_frames / self.continuation_frames)

    def longest_span_s(self, target_s: float) -> float:
        """The longest whole-segment span of video that fits in target_s (at least one segment)."""
        extra = math.floor(target_s * self.fps) - self.first_frames
        return self.video_s(max(1, 1 + extra // self.continuation_frames))

    def segment_joins(self, num_frames: int) -> list[int]:
        """Frame indices where one model segment ends and the next begins, within num_frames."""
        return list(range(self.first_frames, num_frames, self.continuation_frames))


V1_GRID = FrameGrid(16)


# --- manifest rows --------------------------------------------------------------------------------

_Prompt = Annotated[str | None, Field(max_length=MAX_PROMPT_CHARS)]
_Scale = Annotated[float | None, Field(ge=0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False)]


class RenderParams(BaseModel):
    """A row's model parameters: the one source of truth for the manifest columns that reach the
    model. Field names are fal's API names; they feed the input hash, the fal payload, the sidecar
    and the local pipeline's keyword arguments, so a new parameter is one field here."""

    model_config = ConfigDict(frozen=True)

    prompt: _Prompt = Field(
        None, description="Scene/behaviour text; the model's default if absent."
    )
    negative_prompt: _Prompt = Field(None, description="The model's default if absent.")
    resolution: Resolution = "480p"
    num_inference_steps: int | None = Field(None, ge=1, le=MAX_INFERENCE_STEPS)
    text_guidance_scale: _Scale = None
    audio_guidance_scale: _Scale = None

    def given(self) -> dict[str, Any]:
        """The parameters the row set (None means: the model's default)."""
        return self.model_dump(exclude_none=True)


@dataclass(frozen=True)
class Row:
    """One validated manifest row = one output video."""

    index: int  # 0-based position in the manifest file
    id: str
    audio: str  # absolute local path or fsspec URL, resolved against the manifest's folder
    params: RenderParams = field(default_factory=RenderParams)
    image: str | None = None  # absolute local path or fsspec URL
    seed: int | None = None
    num_segments: int | None = None  # user override; None = derived from the audio duration
    extra: dict[str, Any] = field(default_factory=dict)  # passthrough columns, untouched
    transcript: str | None = None  # the narration's script: the captions' words

    @property
    def resolution(self) -> Resolution:
        return self.params.resolution


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


# --- planning -------------------------------------------------------------------------------------


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
    fps: int = V1_GRID.fps  # v1.0 (fal and local): 16; local v1.5: 25

    @property
    def grid(self) -> FrameGrid:
        return FrameGrid(self.fps)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def num_frames(self) -> int:
        return self.grid.frames(self.num_segments)

    @property
    def video_s(self) -> float:
        return self.grid.video_s(self.num_segments)

    def frame_span(self, is_last: bool) -> tuple[int, int]:
        """Frames [first, last) of the row's video that belong to this chunk's audio span.

        Boundaries round to the nearest frame so neighbouring chunks neither overlap nor leave a
        gap; the last chunk rounds up so the video covers all of the narration.
        """
        first, last = round(self.start_s * self.fps), round(self.end_s * self.fps)
        if is_last:
            last = max(last, math.ceil(self.end_s * self.fps - 1e-6))
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
    image_sha256: str | None = None
    route: RowRoute | None = None  # --backend auto: where the row renders and why

    @property
    def num_segments(self) -> int:
        return sum(c.num_segments for c in self.chunks)

    @property
    def video_s(self) -> float:
        return sum(c.video_s for c in self.chunks)

    def is_last(self, chunk: Chunk) -> bool:
        return chunk.index == len(self.chunks) - 1


@dataclass(frozen=True)
class RowPlanTotals:
    """Totals over planned rows (the `avatarflow plan` footer, the report's summary)."""

    rows: int = 0
    chunks: int = 0
    segments: int = 0
    audio_s: float = 0.0
    video_s: float = 0.0
    billable_units: float = 0.0
    estimated_cost_usd: float = 0.0

    @classmethod
    def of(cls, plans: Any) -> RowPlanTotals:
        """Sum a sequence of RowPlans (rounded only to drop float noise)."""
        plans = list(plans)
        return cls(
            rows=len(plans),
            chunks=sum(len(p.chunks) for p in plans),
            segments=sum(p.num_segments for p in plans),
            audio_s=round(sum(p.audio.duration_s for p in plans), 6),
            video_s=round(sum(p.video_s for p in plans), 6),
            billable_units=round(sum(p.billable_units for p in plans), 6),
            estimated_cost_usd=round(sum(p.estimated_cost_usd for p in plans), 6),
        )


@dataclass(frozen=True)
class RowRoute:
    """Where a row of a `--backend auto` run renders and why (tasks/route.py); kept in the
    ledger before it renders, so a rerun keeps it, and in the sidecar and results."""

    backend: str
    reason: str  # one line: the predictions that chose it
    predicted_finish_at: datetime  # UTC, on the chosen backend, when it was chosen
    deadline_at: datetime  # UTC
    estimated_cost_usd: float  # on the chosen backend (0 for own GPUs)
    misses_deadline: bool = False  # predicted to finish after the deadline where it goes
    fal_cost_usd: float = 0.0  # what fal would charge for the row (all-fal's cost)
    started_at: datetime | None = None  # UTC: the row's render began (its slot was granted)
    finished_at: datetime | None = None  # UTC: its render ended


# --- rendering ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """Where a chunk's wall time went, by phase (seconds); rows add their chunks' up."""

    upload_s: float = 0.0
    queue_s: float = 0.0
    run_s: float = 0.0
    download_s: float = 0.0
    render_s: float = 0.0
    encode_s: float = 0.0

    def __add__(self, other: Timings) -> Timings:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Timings(*(a + b for a, b in pairs))


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
    timings: Timings = field(default_factory=Timings)
    worker: str | None = None  # the process that rendered it (a Dask worker's name, or host:pid)
    model_load: Literal["loaded", "reused"] | None = None  # local model: loaded for it, or resident
    reused: bool = False  # taken from the ledger by this run, not rendered by it


@dataclass(frozen=True)
class Word:
    """One spoken word and its time in the narration: from speech recognition, or a script word
    aligned to the recognised ones (captions)."""

    text: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Recognised:
    """A row's recognised narration as the ledger keeps it (tasks/speech.py): a rerun neither
    recognises nor pays again. cost_usd is part of what the row paid (results' cost_usd)."""

    words: tuple[Word, ...]
    backend: str
    model: str  # the Whisper folder, or the fal app
    audio_sha256: str  # of the narration that was recognised
    request_id: str | None = None
    billable_units: float = 0.0
    cost_usd: float = 0.0


# --- QC and results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateResult:
    """One QC gate's outcome (tasks/qc.py): the value it measured, the threshold it was held to,
    and why; the sidecar keeps it as it is."""

    name: str
    status: GateStatus
    value: float | None = None
    threshold: float | None = None
    detail: str = ""
    measured: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        """True or False, None when the gate was skipped."""
        return None if self.status == "skipped" else self.status == "passed"


# Extra measures of a gate that get their own results column next to its value and threshold.
_EXTRA_COLUMNS = {
    "lipsync": ("corr", "min_corr"),
    "seams": ("jump", "jump_max"),
    "captions": ("wer", "max_wer"),
}


@dataclass(frozen=True)
class QCReport:
    """The QC result of one video: its structural checks (tasks/verify.py) and QC gates
    (tasks/qc.py). A chunk gets the structural checks only, `avatarflow qc` the gates only, a
    row's final video both; passed is False when any check or gate failed (skips do not fail)."""

    passed: bool
    reasons: tuple[str, ...] = ()  # one per failed check or gate
    measured: dict[str, Any] = field(default_factory=dict)  # what the structural checks measured
    gates: tuple[GateResult, ...] = ()  # in report order; empty when the gates did not run
    frames: int = 0
    fps: float = 0.0
    elapsed_s: float = 0.0  # the gates' time

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the failed gates, in report order."""
        return tuple(g.name for g in self.gates if g.status == "failed")

    def gate(self, name: str) -> GateResult:
        """The result of the gate called name."""
        return next(g for g in self.gates if g.name == name)

    def with_reason(self, reason: str) -> QCReport:
        """The same report, failed, with one more reason (e.g. why no re-render followed)."""
        return dataclasses.replace(self, passed=False, reasons=(*self.reasons, reason))

    def to_columns(self) -> dict[str, Any]:
        """Flat results columns: qc_passed, qc_<gate>_{status,value,threshold,passed}, extras."""
        columns: dict[str, Any] = {"qc_passed": self.passed}
        for g in self.gates:
            prefix = f"qc_{g.name}"
            columns |= {
                f"{prefix}_status": g.status,
                f"{prefix}_value": g.value,
                f"{prefix}_threshold": g.threshold,
                f"{prefix}_passed": g.passed,
            }
            for key in _EXTRA_COLUMNS.get(g.name, ()):
                columns[f"{prefix}_{key}"] = g.measured.get(key)
        return columns


@dataclass(frozen=True)
class RowResult:
    """One line of results.parquet: the row's final state, kept across runs, and this run's part."""

    id: str
    status: RowStatus
    video_url: str | None = None
    sidecar_url: str | None = None
    duration_s: float | None = None
    segments: int | None = None
    cost_usd: float = 0.0  # paid for the row across all runs (every input hash), from the ledger
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run_action: RunAction = "failed"
    billable_units: float = 0.0  # received for the row across all runs
    first_published_at: datetime | None = None  # UTC, the first time a video reached <id>.mp4
    qc: dict[str, Any] = field(default_factory=dict)  # QCReport.to_columns() of the final video
    backend: str | None = None  # the backend that rendered the published video
    route: RowRoute | None = None  # --backend auto: why that backend, predicted and actual times
    captions: str | None = None  # the captions' text, cue after cue
    captions_vtt_url: str | None = None
    captions_srt_url: str | None = None

    @classmethod
    def failure(cls, row_id: str, error: str, extra: dict[str, Any] | None = None) -> RowResult:
        """A row that failed in this run, with the reason."""
        return cls(id=row_id, status="failed", error=error, extra=extra or {})


@dataclass(frozen=True)
class BatchOutcome:
    """What a batch run produced: one result per manifest row, and where the tables went."""

    results: tuple[RowResult, ...] = ()
    results_url: str | None = None
    report_url: str | None = None
    estimated_usd: float = 0.0  # what this run's dispatched rows were estimated to cost

    @property
    def failed(self) -> list[RowResult]:
        """Rows that are not published: failed (budget-held rows too) or rejected by QC."""
        return [r for r in self.results if r.status != "published"]

    @property
    def exit_code(self) -> int:
        """0 when every row is published (now or by an earlier run), else 1."""
        return 1 if self.failed else 0


# --- the run ledger's documents (tasks/ledger.py) -------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """Written immediately before a paid submit: the POST may reach the service from now on."""

    endpoint: str
    n: int  # 1 for the first submit of this chunk, then 2, 3 ... for resubmits
    started_at: float  # unix time


@dataclass(frozen=True)
class Request:
    """Written as soon as the service accepted a submit, before it is waited on."""

    request_id: str
    endpoint: str
    attempt: int  # the Attempt.n this request answers
    submitted_at: float
    replaced: tuple[str, ...] = ()  # earlier ids of this chunk (expired or failed), for audit


@dataclass(frozen=True)
class Published:
    """What was last published for a row, and from which inputs."""

    result: RowResult
    input_hash: str
    captions_key: str | None = None  # what its captions were made from (tasks/captions.py)


# --- the sidecar (<id>.json) ----------------------------------------------------------------------


@dataclass(frozen=True)
class SidecarAudio:
    """The narration as it was read."""

    source: str  # URL with credentials and signatures removed
    sha256: str
    duration_s: float
    sample_rate_hz: int
    channels: int
    codec: str


@dataclass(frozen=True)
class SidecarInputs:
    audio: SidecarAudio
    image: str | None
    image_sha256: str | None
    input_hash: str


@dataclass(frozen=True)
class SidecarChunk:
    """One rendered chunk: its span of the narration, render metadata and hash."""

    index: int
    start_s: float
    end_s: float
    num_segments: int
    num_frames: int
    sha256: str
    request_id: str | None
    seed: int | None
    billable_units: float
    cost_usd: float
    timings: Timings
    qc: QCReport  # the chunk's structural checks
    worker: str | None = None
    model_load: Literal["loaded", "reused"] | None = None


@dataclass(frozen=True)
class SidecarRerender:
    """Why and how this video is a second render: the first one failed QC."""

    first_seed: int
    first_input_hash: str
    first_failed: tuple[str, ...]  # the QC gates the first render failed
    first_cost_usd: float  # what the first render's chunks cost (kept in the ledger)


@dataclass(frozen=True)
class SidecarCaptions:
    """The captions published with the video, and what they were made from."""

    outputs: tuple[str, ...]  # "vtt", "srt", "track" (the MP4's mov_text track)
    source: Literal["transcript", "speech"]  # whose words the cues carry
    cues: int
    recognised_words: int
    settings: CaptionSettings
    key: str  # sha256 over the transcript, settings and outputs: a change makes them again


@dataclass(frozen=True)
class Sidecar:
    """How a published video was made: inputs and hashes, model, requests, cost, timings, QC."""

    id: str
    inputs: SidecarInputs
    parameters: RenderParams
    num_segments_override: int | None
    model: str
    backend: str
    seed: int
    segments: int
    chunks: tuple[SidecarChunk, ...]
    request_ids: tuple[str, ...]
    timings: Timings
    billable_units: float
    cost_usd: float
    estimated_cost_usd: float
    qc: QCReport  # the final video's: structural checks and QC gates together
    rerender: SidecarRerender | None = None
    route: RowRoute | None = None  # --backend auto: why this backend, predicted and actual times
    captions: SidecarCaptions | None = None


# --- progress events (tasks/progress.py) ----------------------------------------------------------


@dataclass(frozen=True)
class RowsPlanned:
    """More work is known: rows to finish, chunks to render, and their estimated cost (adds up)."""

    rows: int
    chunks: int
    estimated_usd: float


@dataclass(frozen=True)
class ChunkRendered:
    id: str
    chunk: int
    cost_usd: float


@dataclass(frozen=True)
class RowFinished:
    id: str
    status: RowStatus


ProgressEvent = RowsPlanned | ChunkRendered | RowFinished
