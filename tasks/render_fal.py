"""fal backend of the render stage: one chunk = one request to fal's hosted LongCat-Video-Avatar.

Uploads the chunk's audio (and portrait, or an identity frame from chunk 0), calls on_submitting
immediately before the submit POST and on_submitted with the request id before waiting, then
downloads the MP4 into the job's out_dir. A result that is gone raises ResultExpiredError and a
request that ended in failure raises FailedCompletionError, so the caller can decide to resubmit.
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import av

from flows.settings import BatchConfig
from tasks.fal_client import FalError, FalQueueClient, FalRequestError, SubmitResult
from tasks.records import Chunk, ChunkVideo
from tasks.render import RenderJob, RenderStopped, stop_requested, wait_unless_stopped

AT2V = "audio-to-video"
AI2V = "image-audio-to-video"
# image-audio-to-video requires a prompt; this is the model's documented default.
DEFAULT_PROMPT = "A person is talking naturally with natural expressions and movements."


@dataclass(frozen=True)
class Submission:
    """A paid request that fal accepted: what the run's ledger must record before waiting on it."""

    row_id: str
    input_hash: str
    chunk_index: int
    request_id: str
    endpoint: str


SubmittedHook = Callable[[Submission], None]
SubmittingHook = Callable[[str], None]  # called with the endpoint right before the submit POST


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
    last.to_image().save(png_path, format="PNG")
    return Path(png_path)


def _single_chunk(job: RenderJob) -> Chunk:
    if len(job.chunks) != 1:
        raise ValueError(f"the fal backend renders one chunk per job, got {len(job.chunks)}")
    return job.chunks[0]


def _file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class FalRenderer:
    """Renders one chunk per job on fal's queue; safe to call from many threads at once."""

    name: ClassVar[str] = "fal"
    continuous: ClassVar[bool] = False
    _shared: ClassVar[dict[tuple[str, str | None], FalRenderer]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        config: BatchConfig,
        client: FalQueueClient | None = None,
        on_submitted: SubmittedHook | None = None,
    ) -> None:
        self.config = config
        # Polls and backoffs sleep on the stop event, so Ctrl-C ends a wait at once.
        self.client = client or FalQueueClient(config.fal, sleep=wait_unless_stopped)
        self.on_submitted = on_submitted  # default hook; render(on_submitted=...) overrides it
        self._slots = _slots(config.fal.queue_url, config.max_concurrency)

    @classmethod
    def shared(cls, config: BatchConfig) -> FalRenderer:
        """Return this process's renderer for config (one HTTP pool and semaphore per config)."""
        key = config.fal.api_key()
        with cls._shared_lock:
            cache_key = (config.model_dump_json(), key)  # the JSON masks the key: add it
            if cache_key not in cls._shared:
                cls._shared[cache_key] = cls(config)
            return cls._shared[cache_key]

    def endpoint_for(self, job: RenderJob) -> str:
        """The job's fal endpoint: image+audio for a portrait or a later chunk, else audio only."""
        chunk = job.chunks[0]
        with_image = job.image_path is not None or chunk.index > 0
        return f"{self.config.fal.app}/{AI2V if with_image else AT2V}"

    def render(
        self,
        job: RenderJob,
        on_submitted: SubmittedHook | None = None,
        on_submitting: SubmittingHook | None = None,
    ) -> list[ChunkVideo]:
        """Render the job's single chunk on fal and return it as a local MP4."""
        chunk = _single_chunk(job)
        started = time.monotonic()
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        endpoint = self.endpoint_for(job)
        payload = self._payload(job, chunk, endpoint)
        timings = {"upload_s": time.monotonic() - started}
        with self._slots:
            if stop_requested():  # Ctrl-C while this chunk waited for a slot: submit nothing
                raise RenderStopped(f"row {chunk.row_id} chunk {chunk.index}: not submitted")
            if on_submitting is not None:
                # Uploads and the slot wait are done: the window between this record and the
                # request id being known is now only the submit round trip itself.
                on_submitting(endpoint)
            handle = self.client.submit(endpoint, payload)
            hook = on_submitted or self.on_submitted
            if hook is not None:
                row_id, input_hash = job.plan.row.id, job.plan.input_hash
                hook(Submission(row_id, input_hash, chunk.index, handle.request_id, endpoint))
            self._wait(handle, timings)
        return [self._collect(job, chunk, handle, timings)]

    def resume(self, request_id: str, job: RenderJob) -> list[ChunkVideo]:
        """Finish a request submitted by an earlier run: poll and fetch it, never resubmit."""
        chunk = _single_chunk(job)
        handle = self.client.handle(request_id)
        Path(job.out_dir).mkdir(parents=True, exist_ok=True)
        timings = {"upload_s": 0.0}
        with self._slots:
            self._wait(handle, timings)
        return [self._collect(job, chunk, handle, timings)]

    def _payload(self, job: RenderJob, chunk: Chunk, endpoint: str) -> dict[str, Any]:
        """Upload the chunk's inputs and build the request body (None fields left to fal)."""
        row = job.plan.row
        audio_url = self.client.upload(
            job.chunk_audio_paths[0], "audio/wav", f"{row.id}.chunk{chunk.index}.wav"
        )
        fields: dict[str, Any] = {
            "audio_url": audio_url,
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "resolution": row.resolution,
            "seed": job.plan.seed,
            "num_inference_steps": row.num_inference_steps,
            "text_guidance_scale": row.text_guidance_scale,
            "audio_guidance_scale": row.audio_guidance_scale,
            "num_segments": chunk.num_segments,
        }
        if endpoint.endswith(AI2V):
            image = self._identity_image(job, chunk)
            content_type = mimetypes.guess_type(image.name)[0] or "image/png"
            fields["image_url"] = self.client.upload(image, content_type, image.name)
            fields["prompt"] = row.prompt or DEFAULT_PROMPT
        return {name: value for name, value in fields.items() if value is not None}

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

    def _wait(self, handle: SubmitResult, timings: dict[str, float]) -> None:
        started = time.monotonic()
        try:
            final = self.client.wait(handle)
        except FalError as exc:
            raise self._classify(handle, exc) from exc
        waited = time.monotonic() - started
        # fal reports the run time in metrics; the rest of the wait was spent queued.
        run_s = min(waited, float(final.metrics.get("inference_time", waited)))
        timings.update(queue_s=waited - run_s, run_s=run_s)

    def _classify(self, handle: SubmitResult, exc: FalError) -> FalError:
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
            ended = self.client.status(handle).status == "COMPLETED"
        except FalError:
            ended = False
        return FailedCompletionError(handle.request_id, exc) if ended else exc

    def _collect(
        self,
        job: RenderJob,
        chunk: Chunk,
        handle: SubmitResult,
        timings: dict[str, float],
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
        timings["download_s"] = time.monotonic() - started
        resolution = job.plan.row.resolution
        units_per_s = self.config.units_per_video_s[resolution]
        units = result.billable_units
        if units is None:  # fal did not say: bill what the segment count implies
            units = chunk.video_s * units_per_s
        return ChunkVideo(
            row_id=chunk.row_id,
            chunk_index=chunk.index,
            path=str(dest),
            sha256=_file_sha256(dest),
            backend=self.name,
            request_id=handle.request_id,
            seed=result.data.get("seed"),
            billable_units=units,
            cost_usd=units / units_per_s * self.config.price_per_video_s[resolution],
            timings_s=timings,
        )
