"""Render stage: the Renderer protocol both backends implement, and get_renderer(name).

A backend turns a RenderJob (one row, one or more of its chunks, local input files) into one local
MP4 per chunk plus metadata. The flow never knows which backend it drives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

from prefect import task

from tasks import progress
from tasks.ledger import Ledger
from tasks.plan import chunk_wav_path, row_work_dir
from tasks.records import Chunk, ChunkVideo, RowPlan

if TYPE_CHECKING:
    from flows.settings import BatchConfig


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


@task(name="render-chunk")
def render_chunk(
    plan: RowPlan, chunk_index: int, config: BatchConfig, identity: ChunkVideo | None = None
) -> ChunkVideo:
    """Render one chunk on a per-chunk backend (fal): reuse, resume a known request, or submit."""
    ledger = Ledger(config.state_url)
    job = _job(plan, (plan.chunks[chunk_index],), config, identity.path if identity else None)
    reused = ledger.rendered_chunk(plan.row.id, plan.input_hash, chunk_index, Path(job.out_dir))
    if reused is not None:
        return reused
    renderer = get_renderer(config)
    known = ledger.request(plan.row.id, plan.input_hash, chunk_index)
    if known is not None:  # submitted by an earlier run: poll it, never pay again
        return _rendered(renderer.resume(known["request_id"], job)[0], plan, ledger)

    def record(submission) -> None:
        ledger.record_request(
            plan.row.id, plan.input_hash, chunk_index, submission.request_id, submission.endpoint
        )

    video = renderer.render(job, on_submitted=record)[0]
    return _rendered(video, plan, ledger)


@task(name="render-row")
def render_row(plan: RowPlan, config: BatchConfig) -> list[ChunkVideo]:
    """Render all of a row's chunks as one continuous sequence (local backend)."""
    ledger = Ledger(config.state_url)
    job = _job(plan, plan.chunks, config, None)
    out_dir = Path(job.out_dir)
    reused = [
        ledger.rendered_chunk(plan.row.id, plan.input_hash, c.index, out_dir) for c in plan.chunks
    ]
    if all(v is not None for v in reused):
        return [v for v in reused if v is not None]
    videos = get_renderer(config).render(job)
    return [_rendered(video, plan, ledger) for video in videos]
