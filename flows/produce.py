"""The batch flow: manifest → plan → render → verify → concat → verify → publish → results + report.

Wiring only: every stage is a Prefect task in tasks/. A failing row is recorded and the rest go on;
the flow run ends Completed when every row is published and Failed (with the count) otherwise,
after results, report and artifacts are published either way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Literal

from prefect import flow, get_run_logger, task, unmapped
from prefect.blocks.system import Secret
from prefect.client.schemas.objects import Flow as FlowSchema
from prefect.client.schemas.objects import FlowRun
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.terminal import survive_lost_terminal
from tasks import progress
from tasks.backends import renderer_class
from tasks.concat import concat_chunks, prepare_master_audio
from tasks.config import BatchConfig, FalSettings, LocalSettings, QCSettings
from tasks.ledger import Ledger
from tasks.manifest import load_rows
from tasks.notify import notify_batch
from tasks.plan import budget_gate, prepare_row
from tasks.publish import publish_results, publish_row, settle_results
from tasks.records import BatchOutcome, ChunkVideo, RowFinished, RowPlan, RowResult, RunAction
from tasks.render import render_chunk, render_row
from tasks.report import ProgressArtifact, publish_artifacts, save_thumbnail, write_report
from tasks.rerender import rerender_row
from tasks.stop import request_stop
from tasks.verify import verify_chunks, verify_video

# Our modules log through these; the flow copies Prefect's API handler onto them so their lines
# (resubmits, ambiguous submits, storage retries) show in the flow run's logs on the server.
PROJECT_LOGGERS = ("tasks", "flows")
LOCAL_SHORTCUTS = ("model_dir", "dask_address")  # flat flow parameters for LocalSettings fields


def _failed(row_id: str, error: str, extra: dict[str, Any] | None = None) -> RowResult:
    return RowResult(id=row_id, status="failed", error=error, extra=extra or {})


def _first_error(futures: list[PrefectFuture[Any]]) -> str:
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
    """verify chunks → concat + mux → verify video + QC → publish (or keep as rejected), as nested
    stage tasks of one row; with rerender_on_qc_fail, a QC failure is rendered once more first."""
    verdicts = verify_chunks(plan, videos, config)
    video = concat_chunks(plan, videos, master, config)
    final = verify_video(plan, video, config)
    rendered, rerender, reused = plan, None, all(v.reused for v in videos)
    if config.rerender_on_qc_fail and final.gates.failed:
        second = rerender_row(plan, videos, final, master, config)
        if isinstance(second, str):  # why not: the first render is kept as the rejected video
            final = final.with_reason(second)
        else:
            rendered, videos, verdicts = second.plan, second.videos, second.verdicts
            video, final, rerender = second.video, second.final, second.record
            reused = reused and all(v.reused for v in videos)
    save_thumbnail(plan, video, config)  # under the manifest's plan: the report looks there
    action: RunAction = "reused" if reused else "rendered"
    return publish_row(rendered, video, videos, verdicts, final, config, action, rerender)


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


def _cancel_paid_requests(flow: FlowSchema, flow_run: FlowRun, state: State) -> None:
    """On cancellation: stop dispatching and cancel the run's paid requests still in flight."""
    request_stop()
    config = batch_config(**flow_run.parameters)
    backend = renderer_class(config.backend)
    for record, outcome in backend.cancel_in_flight(Ledger.for_run(config)):
        logging.getLogger(__name__).warning(
            "row %s chunk %d: request %s %s",
            record.row_id,
            record.chunk,
            record.request_id,
            outcome,
        )


