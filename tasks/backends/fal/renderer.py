"""fal backend: one chunk = one request to fal's hosted LongCat-Video-Avatar queue.

Uploads the chunk's audio (and portrait, or an identity frame from chunk 0), records the attempt in
the run ledger immediately before the submit POST and the request id right after it, waits, then
downloads the MP4 into the job's out_dir. What the ledger already knows is resumed, never paid for
again; see FalRenderer.render for the resubmit policy.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

import av
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

from avatarflow.tasks.backends.base import Renderer, RenderJob
from avatarflow.tasks.backends.fal.client import (
    AmbiguousSubmitError,
    FalError,
    FalQueueClient,
    FalRequestError,
    SubmitResult,
)
from avatarflow.tasks.config import BatchConfig, FalSettings
from avatarflow.tasks.records import Chunk, ChunkVideo, RowPlan, Timings
from avatarflow.tasks.stop import (
    RenderStopped,
    calling_on_stop,
    stop_requested,
    wait_unless_stopped,
)
from avatarflow.tasks.storage import sha256_file

if TYPE_CHECKING:
    from avatarflow.tasks.ledger import ChunkRecord, Ledger

log = logging.getLogger(__name__)

AT2V = "audio-to-video"
AI2V = "image-audio-to-video"
# fal's documented default prompt of audio-to-video; image-audio-to-video requires a prompt, so
# rows without one send this there too.
DEFAULT_PROMPT = "A person is talking naturally with natural expressions and movements."


class ResultExpiredError(FalError):
    """fal no longer has a request's status, result or video file (404): it must be resubmitted."""

    def __init__(self, request_id: str, what: str) -> None:
        super().__init__(f"fal request {request_id}: the {what} is gone (HTTP 404, expired)")
        self.request_id = request_id


class FailedCompletionError(FalRequestError):
    """A request that ended COMPLETED with an error a new submit may fix (5xx, or cancelled)."""

    def __init__(self, request_id: str, cause: FalRequestError) -> None:
        super().__init__(str(cause), cause.error_type, cause.status, retryable=True)
        self.request_id = request_id


class AmbiguousChunkError(Exception):
    """A paid submit may have reached fal but its request id is unknown: not resubmitted."""

    def __init__(self, record: ChunkRecord, cause: str) -> None:
        started = record.attempt.started_at if record.attempt else 0.0
        endpoint = record.attempt.endpoint if record.attempt else "fal"
        when = datetime.fromtimestamp(started, UTC)
        super().__init__(
            f"row {record.row_id} chunk {record.chunk}: ambiguous submit to "
            f"{endpoint} at {when:%Y-%m-%d %H:%M:%S} UTC ({cause}). fal may "
            "have queued it (and will bill it), but its request id never reached the ledger and "
            "fal's queue API cannot look a request up by our key, so it is not resubmitted. "
            "Check the requests of that endpoint around that time in fal's dashboard; if there is "
            "none (or you accept paying twice), rerun with `avatarflow run ... "
            "--resubmit-ambiguous`."
        )


_SLOTS: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _slots(queue_url: str, max_concurrency: int) -> threading.BoundedSemaphore:
    """The process-wide bound on requests in flight at one fal queue."""
    with _SLOTS_LOCK:
        key = (queue_url, max_concurrency)
        if key not in _SLOTS:
            _SLOTS[key] = threading.BoundedSemaphore(max_concurrency)
        return _SLOTS[key]


def extract_last_frame(video_path: str | Path, png_path: str | Path) -> Path:
    """Write the last frame of a video as a PNG (the identity image for a row's later chunks)."""
    with av.open(str(video_path)) as container:
        stream = container.streams.video[0]
        if container.duration:
            # Jump to the last keyframe so only the final GOP is decoded, not the whole chunk.
            container.seek(container.duration, backward=True, any_frame=False)
        last = None
        for frame in container.decode(stream):
            last = frame
    if last is None:
        raise ValueError(f"{video_path} has no video frames")
    last.to_image().save(png_path, format="PNG")  # type: ignore[no-untyped-call]
    return Path(png_path)


