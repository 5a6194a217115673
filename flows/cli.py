"""avatarflow command line: validate, plan, run, model init-tiny (typer + rich).

Exit status: 0 every row published; 1 some rows failed (results.parquet says which and why);
2 the manifest or the options are invalid (nothing was dispatched); 130 interrupted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
model_app = typer.Typer(no_args_is_help=True, help="Local model utilities.")
app.add_typer(model_app, name="model")
console = Console(stderr=True)
out = Console()

EXIT_OK, EXIT_ROWS_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130

# Quiet, self-contained Prefect defaults for a CLI run; a user's own settings win.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_UI_ENABLED": "false",
}

ManifestArg = Annotated[str, typer.Argument(help="Parquet, CSV or JSONL manifest (path or URL).")]
BackendOpt = Annotated[str, typer.Option("--backend", help="local | fal")]


def _config(manifest: str, **options: Any):
    """Build the BatchConfig or exit 2 naming the bad option."""
    from flows.settings import BatchConfig

    try:
        return BatchConfig(manifest=manifest, **{k: v for k, v in options.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            console.print(f"[red]invalid option[/red] {field}: {err['msg']}")
        raise typer.Exit(EXIT_INVALID) from None


def _checked_rows(config):
    """Read and validate the manifest; exit 2 when it is unusable or has no valid row."""
    from tasks.manifest import ManifestError, read_manifest, validate_manifest

    try:
        check = validate_manifest(read_manifest(config.manifest), config.manifest)
    except ManifestError as exc:
        console.print(f"[red]manifest error[/red]: {exc}")
        raise typer.Exit(EXIT_INVALID) from None
    for err in check.errors:
        console.print(f"[yellow]invalid[/yellow] {err}")
    if not check.rows:
        console.print("[red]no valid rows: nothing to do[/red]")
        raise typer.Exit(EXIT_INVALID)
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
) -> None:
    """Show chunks, segments, video-seconds and estimated cost per row; spends nothing."""
    from tasks.plan import plan_manifest_rows, summarize

    config = _config(manifest, backend=backend, work_dir=work_dir)
    check = _checked_rows(config)
    plans, failures = plan_manifest_rows(check.rows, config)
    table = Table(title=f"plan ({config.backend})")
    for col in ("id", "audio s", "chunks", "segments", "video s", "est. USD"):
        table.add_column(col, justify="left" if col == "id" else "right")
    for p in plans:
        table.add_row(
            p.row.id,
            f"{p.audio.duration_s:.2f}",
            str(len(p.chunks)),
            str(p.num_segments),
            f"{p.video_s:.2f}",
            f"{p.estimated_cost_usd:.2f}",
        )
    for row_id, reason in failures:
        table.add_row(row_id, "[red]error[/red]", "", "", "", reason)
    out.print(table)
    total = summarize(plans)
    out.print(
        f"{total['rows']} rows, {total['segments']} segments, {total['video_s']:.1f} video-s, "
        f"estimated ${total['estimated_cost_usd']:.2f}"
    )
    if failures or check.errors:
        raise typer.Exit(EXIT_ROWS_FAILED)


@app.command()
def run(
    manifest: ManifestArg,
    target: Annotated[str, typer.Option(help="Output folder or fsspec URL.")] = "./out",
    backend: Annotated[str, typer.Option(help="local | fal")] = "local",
    budget: Annotated[float | None, typer.Option(help="Stop dispatching past this USD.")] = None,
    max_concurrency: Annotated[int, typer.Option(help="Requests in flight at once.")] = 8,
    state: Annotated[str | None, typer.Option(help="Run ledger URL.")] = None,
    work_dir: Annotated[str | None, typer.Option(help="Local scratch folder.")] = None,
    model_dir: Annotated[str | None, typer.Option(help="Local checkpoint folder.")] = None,
) -> None:
    """Render, verify and publish every row; live progress; exit 0/1/2 as documented."""
    from flows.settings import LocalSettings

    local = LocalSettings(model_dir=model_dir) if model_dir else None
    config = _config(
        manifest,
        target=target,
        backend=backend,
        budget_usd=budget,
        max_concurrency=max_concurrency,
        state=state,
        work_dir=work_dir,
        local=local,
    )
    _checked_rows(config)
    if config.backend == "fal" and config.fal.api_key() is None:
        console.print("[red]FAL_KEY is not set[/red]: the fal backend needs an API key")
        raise typer.Exit(EXIT_INVALID)
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from flows.live import run_with_progress

    try:
        outcome = run_with_progress(config, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: in-flight request ids are in the ledger")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_results(outcome)
    raise typer.Exit(outcome.exit_code)


def _print_results(outcome) -> None:
    table = Table(title="results")
    for col in ("id", "status", "video", "cost USD", "error"):
        table.add_column(col)
    for r in outcome.results:
        colour = {"published": "green", "failed": "red"}.get(r.status, "yellow")
        table.add_row(
            r.id,
            f"[{colour}]{r.status}[/{colour}]",
            r.video_url or "",
            f"{r.cost_usd:.2f}",
            r.error or "",
        )
    out.print(table)
    out.print(f"results: {outcome.results_url}\nreport:  {outcome.report_url}")


@model_app.command("init-tiny")
def init_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write the checkpoint into.")],
    version: Annotated[str, typer.Option(help="1.0 (wav2vec2) or 1.5 (Whisper)")] = "1.0",
) -> None:
    """Write a tiny random-weight checkpoint in the official layout (tests, demo)."""
    from model.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(directory, version=version)
    out.print(f"wrote tiny LongCat-Video-Avatar {version} checkpoint to {path}")


def main() -> None:
    """Entry point used by `python -m flows.cli`."""
    app()


if __name__ == "__main__":
    sys.exit(main())
