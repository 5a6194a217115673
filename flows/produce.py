"""The batch flow: manifest → plan → render → verify → concat → verify → publish → results + report.

Wiring only: every stage is a Prefect task in tasks/. A failing row is recorded and the rest go on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefect import flow, unmapped
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from flows.settings import BatchConfig
from tasks.concat import concat_chunks, prepare_master_audio
from tasks.manifest import load_rows
from tasks.plan import budget_gate, prepare_row
from tasks.publish import publish_results, publish_row
from tasks.records import RowPlan, RowResult
from tasks.render import render_chunk, render_row, renderer_is_continuous
from tasks.report import write_report
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


def _render_futures(plan: RowPlan, config: BatchConfig) -> list[PrefectFuture]:
    """Submit a row's chunks: one task (local), or chunk 0 before those that need its face."""
    if renderer_is_continuous(config):
        return [render_row.submit(plan, config)]
    first = render_chunk.submit(plan, 0, config)
    needs_identity = plan.row.image is None
    rest = [
        render_chunk.submit(plan, k, config, identity=first if needs_identity else None)
        for k in range(1, len(plan.chunks))
    ]
    return [first, *rest]


@flow(name="produce-batch", log_prints=False)
def produce_batch(config: BatchConfig) -> BatchOutcome:
    """Render, check and publish every row of a manifest."""
    check = load_rows(config)
    # Keyed by manifest row index: ids may be missing or duplicated in rows that failed validation.
    results: dict[int, RowResult] = {
        e.row: _failed(e.id or f"row-{e.row}", str(e), check.extras(e.row))
        for e in check.errors
        if e.row is not None
    }

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

    # 3. Per row: master audio and render in parallel, then verify → concat → verify → publish.
    rows: dict[int, list[PrefectFuture]] = {}
    for plan in dispatch:
        master = prepare_master_audio.submit(plan, config)
        renders = _render_futures(plan, config)
        verdicts = verify_chunks.submit(plan, renders, config)
        video = concat_chunks.submit(plan, renders, master, config, wait_for=[verdicts])
        final = verify_video.submit(plan, video, config)
        published = publish_row.submit(plan, video, renders, verdicts, final, config)
        rows[plan.row.index] = [master, *renders, verdicts, video, final, published]

    # 4. Collect per-row outcomes; a failed stage fails only its own row.
    for plan in dispatch:
        futures = rows[plan.row.index]
        wait(futures)
        last = futures[-1]
        results[plan.row.index] = (
            last.result()
            if last.state.is_completed()
            else _failed(plan.row.id, _first_error(futures), plan.row.extra)
        )

    ordered = [results[index] for index in sorted(results)]
    outcome = BatchOutcome(results=ordered)
    outcome.results_url = publish_results(ordered, check.passthrough_schema, config)
    outcome.report_url = write_report(ordered, plans, config)
    return outcome


def run_batch(config: BatchConfig) -> BatchOutcome:
    """Run produce_batch with a thread pool sized for the backend."""
    workers = config.max_concurrency * 2 + 2 if config.backend == "fal" else 4
    runner = ThreadPoolTaskRunner(max_workers=workers)
    return produce_batch.with_options(task_runner=runner)(config)
