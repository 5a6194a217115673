"""The batch flow: manifest → plan → render → verify → concat → verify → publish → results + report.

Wiring only: the stages live in tasks/; row_stages lists one row's in order, and tasks/stream.py
runs them for every row. A failing row is recorded and the rest go on; the flow run ends
Completed when every row is published and Failed (with the count) otherwise, after results,
report and artifacts are published either way.
"""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import Any, Literal, TypeVar, cast
from uuid import uuid4

from prefect import Task, flow, get_run_logger
from prefect.blocks.system import Secret
from prefect.client.schemas.objects import Flow as FlowSchema
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.futures import PrefectFuture
from prefect.logging.loggers import flow_run_logger
from prefect.states import Completed, Failed
from prefect.utilities.annotations import quote

from avatarflow.flows.terminal import survive_lost_terminal
from avatarflow.tasks import progress
from avatarflow.tasks.backends import (
    BackendSettingsError,
    renderer_class,
    with_backend_settings,
)
from avatarflow.tasks.captions import captions_problem, resolve_mode
from avatarflow.tasks.config import (
    BatchConfig,
    CaptionSettings,
    CaptionsMode,
    FalSettings,
    LocalSettings,
    QCSettings,
    RouteSettings,
)
from avatarflow.tasks.finish import finish_row
from avatarflow.tasks.hybrid import admission_for
from avatarflow.tasks.lean import LeanThreadPoolTaskRunner, forget_result_links
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.manifest import ManifestCheck, load_rows
from avatarflow.tasks.notify import notify_batch
from avatarflow.tasks.plan import Admission, prepare_row
from avatarflow.tasks.publish import publish_results, rejected_target, settle_results
from avatarflow.tasks.records import (
    BatchOutcome,
    ChunkVideo,
    Row,
    RowFinished,
    RowPlan,
    RowResult,
    RowsPlanned,
)
from avatarflow.tasks.render import render_chunk, render_row
from avatarflow.tasks.report import ProgressArtifact, publish_artifacts, write_report
from avatarflow.tasks.route import AUTO
from avatarflow.tasks.stop import owned, request_stop
from avatarflow.tasks.stream import IN_ORDER, Stages, Stream, first_error

# Our modules log through these; the flow copies Prefect's API handler onto them so their lines
# (resubmits, ambiguous submits, storage retries) show in the flow run's logs on the server.
PROJECT_LOGGERS = ("avatarflow",)
LOCAL_SHORTCUTS = ("model_dir", "dask_address")  # flat flow parameters for LocalSettings fields
R = TypeVar("R")


def row_stages(
    row: Row, config: BatchConfig, admission: Admission, dispatched: list[RowPlan]
) -> Stages[RowResult]:
    """One row's stages in order: prepare → admit (resume, budget) → render → finish.

    A generator the streaming driver runs: each `yield` waits for what it names to finish.
    """
    planned = yield _submit(prepare_row, row, config, after=[])
    if not planned.state.is_completed():
        return _end(row, first_error([planned]))
    plan: RowPlan = planned.result()
    yield IN_ORDER  # with a budget, rows reserve their estimates in manifest order
    held = admission.admit(plan)
    if held is not None:  # published before from these inputs, or over the budget
        return _end(row, held)
    dispatched.append(plan)
    plan, config = yield from admission.dispatch(plan, config)  # auto: the row's backend
    rendered = yield from render_stages(plan, config, planned)
    plan = admission.rendered(plan, not isinstance(rendered, str))
    if isinstance(rendered, str):
        return _end(row, rendered)
    videos, renders = rendered
    finished = yield _submit(finish_row, plan, videos, config, after=renders)
    if not finished.state.is_completed():
        return _end(row, first_error([finished]))
    result: RowResult = finished.result()  # finish_row told the listeners
    forget_result_links()  # nothing reads them: arguments go quoted (see _submit)
    return result


def render_stages(
    plan: RowPlan, config: BatchConfig, planned: PrefectFuture[RowPlan]
) -> Stages[tuple[list[ChunkVideo], list[PrefectFuture[Any]]] | str]:
    """Render a row: every chunk at once, or chunk 0 first when later chunks need its face.
    Its videos in chunk order and the renders' futures, or the first render's error."""
    backend, count = renderer_class(config.backend), len(plan.chunks)
    futures: list[PrefectFuture[Any]]
    if backend.continuous:
        futures = yield [_submit(render_row, plan, config, after=[planned])]
    elif backend.needs_identity(plan):
        futures = yield [_submit(render_chunk, plan, 0, config, after=[planned])]
        if futures[0].state.is_completed():
            identity, after = futures[0].result(), [planned, futures[0]]
            futures += yield [
                _submit(render_chunk, plan, k, config, identity=identity, after=after)
                for k in range(1, count)
            ]
    else:
        futures = yield [
            _submit(render_chunk, plan, k, config, after=[planned]) for k in range(count)
        ]
    if not all(f.state.is_completed() for f in futures):
        return first_error(futures)
    if backend.continuous:
        videos: list[ChunkVideo] = futures[0].result()
        return videos, futures
    return [f.result() for f in futures], futures


def _submit(
    task: Task[..., R], *args: Any, after: list[PrefectFuture[Any]], **kwargs: Any
) -> PrefectFuture[R]:
    """task.submit with its arguments handed over as they are: unquoted, Prefect walks every
    field of a plan or config at submit and again in the worker, looking for futures to resolve
    and results to link (~5 % of the flow's CPU in a profile). The lineage goes in wait_for."""
    quoted = {name: quote(value) for name, value in kwargs.items()}
    return task.submit(*map(quote, args), wait_for=after, return_state=False, **quoted)


