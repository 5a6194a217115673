"""Finish stage: a rendered row's master audio, chunk checks, join, QC, thumbnail and publish.

One task run per row (finish-row) with the stages as plain functions inside it: Prefect's
per-task bookkeeping would otherwise be the per-row cost of a 10,000-row batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from avatarflow.tasks import progress
from avatarflow.tasks.captions import RowCaptions, make_captions, mux_track, with_gate
from avatarflow.tasks.concat import concat_chunks, prepare_master_audio
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.cpu import cpu_slot
from avatarflow.tasks.publish import keep_rejected, publish_row
from avatarflow.tasks.records import (
    ChunkVideo,
    QCReport,
    RowFinished,
    RowPlan,
    RowResult,
    RunAction,
    SidecarRerender,
)
from avatarflow.tasks.report import save_thumbnail
from avatarflow.tasks.rerender import rerender_row
from avatarflow.tasks.verify import verify_chunks, verify_video

# What a row's error says when a stage after rendering raised before a joined video existed.
CHUNKS_KEPT = "rendered chunks kept in the ledger; a rerun re-checks them without paying"


@dataclass
class _Finishing:
    """What finish_row has made of a row so far: what a stage that raises must not throw away."""

    plan: RowPlan  # the render the videos came from (a re-render's, once there is one)
    videos: list[ChunkVideo]
    action: RunAction
    stage: str = "master audio"
    chunk_qc: list[QCReport] = field(default_factory=list)
    video: str | None = None  # the joined video, once concat made it
    final: QCReport | None = None
    rerender: SidecarRerender | None = None
    captions: RowCaptions | None = None


# No Prefect cache: the ledger decides what is reused (hashing the inputs cost CPU per run).
@task(name="finish-row", cache_policy=NO_CACHE)
def finish_row(plan: RowPlan, videos: list[ChunkVideo], config: BatchConfig) -> RowResult:
    """master audio → verify chunks → concat + mux → verify video + QC → captions (and their
    gate, files and track) → publish (or keep as rejected); with rerender_on_qc_fail, a QC
    failure is rendered once more first.

    The chunks were paid for: when a stage raises, the joined video is kept under _rejected/
    with the error as its reason (or, before there is one, the row fails and says its chunks
    are kept).
    """
    row = _Finishing(plan, videos, "reused" if all(v.reused for v in videos) else "rendered")
    try:
        return _finish(row, config)
    except Exception as exc:  # any stage's own error: keep what was paid for
        reason = f"{row.stage} error: {type(exc).__name__}: {exc}"
        get_run_logger().error("row %s: %s", plan.row.id, reason, exc_info=True)
    if row.video is not None:
        kept = (row.plan, row.video, row.videos, row.chunk_qc, row.final, config, row.action)
        try:
            return keep_rejected(*kept, rerender=row.rerender, reason=reason, captions=row.captions)
        except Exception as exc:  # e.g. the target is unreachable: the ledger still has them
            reason += f" (nor kept under _rejected/: {type(exc).__name__})"
    progress.emit(RowFinished(plan.row.id, "failed"))
    return RowResult.failure(plan.row.id, f"{reason}; {CHUNKS_KEPT}", plan.row.extra)


def _finish(row: _Finishing, config: BatchConfig) -> RowResult:
    """finish_row's stages in order, noting in `row` each one's name and what it made."""
    plan, videos = row.plan, row.videos
    with cpu_slot():
        master = prepare_master_audio(plan, config)
        row.stage = "chunk verification"
        row.chunk_qc = verify_chunks(plan, videos, config)
        row.stage = "concat"
        row.video = concat_chunks(plan, videos, master, config)
        row.stage = "qc"
        row.final = verify_video(plan, row.video, config)
    if config.rerender_on_qc_fail and row.final.failed:
        second = rerender_row(plan, videos, row.final, master, config)
        if isinstance(second, str):  # why not: the first render is kept as the rejected video
            row.final = row.final.with_reason(second)
        else:
            row.plan, row.videos, row.chunk_qc = second.plan, second.videos, second.chunk_qc
            row.video, row.final, row.rerender = second.video, second.final, second.record
            if not all(v.reused for v in second.videos):
                row.action = "rendered"
    # Captions after any re-render: a second seed cannot fix a wrong narration.
    row.stage = "captions"
    row.captions = make_captions(plan, config)
    if row.captions is not None:
        row.final = with_gate(row.final, row.captions.gate)
        if "track" in row.captions.record.outputs:
            row.stage = "caption track"
            captioned = str(Path(row.video).with_suffix(".captioned.mp4"))
            row.video = mux_track(row.video, row.captions.cues, captioned)
    row.stage = "thumbnail"
    with cpu_slot():
        save_thumbnail(plan, row.video, config)  # under the manifest's plan: the report looks there
    row.stage = "publish"
    return publish_row(
        row.plan,
        row.video,
        row.videos,
        row.chunk_qc,
        row.final,
        config,
        row.action,
        row.rerender,
        row.captions,
    )