def _existing_limit(name: str | None) -> str | None:
    """name, when a Prefect API is configured and holds a global concurrency limit of that name."""
    if not name or not PREFECT_API_URL.value():
        return None
    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        return None
    log.info("fal requests in flight share the Prefect global concurrency limit %r", name)
    return name


def classify_failure(client: FalQueueClient, handle: SubmitResult, exc: FalError) -> FalError:
    """Tell a request that is gone or ended failed from one we merely could not reach."""
    if isinstance(exc, FalRequestError) and exc.status == 404:
        return ResultExpiredError(handle.request_id, "request")
    # fal does not bill 5xx failures, and a cancelled request (499) produced nothing.
    if not isinstance(exc, FalRequestError) or not (
        exc.retryable or exc.error_type == "client_cancelled"
    ):
        return exc  # e.g. 422: fal's message names the offending field
    try:
        # wait() raises the same error types for a failed completion and for a status poll
        # that kept failing; only the former may be resubmitted, so ask fal once more.
        ended = client.status(handle).status == "COMPLETED"
    except FalError:
        ended = False
    return FailedCompletionError(handle.request_id, exc) if ended else exc


def _single_chunk(job: RenderJob) -> Chunk:
    if len(job.chunks) != 1:
        raise ValueError(f"the fal backend renders one chunk per job, got {len(job.chunks)}")
    return job.chunks[0]


