"""The batch flow: manifest → plan → render → verify → concat → verify → publish → results + report.

Wiring only: every stage is a Prefect task in tasks/. A failing row is recorded and the rest go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, task, unmapped
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.task_runners import ThreadPoolTaskRunner

from tasks import progress
from tasks.backends import renderer_class
from tasks.concat import concat_chunks, prepare_master_audio
from tasks.config import BatchConfig
from tasks.ledger import Ledger
from tasks.manifest import load_rows
from tasks.plan import budget_gate, prepare_row
from tasks.publish import publish_results, publish_row
from tasks.records import ChunkVideo, RowFinished, RowPlan, RowResult
from tasks.render import render_chunk, render_row
from tasks.report import save_thumbnail, write_report
from tasks.verify import verify_chunks, verify_video


@dataclass
class BatchOutcome:
    """What a batch produced: one result per manifest row, and where the tables went."""

    results: list[RowResult] = field(default_factory=list)
    results_url: str | None = None
    report_url: str | None = None

    @property
    def exit_code(self) -> int:
        """0 when every row is published (now or by an earlier run), else 1."""
        done = all(r.status == "published" or r.error is None for r in self.results)
        return 0 if done else 1


def _failed(row_id: str, error: str, extra: dict | None = None) -> RowResult:
    return RowResult(id=row_id, status="failed", error=error, extra=extra or {})


def _first_error(futures: list[PrefectFuture]) -> str:
    """The message of the earliest failed stage of a row (later stages only report NotReady)."""
    for future in futures:
        state = future.state
        if state.is_failed() or state.is_crashed():
            try:
                state.result()
            except Exception as exc:  # the stage's own exception, e.g. AudioError or FalError
                return f"{type(exc).__name__}: {exc}"
            return state.message or state.name
    return "did not finish"


@task(name="finish-row")
def finish_row(
    plan: RowPlan, videos: list[ChunkVideo], master: str, config: BatchConfig
) -> RowResult:
    """verify chunks → concat + mux → verify video → publish, as nested stage tasks of one row."""
    verdicts = verify_chunks(plan, videos, config)
    video = concat_chunks(plan, videos, master, config)
    final = verify_video(plan, video, config)
    save_thumbnail(plan, video, config)
    return publish_row(plan, video, videos, verdicts, final, config)


class _RowRenders:
    """Submits a row's render tasks as their inputs become ready (chunk 0's face for later ones)."""

    def __init__(self, plan: RowPlan, config: BatchConfig) -> None:
        self.plan, self.config = plan, config
        backend = renderer_class(config.backend)
        self.continuous = backend.continuous
        if self.continuous:
            self.futures = [render_row.submit(plan, config)]
            return
        # Chunks that need chunk 0's video for identity wait for it; the others start now.
        count = 1 if backend.needs_identity(plan) else len(plan.chunks)
        self.futures = [render_chunk.submit(plan, k, config) for k in range(count)]

    def on_done(self, future: PrefectFuture) -> list[PrefectFuture]:
        """Submit what `future` unblocks: the later chunks, once chunk 0 has rendered."""
        waiting = len(self.futures) < len(self.plan.chunks) and not self.continuous
        if not waiting or future is not self.futures[0] or not future.state.is_completed():
            return []
        identity = future.result()
        later = [
            render_chunk.submit(self.plan, k, self.config, identity=identity)
            for k in range(1, len(self.plan.chunks))
        ]
        self.futures += later
        return later

    def videos(self) -> list[ChunkVideo] | None:
        """Every rendered chunk, in chunk order, once all finished well, else None."""
        if not all(f.state.is_completed() for f in self.futures):
            return None
        if self.continuous:
            return self.futures[0].result()
        return (
            [f.result() for f in self.futures]
            if len(self.futures) == len(self.plan.chunks)
            else None
        )


def _render_and_finish(plans: list[RowPlan], config: BatchConfig) -> dict[int, list[PrefectFuture]]:
    """Render every row, and finish each row as soon as its own chunks are done.

    Driven from the flow's thread: a task is submitted only once its inputs exist, so no worker
    thread sits blocked on another task's future while renders wait for a fal slot.
    """
    masters = {p.row.index: prepare_master_audio.submit(p, config) for p in plans}
    rows = {p.row.index: _RowRenders(p, config) for p in plans}
    owner = {f: p.row.index for p in plans for f in rows[p.row.index].futures}
    stages: dict[int, list[PrefectFuture]] = {}
    while owner:
        future = next(as_completed(list(owner)))
        future.wait()  # sets its final state locally (otherwise .state asks the API, which lags)
        index = owner.pop(future)
        renders = rows[index]
        owner.update({f: index for f in renders.on_done(future)})
        if any(owner.get(f) == index for f in renders.futures):
            continue  # more chunks of this row are still rendering
        stages[index] = [masters[index], *renders.futures]
        videos = renders.videos()
        if videos is not None:
            master = masters[index]
            stages[index].append(finish_row.submit(renders.plan, videos, master, config))
    return stages


# Bounded by default for deployments too (Prefect's own default pool is unbounded);
# run_batch sizes it from max_concurrency.
@flow(name="produce-batch", log_prints=False, task_runner=ThreadPoolTaskRunner(max_workers=18))
def produce_batch(config: BatchConfig) -> BatchOutcome:
    """Render, check and publish every row of a manifest."""
    ledger = Ledger.for_run(config)
    with ledger.lock():  # one run per target at a time: two could both pay for one chunk
        ledger.sweep_temp_files(config.target)  # what a killed run left; nothing else writes now
        return _produce(config)


def _produce(config: BatchConfig) -> BatchOutcome:
    check = load_rows(config)
    # Keyed by manifest row index: ids may be missing or duplicated in rows that failed validation.
    results: dict[int, RowResult] = {}
    for e in check.errors:
        if e.row is not None:  # a row with several problems reports them all
            prior = results.get(e.row)
            text = str(e) if prior is None else f"{prior.error}; {e}"
            results[e.row] = _failed(e.id or f"row-{e.row}", text, check.extras(e.row))

    # 1. Fetch + probe each row's audio and plan its chunks (no spend yet).
    prepared = prepare_row.map(check.rows, unmapped(config))
    wait(prepared)
    plans: list[RowPlan] = []
    for row, fut in zip(check.rows, prepared, strict=True):
        if fut.state.is_completed():
            plans.append(fut.result())
        else:
            results[row.index] = _failed(row.id, _first_error([fut]), row.extra)

    # 2. Budget gate and resume: published rows are skipped, the rest are dispatched.
    dispatch, skipped = budget_gate(plans, config)
    results.update(skipped)

    # 3. Render each row's chunks, then verify → concat + mux → verify → publish it.
    stages = _render_and_finish(dispatch, config)

    # 4. Collect per-row outcomes; a failed stage fails only its own row.
    for plan in dispatch:
        futures = stages[plan.row.index]
        wait(futures)
        last = futures[-1]
        if last.state.is_completed() and isinstance(last.result(), RowResult):
            results[plan.row.index] = last.result()
        else:
            results[plan.row.index] = _failed(plan.row.id, _first_error(futures), plan.row.extra)
            progress.emit(RowFinished(plan.row.id, "failed"))

    ordered = [results[index] for index in sorted(results)]
    outcome = BatchOutcome(results=ordered)
    outcome.results_url = publish_results(ordered, check.passthrough_schema, config)
    outcome.report_url = write_report(ordered, plans, config)
    return outcome


def run_batch(config: BatchConfig) -> BatchOutcome:
    """Run produce_batch with a thread pool sized for the backend."""
    runner = ThreadPoolTaskRunner(max_workers=renderer_class(config.backend).task_threads(config))
    return produce_batch.with_options(task_runner=runner)(config)