def _end(row: Row, result: RowResult | str) -> RowResult:
    """A row that ends before finish-row: its result (or a failure saying why), told to the
    listeners (finish-row tells its own)."""
    if isinstance(result, str):
        result = RowResult.failure(row.id, result, row.extra)
    progress.emit(RowFinished(row.id, result.status))
    forget_result_links()  # as at a row's normal end: a rerun's rows mostly end here
    return result


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
    task_runner=LeanThreadPoolTaskRunner(max_workers=18),  # type: ignore[arg-type]  # Prefect's generics
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
    qc: QCSettings | None = None,
    qc_skip: list[str] | None = None,
    rerender_on_qc_fail: bool = False,
    captions: CaptionsMode = "auto",
    caption_settings: CaptionSettings | None = None,
    fal_key_secret: str | None = None,
    dask_address: str | None = None,
    notify_url: str | None = None,
    notify_format: Literal["json", "slack"] = "json",
    shard: str | None = None,
    results_name: str = "results.parquet",
    report_name: str = "report.html",
    deadline: str | None = None,
    route: RouteSettings | None = None,
    fal: FalSettings | None = None,
    local: LocalSettings | None = None,
    backend_settings: dict[str, Any] | None = None,
) -> State[BatchOutcome]:
    """Render, check and publish every row of a manifest.

    Every parameter is flat, so a run that overrides some keeps the deployment's others. The fal
    key is never a parameter: it comes from the worker's FAL_KEY, or from the Prefect Secret block
    named by `fal_key_secret`, read here at run time. `fal` and `local` default to the worker's
    environment (FAL_*, AVATARFLOW_LOCAL_*); `model_dir` is the local checkpoint folder ("tiny"
    for the random-weight demo checkpoint) and `dask_address` the Dask scheduler whose GPU workers
    keep it loaded ("local": a LocalCluster with one worker per GPU). backend "auto" renders on
    those workers first and overflows to fal to finish by `deadline` ("06:00", "3h"; `route`
    holds its priors; docs/routing.md). `backend_settings` sets
    fields of the chosen backend's own settings by name (any registered backend's, checked when
    the run starts); unset ones come from that backend's environment variables. `captions`:
    off, vtt (<id>.vtt), all (.vtt, .srt and a subtitle track in the MP4) or auto (all when the
    manifest has a transcript column or the backend has a recogniser configured).
    """
    parameters = dict(locals())  # the flow's parameters as given, before other names are bound
    survive_lost_terminal()
    _ship_project_logs()
    if fal_key_secret:
        secret = cast(Secret[str], Secret.load(fal_key_secret))  # a block, in this sync flow
        os.environ["FAL_KEY"] = secret.get()
    started = time.monotonic()
    try:
        config = batch_config(**parameters)
    except BackendSettingsError as exc:
        return Failed(message=f"cannot run: {exc}")
    problem = renderer_class(config.backend).check_config(config) or captions_problem(config)
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
    return with_backend_settings(BatchConfig(**given))


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
    """validate → prepare, admit, render, finish each row (streaming) → settle → results, report."""
    # 1. Validate the manifest; an invalid row is a failed row.
    check = load_rows(config)
    results = _invalid_rows(check)
    config = resolve_mode(config, check.transcript_column)  # auto captions: on or off now

    # 2. Prepare → admit → render → finish, row by row, streaming (row_stages).
    progress.emit(RowsPlanned(len(check.rows), 0, 0.0))  # totals grow as rows are admitted
    admission, dispatched = admission_for(config), list[RowPlan]()
    window = max(2, renderer_class(config.backend).task_threads(config) // 4)  # rows preparing
    # With a budget or a deadline, rows are admitted (and routed) in manifest order.
    in_order = config.budget_usd is not None or config.backend == AUTO
    stream: Stream[Row, RowResult] = Stream(window, in_order=in_order)
    stages = partial(row_stages, config=config, admission=admission, dispatched=dispatched)
    try:
        finished = stream.run(check.rows, stages)
    finally:
        admission.close()
    results.update({row.index: result for row, result in zip(check.rows, finished, strict=True)})

    # 3. Settle what the ledger remembers across runs: cost paid per row, first publish time.
    ordered = settle_results([results[index] for index in sorted(results)], config)
    logger = get_run_logger()
    for result in ordered:
        if result.status != "published":
            logger.warning("row %s %s: %s", result.id, result.status, result.error)

    # 4. Publish results.parquet and the report.
    results_url = publish_results(ordered, check.passthrough_schema, config)
    report_url = write_report(ordered, dispatched, config)
    return BatchOutcome(tuple(ordered), results_url, report_url, admission.reserved_usd)


def _invalid_rows(check: ManifestCheck) -> dict[int, RowResult]:
    """A failed result per row that failed validation, by manifest row index (their ids may be
    missing or duplicated); a row with several problems reports them all."""
    results: dict[int, RowResult] = {}
    for e in check.errors:
        if e.row is not None:
            prior = results.get(e.row)
            text = str(e) if prior is None else f"{prior.error}; {e}"
            results[e.row] = RowResult.failure(e.id or f"row-{e.row}", text, check.extras(e.row))
    return results


def run_batch(config: BatchConfig) -> BatchOutcome:
    """Run produce_batch for config, with a thread pool sized for the backend; its outcome."""
    threads = renderer_class(config.backend).task_threads(config)
    runner = LeanThreadPoolTaskRunner(max_workers=threads)
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
