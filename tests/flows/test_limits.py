"""Limits that hold across runs: the shared fal concurrency limit (on a Prefect server), and one
run at a time per target, with or without a server: a second run waits, then reuses."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from tests.fakes.fal_server import FakeFal
from tests.fakes.s3_server import S3Server
from tests.media_factory import write_narration

pytestmark = pytest.mark.slow


def _manifest(folder: Path, rows: int, prefix: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        write_narration(folder / f"{prefix}{i}.wav", 2.0, "wav", seed=i)
        records.append({"id": f"{prefix}{i}", "audio": f"{prefix}{i}.wav"})
    pq.write_table(pa.Table.from_pylist(records), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def _config(fake: FakeFal, manifest: str, target: str, work: Path) -> BatchConfig:
    return BatchConfig(
        manifest=manifest,
        target=target,
        backend="fal",
        work_dir=str(work),
        max_concurrency=8,
        fal=fake.settings(),
    )


@pytest.mark.usefixtures("prefect_server")
def test_two_batches_share_the_global_fal_limit(fake: FakeFal, tmp_path: Path) -> None:
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="avatarflow-fal", limit=3)
        )
    try:
        fake.latency_s = 1.0
        configs = [
            _config(fake, _manifest(tmp_path / n, 5, n), str(tmp_path / f"out-{n}"), tmp_path / n)
            for n in ("a", "b")
        ]
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(run_batch, configs))
    finally:
        with get_client(sync_client=True) as client:
            client.delete_global_concurrency_limit_by_name("avatarflow-fal")
    assert [o.exit_code for o in outcomes] == [0, 0]
    assert fake.submissions == 10
    assert fake.max_in_progress == 3  # 16 slots locally, 3 across both runs


@pytest.mark.usefixtures("prefect_server")
def test_overlapping_runs_on_one_s3_target_pay_for_no_chunk_twice(
    fake: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        manifest = _manifest(tmp_path / "m", 4, "r")
        configs = [
            _config(fake, manifest, f"{s3.url}/{tmp_path.name}", tmp_path / f"work-{n}")
            for n in range(2)
        ]
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(run_batch, configs))
    assert [o.exit_code for o in outcomes] == [0, 0]
    assert fake.submissions == 4  # the second run waited for the first, then reused its work
    first, second = sorted(outcomes, key=lambda o: sum(r.cost_usd for r in o.results))
    assert all(r.status == "published" for r in first.results + second.results)


def test_two_cli_runs_started_together_on_one_s3_target_without_a_server_pay_once(
    fake: FakeFal, tmp_path: Path
) -> None:
    """Issue 15: no PREFECT_API_URL (each CLI process runs Prefect's ephemeral server), two
    `avatarflow run` of one 3-row manifest started at the same moment on one s3:// target.

    Ephemeral servers take 10-60 s to start on a loaded machine, so one run could end before the
    other looks at the target: a gate (this test holding the target first) makes both runs meet
    it, and opening it makes them race for it at once.
    """
    fake.latency_s = 2.0
    manifest = _manifest(tmp_path / "m", 3, "r")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | fake.env()
    env |= {"COLUMNS": "1000", "PYTHONUNBUFFERED": "1"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "240"  # two at once on 2 cores
    with S3Server() as s3:
        target = f"{s3.url}/{tmp_path.name}"  # moto keeps objects across servers in a process
        env |= s3.env
        args = [sys.executable, "-m", "avatarflow.flows.cli", "run", manifest, "--backend", "fal"]
        args += ["--target", target]
        logs = [tmp_path / f"run-{n}.txt" for n in range(2)]
        gate = Ledger(f"{target}/.avatarflow", storage_options=s3.storage_options)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            with gate.lock():
                for n, log in enumerate(logs):
                    with log.open("wb") as out:
                        work = ["--work-dir", str(tmp_path / f"work-{n}")]
                        command = [*args, *work]
                        procs.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
                _wait_for(lambda: all("waiting for" in log.read_text() for log in logs), procs)
            codes = [proc.wait(timeout=300) for proc in procs]
        finally:
            for proc in procs:
                proc.kill()
        with fsspec.open(f"{target}/results.parquet", "rb", **s3.storage_options) as fh:
            results = pq.read_table(fh).to_pylist()
    outputs = [" ".join(log.read_text().split()) for log in logs]
    assert codes == [0, 0], outputs
    assert fake.submissions == 3  # every row submitted once, by one run
    # Exactly one lost the race and waited for the other, naming it.
    holds = f"that holds {target}/.avatarflow; started"
    waited = [n for n, out in enumerate(outputs) if f"(pid {procs[1 - n].pid}) {holds}" in out]
    assert len(waited) == 1, outputs
    # The later run's results: all published by the other run, nothing rendered again.
    assert sorted(r["id"] for r in results) == ["r0", "r1", "r2"]
    assert {r["status"] for r in results} == {"published"}
    assert {r["run_action"] for r in results} == {"skipped"}
    assert all(r["cost_usd"] > 0 for r in results)


def _wait_for(ready: Callable[[], bool], procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 240
    while not ready():
        assert time.monotonic() < deadline, "the runs never reached the target"
        assert all(proc.poll() is None for proc in procs), "a run ended before the gate opened"
        time.sleep(0.2)