class FalRenderer(Renderer):
    """Renders one chunk per job on fal's queue; safe to call from many threads at once."""

    name: ClassVar[str] = "fal"
    continuous: ClassVar[bool] = False
    paid: ClassVar[bool] = True
    settings_class: ClassVar[type[FalSettings]] = FalSettings  # FAL_*
    config_field: ClassVar[str] = "fal"

    def __init__(self, config: BatchConfig, client: FalQueueClient | None = None) -> None:
        self.config = config
        # Polls and backoffs sleep on the stop event, so Ctrl-C ends a wait at once.
        self.client = client or FalQueueClient(
            config.fal, sleep=wait_unless_stopped, on_stop=calling_on_stop
        )
        self._slots = _slots(config.fal.queue_url, config.max_concurrency)
        self._shared_limit = _existing_limit(config.fal.concurrency_limit)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        """Hold a slot for one request in flight: this process's bound (max_concurrency), and a
        slot of the Prefect global concurrency limit config.fal.concurrency_limit when it exists,
        so that runs and shards on other workers share the fal account's concurrency."""
        with self._slots:
            if self._shared_limit is None:
                yield
                return
            with concurrency(self._shared_limit, occupy=1, strict=True):
                yield

    # --- what the stages ask --------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: BatchConfig) -> str | None:
        if config.fal.api_key() is None:
            return "FAL_KEY is not set: the fal backend needs an API key in the environment"
        return None

    @classmethod
    def estimate(cls, config: BatchConfig, resolution: str, video_s: float) -> tuple[float, float]:
        return (
            video_s * config.fal.units_per_video_s[resolution],
            video_s * config.fal.price_per_video_s[resolution],
        )

    @classmethod
    def needs_identity(cls, plan: RowPlan) -> bool:
        # Without a portrait, chunks after the first keep the face through a frame of chunk 0.
        return plan.row.image is None

    @classmethod
    def model_name(cls, config: BatchConfig) -> str:
        return config.fal.app

    @classmethod
    def task_threads(cls, config: BatchConfig) -> int:
        # requests in flight, plus as many threads uploading and downloading around them
        return config.max_concurrency * 2 + 2

    @classmethod
    def cancel_in_flight(
        cls, ledger: Ledger, api_key: str | None = None
    ) -> list[tuple[ChunkRecord, str]]:
        outcomes = []
        with FalQueueClient(FalSettings(), key=api_key) as client:
            for record in ledger.in_flight():
                if record.request_id is None:  # ambiguous: there is no id to cancel
                    outcomes.append((record, "request id unknown (ambiguous submit)"))
                    continue
                try:
                    status = client.cancel(client.handle(record.request_id))
                except FalError as exc:
                    status = f"not cancelled ({exc})"
                outcomes.append((record, status))
        return outcomes

    @classmethod
    def cache_key(cls, config: BatchConfig) -> str:
        # one HTTP pool per account and settings; the key is part of it (the JSON has none)
        return f"{config.model_dump_json()}|{config.fal.api_key()}"

    @classmethod
    def create(cls, config: BatchConfig) -> Self:
        return cls(config)

    # --- rendering ------------------------------------------------------------------------------

    # What fal's queue API allows (docs/fal.md), and so what resume can promise:
    # - a request id can be polled, fetched and cancelled while fal keeps it, so a recorded id is
    #   always resumed, never resubmitted;
    # - there is no idempotency key and no lookup of requests by a client-chosen key, so a submit
    #   whose answer was lost cannot be found again. The attempt is recorded immediately before
    #   the POST (after uploads and the slot wait) and the request id immediately after it, so the
    #   unknowable window is one submit round trip plus two small writes. A crash inside it leaves
    #   an attempt without a request: ambiguous, resubmitted only with --resubmit-ambiguous;
    # - a request that is gone (404: results expire) or that ended with a 5xx/cancelled error
    #   (fal bills neither) is resubmitted, the latter at most FalSettings.failed_retries times.
    def render(self, job: RenderJob, ledger: Ledger) -> list[ChunkVideo]:
        """Resume the chunk's known request or submit it; resubmit only what fal did not bill."""
        chunk = _single_chunk(job)
        row_id, input_hash = job.plan.row.id, job.plan.input_hash
        record = ledger.chunk(row_id, input_hash, chunk.index)
        if record.ambiguous and not self.config.fal.resubmit_ambiguous:
            raise AmbiguousChunkError(record, "an earlier run stopped during its submit")
        request_id = record.request_id
        failures_left, expiries_left = self.config.fal.failed_retries, 1
        while True:
            try:
                if request_id is not None:  # submitted before: poll it, never pay again
                    return [self._resume(request_id, job, chunk)]
                return [self._submit(job, chunk, ledger)]
            except ResultExpiredError as exc:
                if expiries_left == 0:
                    raise
                expiries_left -= 1
                log.warning("row %s chunk %d: %s; resubmitting", row_id, chunk.index, exc)
            except FailedCompletionError as exc:
                if failures_left == 0:
                    raise
                failures_left -= 1
                log.warning(
                    "row %s chunk %d: %s; resubmitting (not billed)", row_id, chunk.index, exc
                )
            request_id = None

    def endpoint_for(self, job: RenderJob) -> str:
        """The job's fal endpoint: image+audio for a portrait or a later chunk, else audio only."""
        with_image = job.image_path is not None or job.chunks[0].index > 0
        return f"{self.config.fal.app}/{AI2V if with_image else AT2V}"

    def _submit(self, job: RenderJob, chunk: Chunk, ledger: Ledger) -> ChunkVideo:
        """Upload, then submit with the attempt recorded right before and the id right after."""
        row_id, input_hash = job.plan.row.id, job.plan.input_hash
        started = time.monotonic()
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        endpoint = self.endpoint_for(job)
        payload = self.payload(job, chunk, endpoint)
        upload_s = time.monotonic() - started
        with self._in_flight():
            if stop_requested():  # Ctrl-C while this chunk waited for a slot: submit nothing
                raise RenderStopped(f"row {row_id} chunk {chunk.index}: not submitted")
            ledger.record_attempt(row_id, input_hash, chunk.index, endpoint)
            try:
                handle = self.client.submit(endpoint, payload)
            except AmbiguousSubmitError as exc:
                record = ledger.chunk(row_id, input_hash, chunk.index)
                raise AmbiguousChunkError(record, str(exc)) from exc
            ledger.record_request(row_id, input_hash, chunk.index, handle.request_id, endpoint)
            queue_s, run_s = self._wait(handle)
        return self._collect(job, chunk, handle, Timings(upload_s, queue_s, run_s))

    def _resume(self, request_id: str, job: RenderJob, chunk: Chunk) -> ChunkVideo:
        """Finish a request submitted by an earlier run: poll and fetch it, never resubmit."""
        handle = self.client.handle(request_id)
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        with self._in_flight():
            queue_s, run_s = self._wait(handle)
        return self._collect(job, chunk, handle, Timings(queue_s=queue_s, run_s=run_s))

    def payload(self, job: RenderJob, chunk: Chunk, endpoint: str) -> dict[str, Any]:
        """Upload the chunk's inputs and build the request body (unset fields left to fal)."""
        row = job.plan.row
        audio_url = self.client.upload(
            job.chunk_audio_paths[0], "audio/wav", f"{row.id}.chunk{chunk.index}.wav"
        )
        fields = {
            **row.params.given(),  # named as fal names them
            "audio_url": audio_url,
            "seed": job.plan.seed,
            "num_segments": chunk.num_segments,
        }
        if endpoint.endswith(AI2V):
            image = self._identity_image(job, chunk)
            content_type = mimetypes.guess_type(image.name)[0] or "image/png"
            fields["image_url"] = self.client.upload(image, content_type, image.name)
            fields.setdefault("prompt", DEFAULT_PROMPT)
        return fields

    def _identity_image(self, job: RenderJob, chunk: Chunk) -> Path:
        if job.image_path is not None:
            return Path(job.image_path)
        if job.identity_video_path is None:
            raise ValueError(
                f"row {chunk.row_id} chunk {chunk.index}: no image and no chunk 0 video to take "
                "the identity frame from"
            )
        png = Path(job.out_dir) / f"{chunk.row_id}.chunk{chunk.index}.identity.png"
        return extract_last_frame(job.identity_video_path, png)

    def _wait(self, handle: SubmitResult) -> tuple[float, float]:
        """Wait for the request to finish; return (seconds queued, seconds running)."""
        started = time.monotonic()
        try:
            final = self.client.wait(handle)
        except FalError as exc:
            raise self._classify(handle, exc) from exc
        waited = time.monotonic() - started
        # fal reports the run time in metrics; the rest of the wait was spent queued.
        run_s = min(waited, float(final.metrics.get("inference_time", waited)))
        return waited - run_s, run_s

    def _classify(self, handle: SubmitResult, exc: FalError) -> FalError:
        return classify_failure(self.client, handle, exc)

    def _collect(
        self, job: RenderJob, chunk: Chunk, handle: SubmitResult, timings: Timings
    ) -> ChunkVideo:
        """Fetch the result, download the MP4 and price it."""
        started = time.monotonic()
        dest = Path(job.out_dir) / f"{chunk.row_id}.chunk{chunk.index}.mp4"
        try:
            result = self.client.result(handle)
            self.client.download(result.data["video"]["url"], dest)
        except FalRequestError as exc:
            if exc.status == 404:
                raise ResultExpiredError(handle.request_id, "result or its video") from exc
            raise
        timings = timings + Timings(download_s=time.monotonic() - started)
        resolution = job.plan.row.resolution
        units_per_s = self.config.fal.units_per_video_s[resolution]
        units = result.billable_units
        if units is None:  # fal did not say: bill what the segment count implies
            units = chunk.video_s * units_per_s
        return ChunkVideo(
            row_id=chunk.row_id,
            chunk_index=chunk.index,
            path=str(dest),
            sha256=sha256_file(dest),
            backend=self.name,
            request_id=handle.request_id,
            seed=result.data.get("seed"),
            billable_units=units,
            cost_usd=units / units_per_s * self.config.fal.price_per_video_s[resolution],
            timings=timings,
        )
