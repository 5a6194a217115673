"""Render stage: the Renderer protocol both backends implement, get_renderer(name), and the tasks.

A backend turns a RenderJob (one row, one or more of its chunks, local input files) into one local
MP4 per chunk plus metadata. The flow never knows which backend it drives. render_chunk is where
"never pay twice" is decided, from the run ledger (see the notes above _render_paid).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from prefect import task

from tasks import progress
from tasks.fal_client import AmbiguousSubmitError
from tasks.ledger import ChunkRecord, Ledger
from tasks.plan import chunk_wav_path, row_work_dir
from tasks.records import Chunk, ChunkVideo, RowPlan

if TYPE_CHECKING:
    from flows.settings import BatchConfig

log = logging.getLogger(__name__)

# Set on Ctrl-C: no new paid submit starts, and polls stop at their next sleep.
_STOP = threading.Event()


class RenderStopped(Exception):
    """The run is stopping (Ctrl-C): this chunk was left as it was (its request id is kept)."""


def request_stop() -> None:
    """Stop dispatching paid work in this process and wake every waiting poll."""
    _STOP.set()


def stop_requested() -> bool:
    """True once request_stop() was called."""
    return _STOP.is_set()


def wait_unless_stopped(seconds: float) -> None:
    """Sleep like time.sleep, but raise RenderStopped as soon as a stop is requested."""
    if _STOP.wait(seconds):
        raise RenderStopped("stopping: waiting on fal was interrupted; the request id is kept")


class AmbiguousChunkError(Exception):
    """A paid submit may have reached fal but its request id is unknown: not resubmitted."""

    def __init__(self, record: ChunkRecord, cause: str) -> None:
        attempt = record.attempt or {}
        when = datetime.fromtimestamp(float(attempt.get("started_at", 0)), UTC)
        super().__init__(
            f"row {record.row_id} chunk {record.chunk}: ambiguous submit to "
            f"{attempt.get('endpoint', 'fal')} at {when:%Y-%m-%d %H:%M:%S} UTC ({cause}). fal may "
            "have queued it (and will bill it), but its request id never reached the ledger and "
            "fal's queue API cannot look a request up by our key, so it is not resubmitted. "
            "Check the requests of that endpoint around that time in fal's dashboard; if there is "
            "none (or you accept paying twice), rerun with `avatarflow run ... "
            "--resubmit-ambiguous`."
        )


@dataclass(frozen=True)
class RenderJob:
    """What a backend needs to render some chunks of one row."""

    plan: RowPlan
    chunks: tuple[Chunk, ...]  # in order; one for fal, all of the row's for local
    chunk_audio_paths: tuple[str, ...]  # local WAV per chunk (the chunk's span of the narration)
    out_dir: str  # local folder for the rendered MP4s
    image_path: str | None = None  # local copy of the row's portrait, if any
    identity_video_path: str | None = None  # chunk 0's MP4: later fal chunks take a frame from it


class Renderer(Protocol):
    """A rendering backend."""

    name: ClassVar[str]
    # True: render() takes all of a row's chunks at once and continues across them in latent space.
    continuous: ClassVar[bool]

    def render(self, job: RenderJob) -> list[ChunkVideo]:
        """Render job.chunks in order, returning one ChunkVideo per chunk."""
        ...


class PaidRenderer(Renderer, Protocol):
    """A per-chunk backend whose requests are paid and outlive the process (fal)."""

    def render(
        self,
        job: RenderJob,
        on_submitted: Callable[[Any], None] | None = None,
        on_submitting: Callable[[str], None] | None = None,
    ) -> list[ChunkVideo]:
        """Render job's chunk, calling on_submitting right before and on_submitted right after
        the paid submit."""
        ...

    def resume(self, request_id: str, job: RenderJob) -> list[ChunkVideo]:
        """Poll and fetch a request submitted earlier, without submitting anything."""
        ...


def get_renderer(config: BatchConfig) -> Renderer:
    """Return the backend named by config.backend, built once per worker process."""
    if config.backend == "fal":
        from tasks.render_fal import FalRenderer

        return FalRenderer.shared(config)
    if config.backend == "local":
        from tasks.render_local import LocalRenderer

        return LocalRenderer.shared(config)
    raise ValueError(f"unknown backend {config.backend!r}: expected 'local' or 'fal'")


def renderer_is_continuous(config: BatchConfig) -> bool:
    """True when the backend renders a whole row in one call (local latent continuation)."""
    return config.backend == "local"


def _job(plan: RowPlan, chunks: tuple[Chunk, ...], config: BatchConfig, identity: str | None):
    return RenderJob(
        plan=plan,
        chunks=chunks,
        chunk_audio_paths=tuple(str(chunk_wav_path(config, plan, c.index)) for c in chunks),
        out_dir=str(row_work_dir(config, plan) / "render"),
        image_path=plan.image_path,
        identity_video_path=identity,
    )


def _rendered(video: ChunkVideo, plan: RowPlan, ledger: Ledger) -> ChunkVideo:
    ledger.record_chunk(video, plan.input_hash)
    progress.emit(
        "chunk_rendered", id=plan.row.id, chunk=video.chunk_index, cost_usd=video.cost_usd
    )
    return video


# What fal's queue API allows (docs: model-endpoints/queue), and so what resume can promise:
# - a request id can be polled, fetched and cancelled at any time while fal keeps it, so a recorded
#   id is always resumed, never resubmitted;
# - there is no idempotency key and no lookup of requests by a client-chosen key, so a submit whose
#   answer was lost cannot be found again. The attempt record is written immediately before the
#   POST (after uploads and the concurrency-slot wait) and the request id immediately after it, so
#   the unknowable window is one submit round trip (milliseconds) plus two small local writes.
#   A crash inside it leaves an attempt without a request: reported as ambiguous, resubmitted only
#   with --resubmit-ambiguous (resubmit_ambiguous=True);
# - a request that is gone (404: results and files expire) or that ended with a 5xx/cancelled
#   error (fal bills neither) is resubmitted, the latter at most fal_failed_retries times.
def _render_paid(
    renderer: PaidRenderer, job: RenderJob, ledger: Ledger, config: BatchConfig
) -> ChunkVideo:
    """Resume the chunk's known request or submit it, resubmitting only what fal did not bill."""
    from tasks.render_fal import FailedCompletionError, ResultExpiredError

    row_id, input_hash, index = job.plan.row.id, job.plan.input_hash, job.chunks[0].index
    record = ledger.chunk(row_id, input_hash, index)
    if record.ambiguous and not config.resubmit_ambiguous:
        raise AmbiguousChunkError(record, "an earlier run stopped during its submit")
    request_id, failures_left, expiries_left = record.request_id, config.fal_failed_retries, 1
    while True:
        try:
            if request_id is not None:  # submitted before: poll it, never pay again
                return renderer.resume(request_id, job)[0]
            return _submit(renderer, job, ledger)
        except ResultExpiredError as exc:
            if expiries_left == 0:
                raise
            expiries_left -= 1
            log.warning("row %s chunk %d: %s; resubmitting", row_id, index, exc)
        except FailedCompletionError as exc:
            if failures_left == 0:
                raise
            failures_left -= 1
            log.warning("row %s chunk %d: %s; resubmitting (not billed)", row_id, index, exc)
        request_id = None


