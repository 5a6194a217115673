"""Run the avatarflow CLI in-process as a user would, on a terminal wide enough that rich never
folds a long path or URL of a message across lines (xdist's tmp paths are long)."""

from __future__ import annotations

from click.testing import Result
from typer.testing import CliRunner

from avatarflow.flows.cli import app

COLUMNS = "1000"


def invoke(*args: str) -> Result:
    """`avatarflow ARGS...` in this process; its exit code and its stdout + stderr."""
    return CliRunner(env={"COLUMNS": COLUMNS}).invoke(app, list(args))


def flat(text: str) -> str:
    """Text with every run of whitespace (line breaks included) as one space."""
    return " ".join(text.split())
