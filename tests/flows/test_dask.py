"""Local renders on a Dask cluster of GPU workers: one render per worker at a time, the model loaded
once per worker process and kept across rows and flow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster, get_task_stream

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.backends import local as local_backend
from avatarflow.tasks.config import BatchConfig, LocalSettings
from tests.cli import invoke
from tests.factories import gpu_cluster, narrated_manifest

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


def _manifest(folder: Path, rows: int) -> str:
    """rows 1.5 s narrations, r0 … r<rows-1>."""
    return narrated_manifest(folder, {f"r{i}": 1.5 for i in range(rows)}, subdir="")


def _chunks(target: Path) -> list[dict[str, object]]:
    return [
        chunk
        for sidecar in sorted(target.glob("*.json"))
        for chunk in json.loads(sidecar.read_text())["chunks"]
    ]


def test_renders_run_one_per_gpu_worker_and_the_model_stays_loaded(
    cluster: LocalCluster, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    local = LocalSettings(model_dir=str(tiny_checkpoint), dask_address=cluster.scheduler_address)
    workers = set(cluster.scheduler_info["workers"])
    with Client(cluster) as client:
        with get_task_stream(client) as stream:
            first = run_batch(_config(_manifest(tmp_path / "a", 4), tmp_path / "out-a", local))
        renders = [t for t in stream.data if t["key"].startswith("_render_here")]
        # The second run as a user starts it: `avatarflow run --dask-address tcp://…`.
        second = invoke(
            "run", _manifest(tmp_path / "b", 3), "--backend", "local",
            "--model-dir", str(tiny_checkpoint), "--dask-address", cluster.scheduler_address,
            "--target", str(tmp_path / "out-b"), "--work-dir", str(tmp_path / "work"),
        )  # fmt: skip

    assert first.exit_code == second.exit_code == 0, second.output
    assert len(renders) == 4
    for worker in workers:  # GPU=1 per worker: its renders never overlap in time
        spans = sorted(
            (s["start"], s["stop"])
            for task in renders
            if task["worker"] == worker
            for s in task["startstops"]
            if s["action"] == "compute"
        )
        # Dask stamps a task's stop after it has handed back its resources, so the next render
        # may be stamped as starting a few ms earlier; a shared GPU would overlap by seconds.
        overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if a[1] - b[0] > 0.1]
        assert not overlaps, (worker, overlaps)
    first_chunks, second_chunks = _chunks(tmp_path / "out-a"), _chunks(tmp_path / "out-b")
    assert {c["worker"] for c in first_chunks} <= workers
    assert sum(c["model_load"] == "loaded" for c in first_chunks) <= len(workers)
    assert {c["model_load"] for c in second_chunks} == {"reused"}  # the second run loads nothing


@pytest.fixture
def gpu_less_cluster() -> Iterator[LocalCluster]:
    """A scheduler whose only worker was started without `--resources GPU=1`."""
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
    ) as cluster:
        yield cluster


def test_a_scheduler_without_a_gpu_worker_fails_the_run_at_once(
    gpu_less_cluster: LocalCluster, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    address = gpu_less_cluster.scheduler_address
    local = LocalSettings(model_dir=str(tiny_checkpoint), dask_address=address)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as refused:
        run_batch(_config(_manifest(tmp_path / "a", 1), tmp_path / "out", local))
    assert time.monotonic() - started < 30
    assert str(refused.value) == (
        f"cannot run: the Dask scheduler at {address} has no worker with resources GPU=1; start "
        f"one worker per GPU with `dask worker {address} --resources GPU=1 --nthreads 1`"
    )
    assert not (tmp_path / "out" / "results.parquet").exists()  # refused before any row ran


def test_a_render_waiting_without_a_gpu_worker_gives_up(
    gpu_less_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a row sees when its GPU workers leave mid-run: the render is not left queued."""
    monkeypatch.setattr(local_backend, "DASK_NO_GPU_GRACE_S", 1.0)
    address = gpu_less_cluster.scheduler_address
    with Client(address, set_as_default=False) as client:
        future = client.submit(time.sleep, 60, resources={"GPU": 1}, pure=False)
        started = time.monotonic()
        with pytest.raises(local_backend.DaskWorkersError, match="no worker with resources GPU=1"):
            local_backend._wait_for_render(client, future, address, "r0")
        assert time.monotonic() - started < 5
        future.cancel()


@pytest.fixture
def one_gpu_worker() -> Iterator[LocalCluster]:
    """One worker process offering GPU=1, for a render that is still running when the CLI stops."""
    with gpu_cluster(1) as cluster:
        yield cluster


@pytest.mark.parametrize(
    ("signum", "exit_code"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_cli_run_waiting_on_dask_stops_soon_after_a_signal(
    one_gpu_worker: LocalCluster, tiny_checkpoint: Path, tmp_path: Path, signum: int, exit_code: int
) -> None:
    from prefect.settings import PREFECT_API_URL

    address = one_gpu_worker.scheduler_address
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),  # no temporary server to stop after
        "AVATARFLOW_LOCAL_DASK_ADDRESS": address,
        # A render that takes minutes: the tiny model for a hundred thousand denoising steps.
        "AVATARFLOW_LOCAL_NUM_INFERENCE_STEPS": "100000",
        "COLUMNS": "200",
    }
    command = [
        sys.executable, "-m", "avatarflow.flows.cli", "run", _manifest(tmp_path / "m", 1),
        "--backend", "local", "--model-dir", str(tiny_checkpoint),
        "--target", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
    ]  # fmt: skip
    with (
        Client(address, set_as_default=False) as client,
        (tmp_path / "log.txt").open("wb") as log,
    ):
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not any(client.processing().values()):  # the render is running on the worker
                assert proc.poll() is None, (tmp_path / "log.txt").read_text()
                assert time.monotonic() < deadline, "the render never started"
                time.sleep(0.2)
            proc.send_signal(signum)
            sent = time.monotonic()
            code = proc.wait(timeout=30)
            stopped_s = time.monotonic() - sent
        finally:
            proc.kill()
            proc.wait()
    log = (tmp_path / "log.txt").read_text()
    assert stopped_s < 10, log
    assert code == exit_code  # 128 + the signal: the CLI's own exit, not a crash
    assert "interrupted: " in log  # the hint: what is kept, rerun to resume
    assert not (tmp_path / "out" / "r0.mp4").exists()


def _config(manifest: str, target: Path, local: LocalSettings) -> BatchConfig:
    return BatchConfig(
        manifest=manifest,
        target=str(target),
        backend="local",
        work_dir=str(target.parent / "work"),
        local=local,
    )


def test_gpu_workers_are_counted_by_the_scheduler_not_the_clients_cached_totals(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client refreshes its cached scheduler_info every few seconds with totals only (no
    workers); a refresh landing between a fetch and its read once counted 0 GPU workers on a
    loaded machine and failed every row. The count must come from the scheduler itself."""
    with Client(cluster.scheduler_address, set_as_default=False) as client:
        client.sync(client._update_scheduler_info)  # what the periodic refresh leaves behind
        totals_only = client._scheduler_identity
        assert not totals_only["workers"]
        monkeypatch.setattr(client, "scheduler_info", lambda *a, **k: totals_only)
        assert local_backend._gpu_workers(client) == 2
