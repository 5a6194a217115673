"""Re-render stage: a row whose final video failed a QC gate is rendered once more, new seed.

Runs inside finish-row after the first verdict (`avatarflow run --rerender-on-qc-fail`). The seed
is derived from the row, so the re-render is reproducible; it changes the input hash, so the
re-render's chunks have ledger entries of their own and a rerun reuses them instead of paying
again. The budget counts it: what is not in the ledger yet must fit what the run has left.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass

from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.concat import concat_chunks
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.plan import RunBudget, input_hash
from avatarflow.tasks.records import ChunkVideo, QCReport, RowPlan, SidecarRerender
from avatarflow.tasks.render import render_row_chunks
from avatarflow.tasks.storage import writing
from avatarflow.tasks.verify import verify_chunks, verify_video
from avatarflow.tasks.workdir import WorkDir


@dataclass(frozen=True)
class Rerendered:
    """The second render of a row, checked like the first."""

    plan: RowPlan
    videos: list[ChunkVideo]
    chunk_qc: list[QCReport]
    video: str
    final: QCReport
    record: SidecarRerender


def rerender_seed(row_id: str, seed: int, attempt: int = 1) -> int:
    """The seed of re-render number attempt: derived from the row and its first seed, never it."""
    key = f"avatarflow-rerender:{row_id}:{seed}:{attempt}".encode()
    new = int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
    return new if new != seed else (new + 1) % 2**32


def reseeded_plan(plan: RowPlan, config: BatchConfig) -> RowPlan:
    """The row planned again with a re-render seed: same chunks, a new input hash (its own ledger
    entries, so a rerun reuses the re-render's chunks), chunk WAVs copied to its work folder."""
    seed = rerender_seed(plan.row.id, plan.seed)
    digest = input_hash(plan.row, plan.audio, plan.chunks, seed, plan.image_sha256)
    again = dataclasses.replace(plan, seed=seed, input_hash=digest)
    work = WorkDir(config.work_path)
    for chunk in plan.chunks:
        dest = work.chunk_wav(plan.row.id, digest, chunk.index)
        if not dest.exists():  # written whole or not at all: a torn WAV would be rendered
            with writing(dest) as tmp:
                shutil.copyfile(work.chunk_wav(plan.row.id, plan.input_hash, chunk.index), tmp)
    return again


def rerender_cost(plan: RowPlan, config: BatchConfig) -> float:
    """What rendering plan would cost now: its chunks the ledger does not hold yet, estimated."""
    ledger = Ledger.for_run(config)
    video_s = sum(
        c.video_s
        for c in plan.chunks
        if not ledger.chunk(plan.row.id, plan.input_hash, c.index).done
    )
    backend = renderer_class(config.backend)
    return backend.estimate(config, plan.row.resolution, video_s)[1] if video_s else 0.0


def rerender_row(
    plan: RowPlan, videos: list[ChunkVideo], final: QCReport, master: str, config: BatchConfig
) -> Rerendered | str:
    """Render the row once more with a derived seed and check it; or say why it was not.

    The first render stays the row's video whenever the second cannot be had: over budget, or
    a render or check that failed (it was paid for, so it is kept as the rejected video).
    """
    again = reseeded_plan(plan, config)
    cost = rerender_cost(again, config)
    if not RunBudget.of(config).take(cost):
        return f"not re-rendered: its estimate ${cost:.2f} is more than the budget has left"
    try:
        second_videos = render_row_chunks(again, config)
        chunk_qc = verify_chunks(again, second_videos, config)
        video = concat_chunks(again, second_videos, master, config)
        second = verify_video(again, video, config)
    except Exception as exc:  # any stage's failure: the first render is still a video to keep
        return f"re-render failed: {type(exc).__name__}: {exc}"
    first_cost = round(sum(v.cost_usd for v in videos), 6)
    record = SidecarRerender(plan.seed, plan.input_hash, final.failed, first_cost)
    return Rerendered(again, second_videos, chunk_qc, video, second, record)
