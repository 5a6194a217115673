"""Ctrl-C (SIGINT) and SIGTERM stop `avatarflow run` within seconds wherever it waits, exit
128 + the signal (130, 143), keep every submitted request id in the ledger, and a rerun resumes
them without paying twice.

Each stage is a place a run can wait when the signal comes; a stage names its CLI arguments and
when the run is there, so other waits (a Dask cluster, a GPU) are added as one more entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from avatarflow.tasks.ledger import Ledger
from tests.factories import write_manifest, write_narrations
from tests.fakes.fal_server import FakeFal

pytestmark = pytest.mark.usefixtures("prefect_server")

AVATARFLOW = str(Path(sys.executable).with_name("avatarflow"))
ROWS = {"a": 3.0, "b": 3.0, "c": 3.0}
RENDER_S = 20.0  # fal's render time: requests are in flight when the signal comes
STOP_WITHIN_S = 10.0


@dataclass(frozen=True)
class Stage:
    """Where the run waits when the signal comes."""

    args: tuple[str, ...]
    reached: Callable[[Path], bool]  # given the run's ledger folder


def _requests(state: Path) -> int:
    return len(list(state.glob("rows/*/*/chunk-*.request.json")))


STAGES = {
    # Two requests rendering on fal, the third row waiting for a free slot.
    "fal": Stage(
        ("--backend", "fal", "--max-concurrency", "2"), lambda state: _requests(state) >= 2
    ),
}
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143)}
# Ctrl-C on fal is also test_resume's (fast) Ctrl-C test: here it runs with the slow tests.
SIGNAL_PARAMS = [
    pytest.param("SIGINT", marks=pytest.mark.slow),
    pytest.param("SIGTERM"),
]


@pytest.fixture(scope="module")
def fal() -> Iterator[FakeFal]:
    with FakeFal(latency_s=RENDER_S) as fake:
        yield fake


def _env(fal: FakeFal, root: Path) -> dict[str, str]:
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FAL_"))}
    return (
        env
        | fal.env()
        | {
            "PREFECT_API_URL": str(get_current_settings().api.url),  # the session's test server
            "PREFECT_HOME": str(root / "prefect"),
        }
    )


def _start(manifest: str, root: Path, env: dict[str, str], stage: Stage) -> subprocess.Popen[bytes]:
    args = [AVATARFLOW, "run", manifest, *stage.args]
    args += ["--target", str(root / "out"), "--work-dir", str(root / "work")]
    with (root / "log.txt").open("ab") as log:
        return subprocess.Popen(args, env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("stage_name", STAGES)
@pytest.mark.parametrize("signal_name", SIGNAL_PARAMS)
def test_a_signal_stops_the_run_within_seconds_and_the_rerun_pays_nothing_twice(
    fal: FakeFal, tmp_path: Path, stage_name: str, signal_name: str
) -> None:
    stage, (signum, code) = STAGES[stage_name], SIGNALS[signal_name]
    manifest = write_manifest(tmp_path / "m.parquet", write_narrations(tmp_path, ROWS))
    state, env = tmp_path / "out" / ".avatarflow", _env(fal, tmp_path)
    fal.reset()
    proc = _start(manifest, tmp_path, env, stage)
    try:
        deadline = time.monotonic() + 180
        while not stage.reached(state):
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the stage"
            time.sleep(0.05)
        proc.send_signal(signum)
        sent = time.monotonic()
        assert proc.wait(timeout=60) == code
        assert time.monotonic() - sent < STOP_WITHIN_S
    finally:
        proc.kill()
    log = (tmp_path / "log.txt").read_text()
    assert sum(line.startswith("interrupted: in-flight") for line in log.splitlines()) == 1, log
    kept = Ledger(str(state)).in_flight()
    assert kept
    assert all(record.request_id for record in kept)  # every submitted request is remembered
    assert {r.request_id for r in kept} == set(fal.request_ids)  # and nothing was sent after
    submitted = fal.submissions

    rerun = _start(manifest, tmp_path, env, stage)
    try:
        assert rerun.wait(timeout=180) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        rerun.kill()
    assert fal.submissions == submitted + len(ROWS) - len(kept)  # only the rows never submitted
    assert fal.billed_units == pytest.approx(len(ROWS) * 93 / 16)  # every row paid once
    statuses = pq.read_table(tmp_path / "out" / "results.parquet").column("status").to_pylist()
    assert statuses == ["published"] * len(ROWS)
