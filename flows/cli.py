"""avatarflow command line: validate, plan, run, cancel, model init-tiny (typer + rich).

Exit status: 0 every row published; 1 some rows failed (results.parquet says which and why);
2 the manifest or the options are invalid (nothing was dispatched); 130 interrupted (Ctrl-C,
SIGINT); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig, LocalSettings
    from avatarflow.tasks.manifest import ManifestCheck
    from avatarflow.tasks.records import BatchOutcome, RowPlan

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Local model utilities.")
app.add_typer(model_app, name="model")
console = Console(stderr=True, soft_wrap=True)  # error lines stay whole (paths, URLs)
out = Console()

EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID = 0, 1, 2
# Stopped by a signal: 128 + its number, as shells report it (SIGINT 130, SIGTERM 143).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Quiet, self-contained Prefect defaults for a CLI run; a user's own settings win.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_UI_ENABLED": "false",
    # The ephemeral server writes to this terminal; its shutdown noise is not the user's business.
    "PREFECT_SERVER_LOGGING_LEVEL": "CRITICAL",
}
# For the server the CLI starts itself (no PREFECT_API_URL in the environment): it has no UI and
# lives as long as the command, which keeps its own record (log file, results.parquet, report).
# It records the flow run, not every task run's three state events (its CPU was over a quarter
# of the whole command's, and it fell behind), nor stores the events again or matches them
# against automations; it gets warnings and errors only, while the log file keeps Prefect's INFO
# lines (else a "Finished in state Completed()" line per task run). Task runs keep their states,
# retries and logs in the run's own process either way.
EPHEMERAL_DEFAULTS = {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    "PREFECT_LOGGING_HANDLERS_API_LEVEL": "WARNING",
}

# After Ctrl-C or SIGTERM, polls stop at once; the run gets this long to unwind (an HTTP call in
# flight, a thread stuck in a library) before the process leaves anyway: request ids are in the
# ledger before any wait, and the ledger is consistent at every instant, so that is safe.
INTERRUPT_GRACE_S = 5.0

ManifestArg = Annotated[str, typer.Argument(help="Parquet, CSV or JSONL manifest (path or URL).")]
BackendOpt = Annotated[
    str, typer.Option("--backend", help="local | fal | auto | a registered backend")
]
DeadlineOpt = Annotated[
    str | None,
    typer.Option(help="--backend auto: finish by 06:00 (next), or within 3h, 90m, 45s ..."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="NAME=VALUE",
        help="A setting of the chosen backend (repeatable), e.g. --set device=cpu.",
    ),
]


def _backend_settings(pairs: list[str] | None) -> dict[str, str] | None:
    """--set NAME=VALUE options as a dict (the backend's settings class converts the values),
    or exit 2 on one without "="."""
    settings: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            console.print(f"[red]invalid option[/red] --set: expected NAME=VALUE, got {pair!r}")
            raise typer.Exit(EXIT_INVALID)
        settings[name.strip()] = value
    return settings or None


def _config(manifest: str, **options: Any) -> BatchConfig:
    """Build the BatchConfig or exit 2 naming the bad option."""
    from avatarflow.tasks.backends import (
        BackendSettingsError,
        UnknownBackendError,
        renderer_class,
        with_backend_settings,
    )
    from avatarflow.tasks.config import BatchConfig

    try:
        config = BatchConfig(
            manifest=manifest, **{k: v for k, v in options.items() if v is not None}
        )
        renderer_class(config.backend)
        config = with_backend_settings(config)
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            console.print(f"[red]invalid option[/red] {escape(field)}: {escape(err['msg'])}")
        raise typer.Exit(EXIT_INVALID) from None
    except UnknownBackendError as exc:
        console.print(f"[red]invalid option[/red] backend: {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    except BackendSettingsError as exc:
        console.print(f"[red]invalid option[/red] --set: {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    return config


def _checked_rows(config: BatchConfig) -> ManifestCheck:
    """Read and validate the manifest; exit 2 when it is unusable or has rows but no valid one
    (a manifest without rows is a clean no-op)."""
    from avatarflow.tasks.manifest import ManifestError, read_manifest, validate_manifest

    try:
        table = read_manifest(config.manifest)
        check = validate_manifest(table, config.manifest, check_files=True)
    except ManifestError as exc:
        console.print(f"[red]manifest error[/red]: {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    for err in check.errors:
        console.print(f"[yellow]invalid[/yellow] {escape(str(err))}")
    if not check.rows and check.errors:
        console.print("[red]no valid rows: nothing to do[/red]")
        raise typer.Exit(EXIT_INVALID)
    if not check.rows:
        console.print("the manifest has no rows: nothing to do")
    return check


@app.command()
def validate(manifest: ManifestArg) -> None:
    """Check a manifest; report every problem with row, column and reason."""
    config = _config(manifest)
    check = _checked_rows(config)
    if check.errors:
        console.print(f"{len(check.errors)} problem(s); {len(check.rows)} valid row(s)")
        raise typer.Exit(EXIT_INVALID)
    out.print(f"ok: {len(check.rows)} row(s)")


@app.command()
def plan(
    manifest: ManifestArg,
    backend: BackendOpt = "fal",
    work_dir: Annotated[str | None, typer.Option(help="Local scratch folder.")] = None,
    set_: SetOpt = None,
    deadline: DeadlineOpt = None,
    budget: Annotated[float | None, typer.Option(help="--backend auto: fal's USD cap.")] = None,
    target: Annotated[
        str, typer.Option(help="--backend auto: the target whose earlier runs it learns from.")
    ] = "./out",
    model_dir: Annotated[str | None, typer.Option(help="Local checkpoint folder.")] = None,
    dask_address: Annotated[
        str | None, typer.Option(help="--backend auto: the Dask scheduler of the GPU workers.")
    ] = None,
) -> None:
    """Show chunks, segments, video-seconds and estimated cost per row; spends nothing.
    With --backend auto: each row's backend, the predicted finish and cost, against all-local
    and all-fal."""
    from avatarflow.tasks.plan import prepare_rows
    from avatarflow.tasks.records import RowPlanTotals

    config = _config(
        manifest,
        backend=backend,
        work_dir=work_dir,
        backend_settings=_backend_settings(set_),
        deadline=deadline,
        budget_usd=budget,
        target=target,
        local=_local_settings(model_dir, dask_address),
    )
    check = _checked_rows(config)
    plans, failures = prepare_rows(check.rows, config)
    if config.backend == "auto":
        _print_split(plans, config)
    table = Table(title=f"plan ({config.backend})")
    for col in ("id", "audio s", "chunks", "segments", "video s", "est. USD"):
        table.add_column(col, justify="left" if col == "id" else "right")
    for p in plans:
        table.add_row(
            escape(p.row.id),
            f"{p.audio.duration_s:.2f}",
            str(len(p.chunks)),
            str(p.num_segments),
            f"{p.video_s:.2f}",
            f"{p.estimated_cost_usd:.2f}",
        )
    for row_id, reason in failures:
        table.add_row(escape(row_id), "[red]error[/red]", "", "", "", escape(reason))
    out.print(table)
    total = RowPlanTotals.of(plans)
    out.print(
        f"{total.rows} rows, {total.segments} segments, {total.video_s:.1f} video-s, "
        f"estimated ${total.estimated_cost_usd:.2f}"
    )
    if failures or check.errors:
        raise typer.Exit(EXIT_ROWS_FAILED)


def _local_settings(model_dir: str | None, dask_address: str | None) -> LocalSettings | None:
    """LocalSettings with the options given; None when neither was (then the environment's)."""
    from avatarflow.tasks.config import LocalSettings

    given = {"model_dir": model_dir, "dask_address": dask_address}
    local_fields = {name: value for name, value in given.items() if value is not None}
    # Unset fields still come from AVATARFLOW_LOCAL_*: the update only sets what was given.
    return LocalSettings().model_copy(update=local_fields) if local_fields else None


def _print_split(plans: list[RowPlan], config: BatchConfig) -> None:
    """--backend auto: each row's backend and why, then auto against all-local and all-fal."""
    from avatarflow.tasks.backends.auto import AutoRenderer
    from avatarflow.tasks.hybrid import split_summary

    problem = AutoRenderer.check_route(config)
    if problem is not None:
        console.print(f"[red]cannot plan[/red]: {escape(problem)}")
        raise typer.Exit(EXIT_INVALID)
    split = split_summary(plans, config)
    table = Table(
        title=f"routing (deadline {split.deadline:%Y-%m-%d %H:%M}Z, {split.workers} GPU workers)"
    )
    for col in ("id", "backend", "est. USD", "late", "why"):
        table.add_column(col)
    for p, route in zip(plans, split.routes, strict=True):
        late = "[red]yes[/red]" if route.misses_deadline else ""
        usd = f"{route.estimated_cost_usd:.2f}"
        table.add_row(escape(p.row.id), route.backend, usd, late, escape(route.reason))
    out.print(table)
    for name, (finish, cost) in split.strategies.items():
        when = "never" if finish is None else f"{finish:%Y-%m-%d %H:%M:%S}Z"
        late = "" if finish is not None and finish <= split.deadline else " (misses the deadline)"
        out.print(f"{name:>9}: finish {when}{late}, ${cost:.2f}")


@app.command()
def run(
    manifest: ManifestArg,
    target: Annotated[str, typer.Option(help="Output folder or fsspec URL.")] = "./out",
    backend: Annotated[str, typer.Option(help="local | fal | a registered backend")] = "local",
    budget: Annotated[float | None, typer.Option(help="Stop dispatching past this USD.")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    state: Annotated[str | None, typer.Option(help="Run ledger URL.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="Local scratch folder.")] = None,
    model_dir: Annotated[str | None, typer.Option(help="Local checkpoint folder.")] = None,
    dask_address: Annotated[
        str | None,
        typer.Option(help="Dask scheduler (tcp://host:8786) whose GPU=1 workers keep the model."),
    ] = None,
    chunk_target_s: Annotated[
        float | None, typer.Option(help="Cut long narration into chunks near this length.")
    ] = None,
    resubmit_ambiguous: Annotated[
        bool,
        typer.Option(
            "--resubmit-ambiguous",
            help="fal: resubmit chunks whose earlier submit may have reached fal (may pay twice).",
        ),
    ] = False,
    qc_skip: Annotated[
        str, typer.Option(help="QC gates to skip, comma-separated, e.g. face,lipsync.")
    ] = "",
    rerender_on_qc_fail: Annotated[
        bool,
        typer.Option(
            "--rerender-on-qc-fail",
            help="Render a row that fails QC once more with a new seed (counts against --budget).",
        ),
    ] = False,
    captions: Annotated[
        str,
        typer.Option(
            help="off | vtt (<id>.vtt) | all (.vtt, .srt and a subtitle track in the MP4) | auto "
            "(all when the manifest has a transcript column or a recogniser is configured).",
        ),
    ] = "auto",
    notify: Annotated[
        str | None, typer.Option(help="POST a batch summary to this URL when the run ends.")
    ] = None,
    notify_format: Annotated[
        str, typer.Option(help='json (the summary) | slack (a {"text": ...} message)')
    ] = "json",
    set_: SetOpt = None,
    deadline: DeadlineOpt = None,
) -> None:
    """Render, verify and publish every row; live progress; exit 0/1/2/130/143 as documented."""
    from avatarflow.tasks.backends import renderer_class
    from avatarflow.tasks.captions import captions_problem
    from avatarflow.tasks.config import FalSettings

    # fal's own setting, whatever the backend: a routed run may send rows to fal.
    fal = (
        FalSettings().model_copy(update={"resubmit_ambiguous": True})
        if resubmit_ambiguous
        else None
    )
    config = _config(
        manifest,
        target=target,
        backend=backend,
        budget_usd=budget,
        deadline=deadline,
        max_concurrency=max_concurrency,
        state=state,
        work_dir=work_dir,
        local=_local_settings(model_dir, dask_address),
        chunk_target_s=chunk_target_s,
        fal=fal,
        qc_skip=frozenset(name.strip() for name in qc_skip.split(",") if name.strip()),
        rerender_on_qc_fail=rerender_on_qc_fail,
        captions=captions,
        notify_url=notify,
        notify_format=notify_format,
        backend_settings=_backend_settings(set_),
    )
    _checked_rows(config)
    problem = renderer_class(config.backend).check_config(config) or captions_problem(config)
    if problem is not None:
        console.print(f"[red]cannot run[/red]: {escape(problem)}")
        raise typer.Exit(EXIT_INVALID)
    outcome = _run_locked(config)
    _print_results(outcome)
    raise typer.Exit(outcome.exit_code)


def _run_locked(config: BatchConfig) -> BatchOutcome:
    """Run the batch with live progress; Ctrl-C → 130, SIGTERM → 143, target held too long → 2."""
    from avatarflow.flows.live import run_with_progress
    from avatarflow.tasks.lease import LedgerBusyError

    interrupt = _Interrupt(_interrupt_hint(config))
    log_path = _log_to_file(config)
    lease_lines = _ConsoleLines()  # "waiting for run X …" must reach the terminal, not only the log
    logging.getLogger("avatarflow.tasks.lease").addHandler(lease_lines)
    try:
        with interrupt.installed():
            return run_with_progress(config, console)  # the flow holds the target's lease
    except LedgerBusyError as exc:
        console.print(f"[red]busy[/red]: {escape(str(exc))}")
        raise typer.Exit(EXIT_INVALID) from None
    except BaseException as exc:
        code = interrupt.exit_code_for(exc)
        if code is None:
            raise
        interrupt.say()  # the run unwound from the signal in time
        raise typer.Exit(code) from None
    finally:
        logging.getLogger("avatarflow.tasks.lease").removeHandler(lease_lines)
        console.print(f"log:     {log_path}")


def _interrupt_hint(config: BatchConfig) -> str:
    """What an interrupted run keeps and how to go on, for the backend in use."""
    from avatarflow.tasks.backends import renderer_class

    if renderer_class(config.backend).paid:
        return (
            f"interrupted: in-flight {config.backend} request ids are kept in {config.state_url}; "
            "run the same command again to resume them without paying twice, or "
            f"`avatarflow cancel {config.target}`"
        )
    return (
        f"interrupted: rendered chunks are recorded in {config.state_url}; run the same command "
        "again to resume"
    )


class _ConsoleLines(logging.Handler):
    """Warnings and errors of one logger as plain lines on the console."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]{escape(record.getMessage())}[/yellow]")


def _log_to_file(config: BatchConfig) -> Path:
    """Send Prefect's console logging (full tracebacks included) to this run's log file.

    The terminal keeps the live progress and one line per failed row; whoever needs the detail
    has the file (and, against a Prefect server, the flow run's logs).
    """
    from datetime import datetime

    from prefect.logging.handlers import PrefectConsoleHandler

    folder = config.work_path / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    for logger in (logging.getLogger(), *_named_loggers()):
        consoles = [h for h in logger.handlers if isinstance(h, PrefectConsoleHandler)]
        for console_handler in consoles:
            logger.removeHandler(console_handler)
        if consoles or logger is logging.getLogger():
            logger.addHandler(handler)
    for name in ("prefect", "avatarflow"):
        logging.getLogger(name).setLevel(logging.INFO)
    return path


def _named_loggers() -> list[logging.Logger]:
    return [v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)]


class _Interrupt:
    """SIGINT or SIGTERM during a run: stop dispatching, let the flow unwind, exit 128 + signal
    with one hint line; a second signal, or a run still unwinding after INTERRUPT_GRACE_S,
    leaves at once.

    Prefect replaces the SIGTERM handler while a flow runs (its own raises TerminationSignal in
    the main thread), so the stop flag and the grace timer are not left to Python-level
    handlers: the C-level handler writes every caught signal's number to a wakeup socket
    (signal.set_wakeup_fd), and a watcher thread acts on it whichever handler is installed.
    """

    def __init__(self, hint: str) -> None:
        self.hint = hint
        self.signum: int | None = None  # the first stop signal
        self._deliveries = 0
        self._lock = threading.Lock()
        self._said = threading.Lock()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside the block (main thread only), restoring after."""
        previous = {signum: signal.signal(signum, self._raise) for signum in STOP_SIGNALS}
        reader, writer = socket.socketpair()
        writer.setblocking(False)  # set_wakeup_fd needs it: the C handler must never block
        old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        watcher = threading.Thread(
            target=self._watch, args=(reader,), name="avatarflow-signals", daemon=True
        )
        watcher.start()
        try:
            yield
        finally:
            signal.set_wakeup_fd(old_fd)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            writer.close()  # the watcher reads EOF and ends
            watcher.join(timeout=1.0)
            reader.close()

    def exit_code_for(self, exc: BaseException) -> int | None:
        """128 + the stop signal's number when exc is how the run unwound from it, else None."""
        from prefect.exceptions import TerminationSignal

        signum = self.signum
        if signum is None and isinstance(exc, TerminationSignal):
            signum = exc.signal
        elif signum is None and isinstance(exc, KeyboardInterrupt):
            signum = signal.SIGINT
        return None if signum is None else 128 + signum

    def _raise(self, signum: int, frame: object) -> None:
        """Unwind the main thread, where the flow waits on its tasks: Prefect marks the flow run
        crashed and re-raises, and the thread pool's workers stop at their next poll."""
        self._note(signum)
        raise KeyboardInterrupt

    def _note(self, signum: int) -> None:
        from avatarflow.tasks.stop import request_stop

        with self._lock:
            if self.signum is None:
                self.signum = signum
        request_stop()  # no new paid submit; polls and waits wake up and stop

    def _watch(self, reader: socket.socket) -> None:
        """Every stop signal the process catches, whoever's handler runs for it in Python."""
        while data := reader.recv(64):
            for signum in data:
                if signum not in STOP_SIGNALS:
                    continue
                self._note(signum)
                self._deliveries += 1
                if self._deliveries > 1:  # a second signal: leave now
                    self.leave()
                watchdog = threading.Timer(INTERRUPT_GRACE_S, self.leave)
                watchdog.daemon = True  # never what keeps the process alive
                watchdog.start()

    def say(self) -> None:
        """Print the hint, once."""
        if self._said.acquire(blocking=False):
            # Plain stderr: the live display may hold rich's console lock when this runs. On a
            # line of its own: the display's last frame (or the terminal's ^C) may end without one.
            sys.stderr.write("\n" + self.hint + "\n")
            sys.stderr.flush()

    def leave(self) -> None:
        """Print the hint and end the process at once with 128 + the signal's number."""
        self.say()
        _stop_ephemeral_server()
        os._exit(128 + (self.signum or signal.SIGINT))


def _stop_ephemeral_server() -> None:
    """Stop the Prefect server this command started, if any: Prefect stops it at exit (atexit),
    which os._exit skips, and it would outlive the command."""
    server = sys.modules.get("prefect.server.api.server")
    if server is None:  # no ephemeral server was started
        return
    for instance in list(server.SubprocessASGIServer._instances.values()):
        process = getattr(instance, "server_process", None)
        if process is not None and process.poll() is None:
            process.terminate()


@app.command()
def cancel(
    target: Annotated[str, typer.Argument(help="The run's output folder or fsspec URL.")],
    state: Annotated[str | None, typer.Option(help="Run ledger URL.")] = None,
    backend: Annotated[str, typer.Option(help="The paid backend the run used.")] = "fal",
) -> None:
    """Cancel every paid request of a run that is still in flight (submitted, not downloaded)."""
    from avatarflow.tasks.backends import renderer_class
    from avatarflow.tasks.config import state_url_for
    from avatarflow.tasks.ledger import Ledger

    config = _config("-", target=target, state=state, backend=backend)
    renderer = renderer_class(config.backend)
    problem = renderer.check_config(config)
    if problem is not None:
        console.print(f"[red]cannot cancel[/red]: {escape(problem)}")
        raise typer.Exit(EXIT_INVALID)
    outcomes = renderer.cancel_in_flight(Ledger(state_url_for(target, state)))
    for record, status in outcomes:
        request = f" {record.request_id}" if record.request_id else ""
        out.print(f"{record.row_id} chunk {record.chunk}{request}: {status}")
    cancelled = sum(status == "CANCELLATION_REQUESTED" for _, status in outcomes)
    out.print(f"cancelled {cancelled} of {len(outcomes)} in-flight request(s)")


def _print_results(outcome: BatchOutcome) -> None:
    table = Table(title="results")
    for col in ("id", "status", "this run", "video", "paid USD", "error"):
        table.add_column(col)
    for r in outcome.results:
        colour = {"published": "green", "failed": "red"}.get(r.status, "yellow")
        table.add_row(
            escape(r.id),
            f"[{colour}]{r.status}[/{colour}]",
            r.run_action,
            escape(r.video_url or ""),
            f"{r.cost_usd:.2f}",
            escape(r.error or ""),
        )
    out.print(table)
    from avatarflow.tasks.route import split_outcome

    if (split := split_outcome(outcome.results)) is not None:  # --backend auto
        out.print("routing: " + "; ".join(split.lines()))
    out.print(f"results: {outcome.results_url}\nreport:  {outcome.report_url}")


@model_app.command("init-tiny")
def init_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    version: Annotated[str, typer.Option(help="1.0 (wav2vec2) or 1.5 (Whisper)")] = "1.0",
) -> None:
    """Write a tiny random-weight checkpoint in the official layout (tests, demo), with a tiny
    Whisper in whisper-large-v3/ for offline speech recognition."""
    from avatarflow.model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(directory, version=version)
    out.print(f"wrote tiny LongCat-Video-Avatar {version} checkpoint to {path}")


@app.command()
def qc(
    video: Annotated[str, typer.Argument(help="MP4 to check.")],
    audio: Annotated[
        str | None, typer.Option(help="Narration to check against (default: the MP4's own audio).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    qc_skip: Annotated[
        str, typer.Option(help="Gates to skip, comma-separated, e.g. face,lipsync.")
    ] = "",
) -> None:
    """Run the QC gates on any MP4: exit 0 all passed, 1 a gate failed, 2 unreadable/bad option."""
    import json

    from avatarflow.tasks.qc import QCInputError, run_gates
    from avatarflow.tasks.records import to_json

    skip = {name.strip() for name in qc_skip.split(",") if name.strip()}
    try:
        report = run_gates(video, audio, skip=skip)
    except QCInputError as exc:
        console.print(f"[red]qc error[/red]: {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID) from None
    if as_json:
        typer.echo(json.dumps({"video": video, **to_json(report)}, indent=2))
    else:
        table = Table(title=f"qc {escape(video)}")
        for col in ("gate", "status", "value", "threshold", "detail"):
            table.add_column(col, justify="right" if col in ("value", "threshold") else "left")
        for gate in report.gates:
            colour = {"passed": "green", "failed": "red"}.get(gate.status, "yellow")
            value, threshold = ("" if v is None else f"{v:g}" for v in (gate.value, gate.threshold))
            status = f"[{colour}]{gate.status}[/{colour}]"
            table.add_row(gate.name, status, value, threshold, escape(gate.detail))
        out.print(table)
    raise typer.Exit(EXIT_OK if report.passed else EXIT_ROWS_FAILED)


def _prefect_server_configured() -> bool:
    """Whether Prefect will talk to a server of the user's (PREFECT_API_URL in the environment or
    in the active profile, as `prefect config set` writes it), read without importing Prefect."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return False  # no profiles (a fresh machine), or one Prefect itself would refuse
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return bool(profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL"))


def main() -> None:
    """The `avatarflow` console script: Prefect defaults first (before Prefect is imported)."""
    ephemeral = not _prefect_server_configured()
    for key, value in {**PREFECT_DEFAULTS, **(EPHEMERAL_DEFAULTS if ephemeral else {})}.items():
        os.environ.setdefault(key, value)
    if ephemeral:
        _send_no_events()
    app()


def _send_no_events() -> None:
    """Events are dropped in this process instead of sent to the server the CLI starts, which
    would drop them itself (it records no task runs and stores no events): building, sending
    and reading three state events per task run cost about a tenth of a run's CPU."""
    from prefect.events.clients import NullEventsClient
    from prefect.events.worker import EventsWorker

    EventsWorker.set_client_override(NullEventsClient)


if __name__ == "__main__":
    main()
