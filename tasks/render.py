"""Render stage: the tasks that turn a row's chunks into local MP4s on the configured backend.

They ask the backend registry for the renderer and never name a backend: reuse what the ledger
already holds, otherwise hand the job (and the ledger, for paid backends' resume) to the renderer,
then record what came back so no later run renders it again.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from avatarflow.tasks import progress
from avatarflow.tasks.backends import RenderJob, get_renderer, renderer_class
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import Chunk, ChunkRendered, ChunkVideo, RowPlan
from avatarflow.tasks.stop import RenderStopped, stop_requested
from avatarflow.tasks.workdir import WorkDir


def render_job(
    plan: RowPlan, chunks: tuple[Chunk, ...], config: BatchConfig, identity: str | None = None
) -> RenderJob:
    """The job for some of a row's chunks, with the inputs planning left in the work dir."""
    work, row_id, input_hash = WorkDir(config.work_path), plan.row.id, plan.input_hash
    return RenderJob(
        plan=plan,
        chunks=chunks,
        chunk_audio_paths=tuple(str(work.chunk_wav(row_id, input_hash, c.index)) for c in chunks),
        out_dir=str(work.renders(row_id, input_hash)),
        image_path=plan.image_path,
        identity_video_path=identity,
    )


def _rendered(video: ChunkVideo, plan: RowPlan, ledger: Ledger) -> ChunkVideo:
    ledger.record_chunk(video, plan.input_hash)
    progress.emit(ChunkRendered(plan.row.id, video.chunk_index, video.cost_usd))
    return video


# No Prefect cache: the ledger decides what is reused (hashing the inputs cost CPU per run).
@task(name="render-chunk", cache_policy=NO_CACHE)
def render_chunk(
    plan: RowPlan, chunk_index: int, config: BatchConfig, identity: ChunkVideo | None = None
) -> ChunkVideo:
    """Render one chunk on a per-chunk backend: reuse it, or let the backend resume or submit."""
    ledger = Ledger.for_run(config)
    job = render_job(plan, (plan.chunks[chunk_index],), config, identity.path if identity else None)
    reused = ledger.rendered_chunk(plan.row.id, plan.input_hash, chunk_index, Path(job.out_dir))
    if reused is not None:
        return dataclasses.replace(reused, reused=True)
    if stop_requested():
        raise RenderStopped(f"row {plan.row.id} chunk {chunk_index}: not started (stopping)")
    [video] = get_renderer(config).render(job, ledger)
    return _rendered(video, plan, ledger)


# No Prefect cache: the ledger decides what is reused (hashing the inputs cost CPU per run).
@task(name="render-row", cache_policy=NO_CACHE)
def render_row(plan: RowPlan, config: BatchConfig) -> list[ChunkVideo]:
    """Render all of a row's chunks as one continuous sequence (a continuous backend)."""
    ledger = Ledger.for_run(config)
    job = render_job(plan, plan.chunks, config)
    out_dir = Path(job.out_dir)
    reused = [
        ledger.rendered_chunk(plan.row.id, plan.input_hash, c.index, out_dir) for c in plan.chunks
    ]
    if all(v is not None for v in reused):
        return [dataclasses.replace(v, reused=True) for v in reused if v is not None]
    if stop_requested():
        raise RenderStopped(f"row {plan.row.id}: not started (stopping)")
    videos = get_renderer(config).render(job, ledger)
    return [_rendered(video, plan, ledger) for video in videos]


def render_row_chunks(plan: RowPlan, config: BatchConfig) -> list[ChunkVideo]:
    """Render all of a row's chunks in order from inside another task (a re-render): the same
    tasks as the flow's, run one after another, chunk 0 first for the backends that need it."""
    if renderer_class(config.backend).continuous:
        return render_row(plan, config)
    first = render_chunk(plan, 0, config)
    identity = first if renderer_class(config.backend).needs_identity(plan) else None
    later = [render_chunk(plan, k, config, identity=identity) for k in range(1, len(plan.chunks))]
    return [first, *later]
