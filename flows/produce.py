"""The batch flow: manifest → plan → render → verify → concat → verify → publish → results + report.

Wiring only: every stage is a Prefect task in tasks/. A failing row is recorded and the rest go on;
the flow run ends Completed when every row is published and Failed (with the count) otherwise,
after results, report and artifacts are published either way.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, cast
from uuid import uuid4

from prefect import flow, get_run_logger, task
from prefect.blocks.system import Secret
from prefect.client.schemas.objects import Flow as FlowSchema
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging.loggers import flow_run_logger
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from avatarflow.flows.terminal import survive_lost_terminal
from avatarflow.tasks import progress
from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.concat import concat_chunks, prepare_master_audio
from avatarflow.tasks.config import BatchConfig, FalSettings, LocalSettings, QCSettings
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.manifest import load_rows
from avatarflow.tasks.notify import notify_batch
from avatarflow.tasks.plan import Admission, prepare_row
from avatarflow.tasks.publish import (
    keep_rejected,
    publish_results,
    publish_row,
    rejected_target,
    settle_results,
)
from avatarflow.tasks.records import (
    BatchOutcome,
    ChunkVideo,
    Row,
    RowFinished,
    RowPlan,
    RowResult,
    RowsPlanned,
    RunAction,
    SidecarRerender,
    Verdict,
)
from avatarflow.tasks.render import render_chunk, render_row
from avatarflow.tasks.report import (
    ProgressArtifact,
    publish_artifacts,
    save_thumbnail,
    write_report,
)
from avatarflow.tasks.rerender import rerender_row
from avatarflow.tasks.stop import owned, request_stop
from avatarflow.tasks.verify import FinalCheck, verify_chunks, verify_video

# Our modules log through these; the flow copies Prefect's API handler onto them so their lines
# (resubmits, ambiguous submits, storage retries) show in the flow run's logs on the server.
PROJECT_LOGGERS = ("avatarflow",)
LOCAL_SHORTCUTS = ("model_dir", "dask_address")  # flat flow parameters for LocalSettings fields


def first_error(futures: list[PrefectFuture[Any]]) -> str:
    """The message of the earliest failed stage of a row (later stages only report NotReady)."""
    for future in futures:
        state = future.state
        if state.is_failed() or state.is_crashed():
            try:
                state.result()
            except Exception as exc:  # the stage's own exception, e.g. AudioError or FalError
                return f"{type(exc).__name__}: {exc}"
            return state.message or state.name or "failed"
    return "did not finish"


# What a row's error says when a stage after rendering raised before a joined video existed.
CHUNKS_KEPT = "rendered chunks kept in the ledger; a rerun re-checks them without paying"


@dataclass
class _Finishing:
    """What finish_row has made of a row so far: what a stage that raises must not throw away."""

    plan: RowPlan  # the render the videos came from (a re-render's, once there is one)
    videos: list[ChunkVideo]
    action: RunAction
    stage: str = "master audio"
    verdicts: list[Verdict] = field(default_factory=list)
    video: str | None = None  # the joined video, once concat made it
    final: FinalCheck | None = None
    rerender: SidecarRerender | None = None


@task(name="finish-row")
def finish_row(plan: RowPlan, videos: list[ChunkVideo], config: BatchConfig) -> RowResult:
    """master audio → verify chunks → concat + mux → verify video + QC → publish (or keep as
    rejected); with rerender_on_qc_fail, a QC failure is rendered once more first.

    The stages run inline (their task bodies): one task run per row instead of six keeps
    Prefect's per-task bookkeeping from being the per-row cost of a 10,000-row batch. The chunks
    were paid for: when a stage raises, the joined video is kept under _rejected/ with the
    error as its reason (or, before there is one, the row fails and says its chunks are kept).
    """
    row = _Finishing(plan, videos, "reused" if all(v.reused for v in videos) else "rendered")
    try:
        return _finish(row, config)
    except Exception as exc:  # any stage's own error: keep what was paid for
        reason = f"{row.stage} error: {type(exc).__name__}: {exc}"
        get_run_logger().error("row %s: %s", plan.row.id, reason, exc_info=True)
    if row.video is not None:
        kept = (row.plan, row.video, row.videos, row.verdicts, row.final, config, row.action)
        try:
            return keep_rejected(*kept, rerender=row.rerender, reason=reason)
        except Exception as exc:  # e.g. the target is unreachable: the ledger still has them
            reason += f" (nor kept under _rejected/: {type(exc).__name__})"
    progress.emit(RowFinished(plan.row.id, "failed"))
    return RowResult.failure(plan.row.id, f"{reason}; {CHUNKS_KEPT}", plan.row.extra)


def _finish(row: _Finishing, config: BatchConfig) -> RowResult:
    """finish_row's stages in order, noting in `row` each one's name and what it made."""
    plan, videos = row.plan, row.videos
    master = prepare_master_audio.fn(plan, config)
    row.stage = "chunk verification"
    row.verdicts = verify_chunks.fn(plan, videos, config)
    row.stage = "concat"
    row.video = concat_chunks.fn(plan, videos, master, config)
    row.stage = "qc"
    row.final = verify_video.fn(plan, row.video, config)
    if config.rerender_on_qc_fail and row.final.gates.failed:
        second = rerender_row(plan, videos, row.final, master, config)
        if isinstance(second, str):  # why not: the first render is kept as the rejected video
            row.final = row.final.with_reason(second)
        else:
            row.plan, row.videos, row.verdicts = second.plan, second.videos, second.verdicts
            row.video, row.final, row.rerender = second.video, second.final, second.record
            if not all(v.reused for v in second.videos):
                row.action = "rendered"
    row.stage = "thumbnail"
    save_thumbnail(plan, row.video, config)  # under the manifest's plan: the report looks there
    row.stage = "publish"
    return publish_row.fn(
        row.plan, row.video, row.videos, row.verdicts, row.final, config, row.action, row.rerender
    )


class _RowRenders:
    """Submits a row's render tasks as their inputs become ready (chunk 0's face for later ones)."""

    def __init__(self, plan: RowPlan, config: BatchConfig) -> None:
        self.plan, self.config = plan, config
        backend = renderer_class(config.backend)
        self.continuous = backend.continuous
        self.futures: list[PrefectFuture[Any]]  # one render-row, or one render-chunk per chunk
        if self.continuous:
            self.futures = [render_row.submit(plan, config)]
            return
        # Chunks that need chunk 0's video for identity wait for it; the others start now.
        count = 1 if backend.needs_identity(plan) else len(plan.chunks)
        self.futures = [render_chunk.submit(plan, k, config) for k in range(count)]

    def on_done(self, future: PrefectFuture[Any]) -> list[PrefectFuture[Any]]:
        """Submit what `future` unblocks: the later chunks, once chunk 0 has rendered."""
        waiting = len(self.futures) < len(self.plan.chunks) and not self.continuous
        if not waiting or future is not self.futures[0] or not future.state.is_completed():
            return []
        identity = future.result()
        later: list[PrefectFuture[Any]] = [
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
            videos: list[ChunkVideo] = self.futures[0].result()
            return videos
        return (
            [f.result() for f in self.futures]
            if len(self.futures) == len(self.plan.chunks)
            else None
        )


class _Batch:
    """Drives every row of a run from the flow's thread, streaming: rows are planned a window at
    a time, and each planned row is dispatched at once (with a budget: as soon as every earlier
    row is planned, so the budget is reserved in manifest order), then rendered and finished.

    Tasks are submitted only once their inputs exist, so no worker thread sits blocked on another
    task's future; finished futures arrive through one queue, so each costs O(1) to handle.
    """

    def __init__(self, rows: list[Row], config: BatchConfig) -> None:
        self.rows, self.config = rows, config
        self.admission = Admission(config)
        self.in_order = config.budget_usd is not None
        self.window = max(2, renderer_class(config.backend).task_threads(config) // 4)
        self.results: dict[int, RowResult] = {}
        self.dispatched: list[RowPlan] = []
        self._planned: dict[int, RowPlan | RowResult] = {}  # waiting for their turn (budget)
        self._next = self._frontier = self._planning = self._pending = 0
        self._done: queue.SimpleQueue[tuple[PrefectFuture[Any], Callable[..., None]]] = (
            queue.SimpleQueue()
        )

    def run(self) -> dict[int, RowResult]:
        """Plan, render and finish every row; return each row's result by manifest index."""
        self._plan_more()
        while self._pending:
            future, handle = self._done.get()
            self._pending -= 1
            future.wait()  # sets its final state locally (otherwise .state asks the API)
            handle(future)
        return self.results

    def _watch(self, future: PrefectFuture[Any], handle: Callable[..., None]) -> None:
        self._pending += 1
        future.add_done_callback(lambda done: self._done.put((done, handle)))

    def _plan_more(self) -> None:
        while self._next < len(self.rows) and self._planning < self.window:
            row = self.rows[self._next]
            self._next += 1
            self._planning += 1
            self._watch(prepare_row.submit(row, self.config), partial(self._on_planned, row))

    def _on_planned(self, row: Row, future: PrefectFuture[RowPlan]) -> None:
        self._planning -= 1
        if future.state.is_completed():
            self._planned[row.index] = future.result()
        else:
            self._planned[row.index] = RowResult.failure(row.id, first_error([future]), row.extra)
        if self.in_order:
            while self._frontier < len(self.rows):
                index = self.rows[self._frontier].index
                if index not in self._planned:
                    break
                self._admit(index, self._planned.pop(index))
                self._frontier += 1
        else:
            self._admit(row.index, self._planned.pop(row.index))
        self._plan_more()

    def _admit(self, index: int, planned: RowPlan | RowResult) -> None:
        if isinstance(planned, RowResult):  # planning failed
            self._finish(planned.id, index, planned)
            return
        held = self.admission.admit(planned)
        if held is not None:
            self._finish(planned.row.id, planned.row.index, held)
            return
        self.dispatched.append(planned)
        renders = _RowRenders(planned, self.config)
        for future in renders.futures:
            self._watch(future, partial(self._on_rendered, renders))

    def _on_rendered(self, renders: _RowRenders, future: PrefectFuture[Any]) -> None:
        for later in renders.on_done(future):
            self._watch(later, partial(self._on_rendered, renders))
        if not all(f.state.is_final() for f in renders.futures):
            return  # more chunks of this row are still rendering
        plan, videos = renders.plan, renders.videos()
        if videos is None:
            error = first_error(renders.futures)
            self._finish(
                plan.row.id, plan.row.index, RowResult.failure(plan.row.id, error, plan.row.extra)
            )
            return
        finish = finish_row.submit(plan, videos, self.config)
        self._watch(finish, partial(self._on_finished, plan))

    def _on_finished(self, plan: RowPlan, future: PrefectFuture[RowResult]) -> None:
        if future.state.is_completed():
            self.results[plan.row.index] = future.result()  # finish_row told the listeners
            return
        error = RowResult.failure(plan.row.id, first_error([future]), plan.row.extra)
        self._finish(plan.row.id, plan.row.index, error)

    def _finish(self, row_id: str, index: int, result: RowResult) -> None:
        self.results[index] = result
        progress.emit(RowFinished(row_id, result.status))