# The thread pool is bounded by default, for deployments too (Prefect's own default is
# unbounded); run_batch sizes it from the backend.
@flow(
    name="produce-batch",
    log_prints=False,
    task_runner=ThreadPoolTaskRunner(max_workers=18),
    on_cancellation=[_cancel_paid_requests],
)
def produce_batch(
    manifest: str,
    target: str = "./out",
    backend: str = "local",
    model_dir: str | None = None,
    budget_usd: float | None = None,
    max_concurrency: int = 8,
    state: str | None = None,
    work_dir: str | None = None,
    chunk_target_s: float = 60.0,
    resubmit_ambiguous: bool = False,
    qc: QCSettings | None = None,
    qc_skip: list[str] | None = None,
    rerender_on_qc_fail: bool = False,
    fal_key_secret: str | None = None,
    dask_address: str | None = None,
    notify_url: str | None = None,
    notify_format: Literal["json", "slack"] = "json",
    shard: str | None = None,
    results_name: str = "results.parquet",
    report_name: str = "report.html",
    fal: FalSettings | None = None,
    local: LocalSettings | None = None,
) -> State[BatchOutcome]:
    """Render, check and publish every row of a manifest.

    Every parameter is flat, so a run that overrides some keeps the deployment's others. The fal
    key is never a parameter: it comes from the worker's FAL_KEY, or from the Prefect Secret block
    named by `fal_key_secret`, read here at run time. `fal` and `local` default to the worker's
    environment (FAL_*, AVATARFLOW_LOCAL_*); `model_dir` is the local checkpoint folder ("tiny"
    for the random-weight demo checkpoint) and `dask_address` the Dask scheduler whose GPU workers
    keep it loaded ("local": a LocalCluster with one worker per GPU).
    """
    parameters = dict(locals())  # the flow's parameters as given, before other names are bound
    survive_lost_terminal()
    _ship_project_logs()
    if fal_key_secret:
        os.environ["FAL_KEY"] = Secret.load(fal_key_secret).get()
    started = time.monotonic()
    config = batch_config(**parameters)
    problem = renderer_class(config.backend).check_config(config)
    if problem is not None:
        return Failed(message=f"cannot run: {problem}")
    ledger = Ledger.for_run(config)
    # One run per target (or per shard of a sharded run): two could pay for one chunk.
    with ledger.run_slot(config.shard), ledger.lock(config.shard):
        ledger.sweep_temp_files(config.target)  # what a killed run left; nothing else writes now
        with ProgressArtifact.tracking(config):
            outcome = _produce(config)
    publish_artifacts(outcome, config, time.monotonic() - started)
    notify_batch(outcome, config)
    return _final_state(outcome)


def batch_config(**parameters: Any) -> BatchConfig:
    """The run's BatchConfig from the flow's parameters (unset ones: defaults and environment)."""
    parameters.pop("fal_key_secret", None)
    # Flat conveniences for the two local settings a deployment sets most.
    shortcuts = {name: parameters.pop(name, None) for name in LOCAL_SHORTCUTS}
    local_update = {name: value for name, value in shortcuts.items() if value is not None}
    given = {name: value for name, value in parameters.items() if value is not None}
    if local_update:
        local = given.get("local") or LocalSettings()
        local = LocalSettings.model_validate(local) if isinstance(local, dict) else local
        given["local"] = local.model_copy(update=local_update)
    return BatchConfig(**given)


def flow_parameters(config: BatchConfig) -> dict[str, Any]:
    """produce_batch's parameters for a BatchConfig (the CLI's and Python callers' way in)."""
    names = set(produce_batch.parameters.properties) - {*LOCAL_SHORTCUTS, "fal_key_secret"}
    return {name: getattr(config, name) for name in names}


class RowsFailed(Exception):
    """Rows of the batch were not published: the Failed flow run's result, with the outcome."""

    def __init__(self, outcome: BatchOutcome) -> None:
        rows, failed = len(outcome.results), len(outcome.failed)
        super().__init__(f"{failed} of {rows} rows failed; see {outcome.results_url}")
        self.outcome = outcome


def _final_state(outcome: BatchOutcome) -> State[BatchOutcome]:
    """Completed when every row is published (now or before), else Failed with the count."""
    rows = len(outcome.results)
    if outcome.failed:
        error = RowsFailed(outcome)
        get_run_logger().error(str(error))
        return Failed(message=str(error), data=error)
    return Completed(
        message=f"{rows} rows published; results at {outcome.results_url}", data=outcome
    )


def _ship_project_logs() -> None:
    """Send our modules' log lines to the flow run's logs on the server, as Prefect's own."""
    api_handlers = logging.getLogger("prefect.extra").handlers
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in api_handlers:
            if handler not in logger.handlers:
                logger.addHandler(handler)


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

    # What the ledger remembers across runs: cost paid per row, first publish time.
    ordered = settle_results([results[index] for index in sorted(results)], config)
    logger = get_run_logger()
    for result in ordered:
        if result.status != "published":
            logger.warning("row %s %s: %s", result.id, result.status, result.error)
    results_url = publish_results(ordered, check.passthrough_schema, config)
    report_url = write_report(ordered, plans, config)
    estimated = sum(p.estimated_cost_usd for p in dispatch)
    return BatchOutcome(tuple(ordered), results_url, report_url, estimated)


def run_batch(config: BatchConfig) -> BatchOutcome:
    """Run produce_batch for config, with a thread pool sized for the backend; its outcome."""
    runner = ThreadPoolTaskRunner(max_workers=renderer_class(config.backend).task_threads(config))
    flow_run = produce_batch.with_options(task_runner=runner)
    state = flow_run(**flow_parameters(config), return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, RowsFailed):
        return outcome.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    if not isinstance(outcome, BatchOutcome):  # refused before any row ran
        raise RuntimeError(state.message or state.name)
    return outcome
