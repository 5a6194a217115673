"""A flow-run process whose terminal goes away (its worker was killed) keeps running: prints and
Prefect's console log handler (rich, which turns a broken pipe into SystemExit) included."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys, time
from pathlib import Path
from prefect.logging import get_logger
from prefect.logging.configuration import setup_logging
setup_logging()  # Prefect's console handler takes sys.stderr now, as in a flow-run process
{guard}
time.sleep(1.0)  # the reader of our stdout goes away meanwhile
for _ in range(1000):
    print("progress line " * 20)
    get_logger("engine").warning("a log line " * 20)
sys.stderr.write("and errors too\\n")
Path(sys.argv[1]).write_text("published")
"""


def _run(tmp_path: Path, guard: str) -> bool:
    marker = tmp_path / f"done-{len(guard)}"
    code = CHILD.format(guard=guard)
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(marker)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert child.stdout is not None
    assert child.stderr is not None
    child.stdout.close()  # the worker dies: nobody reads the run's output any more
    child.stderr.close()
    child.wait(timeout=60)
    time.sleep(0.1)
    return marker.exists()


def test_a_run_survives_its_terminal_going_away(tmp_path: Path) -> None:
    guard = "from avatarflow.flows.terminal import survive_lost_terminal; survive_lost_terminal()"
    assert _run(tmp_path, guard)


def test_without_the_guard_the_lost_terminal_kills_the_run(tmp_path: Path) -> None:
    assert not _run(tmp_path, "")  # the failure the guard exists for


def test_guarding_sys_streams_alone_is_not_enough(tmp_path: Path) -> None:
    """Prefect's console handler holds the stream it found when logging was set up."""
    guard = (
        "from avatarflow.flows.terminal import _LostTerminalProof; "
        "sys.stdout, sys.stderr = _LostTerminalProof(sys.stdout), _LostTerminalProof(sys.stderr)"
    )
    assert not _run(tmp_path, guard)