def _submit(renderer: PaidRenderer, job: RenderJob, ledger: Ledger) -> ChunkVideo:
    """Submit the chunk, recording the attempt right before the POST and the id right after."""
    row_id, input_hash, index = job.plan.row.id, job.plan.input_hash, job.chunks[0].index

    def submitting(endpoint: str) -> None:
        ledger.record_attempt(row_id, input_hash, index, endpoint)

    def submitted(submission: Any) -> None:
        ledger.record_request(row_id, input_hash, index, submission.request_id, submission.endpoint)

    try:
        return renderer.render(job, on_submitted=submitted, on_submitting=submitting)[0]
    except AmbiguousSubmitError as exc:
        raise AmbiguousChunkError(ledger.chunk(row_id, input_hash, index), str(exc)) from exc


@task(name="render-chunk")
def render_chunk(
    plan: RowPlan, chunk_index: int, config: BatchConfig, identity: ChunkVideo | None = None
) -> ChunkVideo:
    """Render one chunk on a per-chunk backend (fal): reuse, resume a known request, or submit."""
    ledger = Ledger.for_run(config)
    job = _job(plan, (plan.chunks[chunk_index],), config, identity.path if identity else None)
    reused = ledger.rendered_chunk(plan.row.id, plan.input_hash, chunk_index, Path(job.out_dir))
    if reused is not None:
        return reused
    if stop_requested():
        raise RenderStopped(f"row {plan.row.id} chunk {chunk_index}: not started (stopping)")
    video = _render_paid(cast(PaidRenderer, get_renderer(config)), job, ledger, config)
    return _rendered(video, plan, ledger)


@task(name="render-row")
def render_row(plan: RowPlan, config: BatchConfig) -> list[ChunkVideo]:
    """Render all of a row's chunks as one continuous sequence (local backend)."""
    ledger = Ledger.for_run(config)
    job = _job(plan, plan.chunks, config, None)
    out_dir = Path(job.out_dir)
    reused = [
        ledger.rendered_chunk(plan.row.id, plan.input_hash, c.index, out_dir) for c in plan.chunks
    ]
    if all(v is not None for v in reused):
        return [v for v in reused if v is not None]
    videos = get_renderer(config).render(job)
    return [_rendered(video, plan, ledger) for video in videos]