def _cancel_paid_requests(flow: FlowSchema, flow_run: FlowRun, state: State) -> None:
    """On cancellation: stop dispatching and cancel the run's paid requests still in flight.

    Prefect may run this hook in another process than the run's (a process worker runs it in a
    subprocess with the worker's environment), so the key is found the way the run found it:
    the Secret block the run names, else FAL_KEY here. It goes to the client, not os.environ.
    """
    request_stop(flow_run.id)  # this run only: others in the same process go on
    parameters = dict(flow_run.parameters)
    secret_name = parameters.get("fal_key_secret")
    config = batch_config(**parameters)
    backend = renderer_class(config.backend)
    # Not necessarily in the run's process: log to the run explicitly.
    logger = flow_run_logger(flow_run=flow_run)
    try:
        api_key = cast(Secret[str], Secret.load(secret_name)).get() if secret_name else None
        outcomes = backend.cancel_in_flight(Ledger.for_run(config), api_key=api_key)
    except Exception as exc:  # the run is cancelled either way: say what is left to do
        logger.error(
            "could not cancel the run's paid requests (%s: %s); run `avatarflow cancel %s` "
            "where the key is set",
            type(exc).__name__,
            exc,
            config.target,
        )
        return
    for record, outcome in outcomes:
        logger.warning(
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
    task_runner=ThreadPoolTaskRunner(max_workers=18),  # type: ignore[arg-type]  # Prefect's generics
    on_cancellation=[_cancel_paid_requests],  # type: ignore[list-item]
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
        secret = cast(Secret[str], Secret.load(fal_key_secret))  # a block, in this sync flow
        os.environ["FAL_KEY"] = secret.get()
    started = time.monotonic()
    config = batch_config(**parameters)
    problem = renderer_class(config.backend).check_config(config)
    if problem is not None:
        return Failed(message=f"cannot run: {problem}")
    ledger = Ledger.for_run(config)
    context = FlowRunContext.get()  # none when the body is called as produce_batch.fn
    run_id = context.flow_run.id if context and context.flow_run else uuid4()
    # One run per target (or per shard of a sharded run): two could pay for one chunk.
    with ledger.lock(config.shard), owned(run_id):
        # What a killed run left; nothing else writes now.
        ledger.sweep_temp_files(config.target, rejected_target(config.target))
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
    """produce_batch's parameters for a BatchConfig (the CLI's and Python callers' way in).

    A field the flow has no parameter for would be dropped on the way in: refuse it instead of
    running with a setting the caller did not ask for.
    """
    names = set(produce_batch.parameters.properties) - {*LOCAL_SHORTCUTS, "fal_key_secret"}
    dropped = sorted(config.model_fields_set - names)
    if dropped:
        raise ValueError(f"produce_batch has no parameter for {', '.join(dropped)}")
    return {name: getattr(config, name) for name in names}


class RowsFailed(Exception):
    """Rows of the batch were not published: the Failed flow run's result, with the outcome."""

    def __init__(self, outcome: BatchOutcome) -> None:
        rows, failed = len(outcome.results), len(outcome.failed)
        super().__init__(f"{failed} of {rows} rows failed; see {outcome.results_url}")
        self.outcome = outcome


class _RowsFailedIsNoCrash(logging.Filter):
    """Drops Prefect's "Engine execution exited with unexpected exception" traceback for a run
    that ended Failed because rows failed: a deployment's engine re-raises a Failed state's
    exception and logs it as if the engine broke, though the run ended as designed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], RowsFailed))


_ROWS_FAILED_IS_NO_CRASH = _RowsFailedIsNoCrash()


def _final_state(outcome: BatchOutcome) -> State[BatchOutcome]:
    """Completed when every row is published (now or before), else Failed with the count."""
    rows = len(outcome.results)
    if outcome.failed:
        error = RowsFailed(outcome)
        get_run_logger().error(str(error))
        # the run logger, and the engine's logger for the process's own output
        for name in ("prefect.flow_runs", "prefect.engine"):
            logging.getLogger(name).addFilter(_ROWS_FAILED_IS_NO_CRASH)  # once: a set
        return Failed(message=str(error), data=error)
    return Completed(
        message=f"{rows} rows published; results at {outcome.results_url}", data=outcome
    )


class _InRunsOnly(logging.Handler):
    """Prefect's API log handlers, for records logged inside a flow or task run only.

    The handlers stay on our loggers for the life of the process; a line logged outside any run
    (a later `avatarflow cancel`, the renderer used directly, a worker between runs) has no run
    to go to, and Prefect's handler would warn (or raise) instead of dropping it.
    """

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__()
        self.handlers = handlers

    def emit(self, record: logging.LogRecord) -> None:
        in_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
        if not in_run and getattr(record, "flow_run_id", None) is None:
            return
        for handler in self.handlers:
            handler.handle(record)


def _ship_project_logs() -> None:
    """Send our modules' log lines to the flow run's logs on the server, as Prefect's own."""
    api_handlers = logging.getLogger("prefect.extra").handlers
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not any(isinstance(h, _InRunsOnly) for h in logger.handlers):
            logger.addHandler(_InRunsOnly(api_handlers))


def _produce(config: BatchConfig) -> BatchOutcome:
    check = load_rows(config)
    # Keyed by manifest row index: ids may be missing or duplicated in rows that failed validation.
    results: dict[int, RowResult] = {}
    for e in check.errors:
        if e.row is not None:  # a row with several problems reports them all
            prior = results.get(e.row)
            text = str(e) if prior is None else f"{prior.error}; {e}"
            results[e.row] = RowResult.failure(e.id or f"row-{e.row}", text, check.extras(e.row))

    # Plan → admit (resume, budget) → render → verify, concat, QC → publish, row by row.
    progress.emit(RowsPlanned(len(check.rows), 0, 0.0))  # totals grow as rows are admitted
    batch = _Batch(list(check.rows), config)
    results.update(batch.run())

    # What the ledger remembers across runs: cost paid per row, first publish time.
    ordered = settle_results([results[index] for index in sorted(results)], config)
    logger = get_run_logger()
    for result in ordered:
        if result.status != "published":
            logger.warning("row %s %s: %s", result.id, result.status, result.error)
    results_url = publish_results(ordered, check.passthrough_schema, config)
    report_url = write_report(ordered, batch.dispatched, config)
    estimated = batch.admission.reserved_usd
    return BatchOutcome(tuple(ordered), results_url, report_url, estimated)


def run_batch(config: BatchConfig) -> BatchOutcome:
    """Run produce_batch for config, with a thread pool sized for the backend; its outcome."""
    threads = renderer_class(config.backend).task_threads(config)
    runner: ThreadPoolTaskRunner[Any] = ThreadPoolTaskRunner(max_workers=threads)
    flow_run = produce_batch.with_options(task_runner=runner)  # type: ignore[arg-type]
    state = flow_run(**flow_parameters(config), return_state=True)
    outcome = state.result(raise_on_failure=False)
    if isinstance(outcome, RowsFailed):
        return outcome.outcome
    if isinstance(outcome, BaseException):
        raise outcome
    if not isinstance(outcome, BatchOutcome):  # refused before any row ran
        raise RuntimeError(state.message or state.name)
    return outcome
