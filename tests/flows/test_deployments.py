"""deploy/prefect.yaml as users run it: a real Prefect server on loopback, `prefect deploy` from a
clone of this repository, a process worker, and the fal deployment against the loopback fal."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.factories import TINY_NOISE
from tests.fakes.fal_server import FakeFal
from tests.media_factory import write_narration

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
POOL, GPU_POOL, DEPLOYMENT = "avatarflow-cpu", "avatarflow-gpu", "produce-batch/nightly-fal"
SECRET = "fal-key"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Stack:
    """A Prefect server, the deployments of deploy/prefect.yaml and one process worker."""

    def __init__(self, home: Path, fal: FakeFal) -> None:
        self.home, self.fal = home, fal
        self.api_url = f"http://127.0.0.1:{_free_port()}/api"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FAL_"))},
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up at once
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
            "AVATARFLOW_REPO": str(home / "repo.git"),
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        self.worker: subprocess.Popen[bytes] | None = None

    def start(
        self, *args: str, log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.home / log).open("ab") as out:
            process = subprocess.Popen(
                args, env=env or self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.home
            )
        self.processes.append(process)
        return process

    def start_worker(self, fal_key: bool = True) -> None:
        """(Re)start the pool's one process worker, with FAL_KEY in its environment or not; the
        fal hosts are the worker's own (nothing is pinned at deploy time)."""
        self.stop_worker()
        env = {**self.env, **{k: v for k, v in self.fal.env().items() if k != "FAL_KEY"}}
        if fal_key:
            env["FAL_KEY"] = self.fal.key
        self.worker = self.start(
            PREFECT, "worker", "start", "--pool", POOL, log="worker.log", env=env
        )

    def stop_worker(self, kill: bool = False) -> None:
        """Stop the worker (SIGKILL with kill=True, as a crashed machine would)."""
        if self.worker is None:
            return
        if kill:
            self.worker.kill()
        else:  # first SIGTERM: it stops polling; a second would SIGKILL it
            self.worker.terminate()
        try:
            self.worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.worker.kill()
            self.worker.wait()
        self.processes.remove(self.worker)
        self.worker = None

    def prefect(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PREFECT, "--no-prompt", *args],
            env=self.env,
            cwd=cwd or self.home,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + 180  # a loaded 2-core machine takes over 90 s at times
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError((self.home / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _publish_repo(home: Path) -> Path:
    """A bare clone whose main is this checkout's HEAD, and a working clone to deploy from."""
    bare, work = home / "repo.git", home / "src"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO), str(bare)], check=True)
    head = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True)
    subprocess.run(
        ["git", "-C", str(bare), "update-ref", "refs/heads/main", head.strip()], check=True
    )
    subprocess.run(["git", "clone", "-q", str(bare), str(work)], check=True)
    return work


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("deployments")
    with FakeFal(latency_s=0.3) as fal:
        stack = Stack(home, fal)
        try:
            stack.start(
                PREFECT,
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                stack.api_url.split(":")[-1].removesuffix("/api"),
                log="server.log",
            )
            work = _publish_repo(home)
            stack.wait_healthy()
            for pool in (POOL, GPU_POOL):
                assert (
                    stack.prefect("work-pool", "create", pool, "--type", "process").returncode == 0
                )
            deployed = stack.prefect(
                "deploy", "--prefect-file", "deploy/prefect.yaml", "--all", cwd=work
            )
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            stack.start_worker()  # fal's key and hosts are the worker's only
            stack.start(
                PREFECT, "worker", "start", "--pool", GPU_POOL, log="gpu-worker.log", env=stack.env
            )
            yield stack
        finally:
            stack.stop()


def _manifest(folder: Path, rows: list[dict[str, str]], seconds: float = 3.0) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if not (folder / row["audio"]).exists() and "broken" not in row["id"]:
            write_narration(folder / row["audio"], seconds, "wav", seed=len(row["id"]))
    for row in rows:
        if "broken" in row["id"]:
            (folder / row["audio"]).write_bytes(b"not audio at all")
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def _run(
    stack: Stack, parameters: dict[str, object], timeout: float = 120, name: str = DEPLOYMENT
) -> object:
    from prefect.deployments import run_deployment

    with _api(stack):
        return run_deployment(name, parameters=parameters, timeout=timeout)


class _api:
    """Point this test process's Prefect client at the stack's server."""

    def __init__(self, stack: Stack) -> None:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings({PREFECT_API_URL: stack.api_url})

    def __enter__(self) -> None:
        self._settings.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._settings.__exit__(*exc)


def _artifact_keys(stack: Stack, flow_run_id: UUID) -> set[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _api(stack), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {artifact.key or "" for artifact in artifacts}


def _save_secret(stack: Stack, name: str, value: str) -> None:
    from prefect.blocks.system import Secret

    with _api(stack):
        Secret(value=value).save(name, overwrite=True)


def test_the_fal_deployment_runs_on_a_worker_as_users_run_it(stack: Stack, tmp_path: Path) -> None:
    fal = stack.fal
    # The key is in a Secret block each run names; the worker (and so the process that runs the
    # cancellation hook) has no FAL_KEY at all.
    _save_secret(stack, SECRET, fal.key)
    stack.start_worker(fal_key=False)
    try:
        _fal_deployment_scenarios(stack, tmp_path, {"fal_key_secret": SECRET})
    finally:
        stack.start_worker()


def _fal_deployment_scenarios(stack: Stack, tmp_path: Path, common: dict[str, object]) -> None:
    from avatarflow.tasks.config import BatchConfig
    from avatarflow.tasks.report import artifact_key

    fal = stack.fal
    good = _manifest(
        tmp_path / "good", [{"id": f"row-{i}", "audio": f"a{i}.wav"} for i in range(3)]
    )
    target = tmp_path / "out"

    # 1. Override manifest, target: backend, budget and the
    #    rest stay the deployment's.
    run = _run(stack, {"manifest": good, "target": str(target), **common})
    assert run.state.is_completed(), run.state.message
    assert (run.parameters["backend"], run.parameters["budget_usd"]) == ("fal", 500)
    assert "3 rows published" in run.state.message
    assert sorted(p.name for p in target.glob("*.mp4")) == ["row-0.mp4", "row-1.mp4", "row-2.mp4"]
    # Readable keys, one per target: `prefect artifact ls` tells targets apart by name.
    config = BatchConfig(manifest=good, target=str(target))
    kinds = ("rows", "summary", "results", "report", "progress")
    expected = {artifact_key(config, kind) for kind in kinds}
    assert expected <= _artifact_keys(stack, run.id)
    assert {key.rsplit("-", 1)[0] for key in expected} == {f"avatarflow-{k}-out" for k in kinds}
    assert fal.submissions == 3

    # 2. One bad row: the run is Failed with the count, the good rows are published, and the
    #    logs say which row failed and why, without an engine traceback.
    mixed = [{"id": "ok", "audio": "ok.wav"}, {"id": "broken", "audio": "broken.wav"}]
    mixed_manifest = _manifest(tmp_path / "mixed", mixed)
    run = _run(stack, {"manifest": mixed_manifest, "target": str(target), **common})
    assert run.state.is_failed()
    assert run.state.message.startswith("1 of 2 rows failed")
    assert (target / "ok.mp4").exists()
    assert not (target / "broken.mp4").exists()
    logs = _logs(stack, run.id)
    assert any("row broken failed" in line for line in logs)
    assert any(line.startswith("1 of 2 rows failed") for line in logs)
    # (the failed row's own task run keeps its traceback: that one is the row's error)
    assert [line for line in logs if "unexpected exception" in line] == []
    worker_log = (stack.home / "worker.log").read_text(errors="replace")
    assert "exited with unexpected exception" not in worker_log

    # 3. A fal key given as a parameter is refused: no run is created by Prefect's own CLI.
    given = stack.prefect("deployment", "run", DEPLOYMENT, "--param", f"fal_key={fal.key}")
    assert given.returncode != 0
    assert "fal_key" in given.stdout + given.stderr

    # 4. Cancelling mid-flight cancels the run's fal requests (with the key from the run's Secret
    #    block: the hook's process has no FAL_KEY); the rerun pays for nothing twice.
    fal.reset()
    fal.latency_s = 60.0
    slow = _manifest(tmp_path / "slow", [{"id": f"s{i}", "audio": f"s{i}.wav"} for i in range(3)])
    slow_target = tmp_path / "slow-out"
    run = _run(stack, {"manifest": slow, "target": str(slow_target), **common}, timeout=0)
    _wait(lambda: fal.submissions == 3, "3 fal requests in flight")
    _cancel(stack, run.id)
    _wait(lambda: fal.counts["cancel"] == 3, "the in-flight requests cancelled at fal")
    assert _state(stack, run.id).is_cancelled()
    # our own modules' log lines (here the cancel hook's) reach the flow run's logs on the server
    assert sum("CANCELLATION_REQUESTED" in line for line in _logs(stack, run.id)) == 3
    billed_before = fal.billed_units
    fal.latency_s = 0.3
    rerun = _run(stack, {"manifest": slow, "target": str(slow_target), **common})
    assert rerun.state.is_completed(), rerun.state.message
    assert billed_before == 0.0  # cancelled requests produced nothing and were not billed
    assert fal.billed_units == pytest.approx(3 * 93 / 16)  # each row paid once
    results = pq.read_table(slow_target / "results.parquet").to_pylist()
    assert [r["status"] for r in results] == ["published"] * 3


def test_a_run_whose_worker_is_killed_keeps_running_and_publishes(
    stack: Stack, tmp_path: Path
) -> None:
    """`kill -9` of the worker while fal renders: the flow-run process (its own session) loses
    the pipe its output went to, and must neither crash nor pay again."""
    fal = stack.fal
    fal.reset()
    fal.latency_s = 8.0
    rows = [{"id": f"k{i}", "audio": f"k{i}.wav"} for i in range(3)]
    manifest, target = _manifest(tmp_path / "kill", rows), tmp_path / "kill-out"
    run = _run(stack, {"manifest": manifest, "target": str(target)}, timeout=0)
    try:
        _wait(lambda: fal.submissions == 3, "3 fal requests in flight")
        stack.stop_worker(kill=True)
        state = _state(stack, run.id, timeout=120)
    finally:
        fal.latency_s = 0.3
        stack.start_worker()
    assert state.is_completed(), state.message
    assert fal.submissions == 3  # nothing paid twice
    assert sorted(p.name for p in target.glob("*.mp4")) == ["k0.mp4", "k1.mp4", "k2.mp4"]
    statuses = pq.read_table(target / "results.parquet").column("status").to_pylist()
    assert statuses == ["published"] * 3


def test_a_sharded_run_lists_every_row_resumes_and_never_pays_twice(
    stack: Stack, tmp_path: Path
) -> None:
    fal = stack.fal
    fal.reset()
    fal.latency_s = 0.2
    folder, target = tmp_path / "big", tmp_path / "sharded-out"
    rows = [{"id": f"row-{i:02d}", "audio": f"a{i:02d}.wav"} for i in range(20)]
    rows[13] = {"id": "broken-13", "audio": "a13.wav"}  # its child run ends Failed
    manifest = _manifest(folder, rows, seconds=1.0)
    parent = {"manifest": manifest, "target": str(target), "rows": 7}
    parent["deployment"] = "produce-batch/on-demand-fal"

    run = _run(stack, parent, timeout=400, name="produce-sharded/sharded-local-gpu")
    assert run.state.is_failed()
    assert run.state.message.startswith("1 of 20 rows not published, 1 of 3 shards")
    results = pq.read_table(target / "results.parquet").to_pylist()
    assert [r["id"] for r in results] == [row["id"] for row in rows]
    broken = results[13]
    assert broken["status"] == "failed"
    assert "not a readable media file" in broken["error"]
    assert fal.submissions == 19

    # The input is fixed: only its shard runs again, and only the fixed row is paid for.
    write_narration(folder / "a13.wav", 1.0, "wav", seed=13)
    fal.reset()
    run = _run(stack, parent, timeout=400, name="produce-sharded/sharded-local-gpu")
    assert run.state.is_completed(), run.state.message
    assert fal.submissions == 1
    statuses = pq.read_table(target / "results.parquet").column("status").to_pylist()
    assert statuses == ["published"] * 20

    # A plain run of the same manifest to the same target finds everything paid for.
    fal.reset()
    plain = _run(stack, {"manifest": manifest, "target": str(target)})
    assert plain.state.is_completed(), plain.state.message
    assert fal.submissions == 0


def test_a_sharded_gpu_run_passes_its_model_folder_to_the_children_and_reports_their_reason(
    stack: Stack, tmp_path: Path, tiny_checkpoint: Path
) -> None:
    """The GPU deployment's model_dir (/models/longcat) is not on this machine: children that
    keep it fail, and say why; the parent given the folder has every row published."""
    rows = [{"id": f"g{i}", "audio": f"g{i}.wav"} for i in range(2)]
    manifest = _manifest(tmp_path / "gpu", rows, seconds=1.0)
    target = tmp_path / "gpu-out"
    parent = {
        "manifest": manifest,
        "target": str(target),
        "rows": 2,
        "work_dir": str(tmp_path / "work"),
        "qc_skip": sorted(TINY_NOISE),  # the tiny checkpoint renders noise, not a face
    }
    name = "produce-sharded/sharded-local-gpu"

    run = _run(stack, parent, timeout=400, name=name)
    assert run.state.is_failed()
    assert run.state.message.startswith("2 of 2 rows not published, 1 of 1 shards")
    errors = pq.read_table(target / "results.parquet").column("error").to_pylist()
    assert all(
        e.endswith("cannot run: model folder /models/longcat does not exist") for e in errors
    )
    assert not any("TypeError" in line for line in _logs(stack, run.id))

    run = _run(stack, {**parent, "model_dir": str(tiny_checkpoint)}, timeout=600, name=name)
    assert run.state.is_completed(), run.state.message
    results = pq.read_table(target / "results.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in results] == [(f"g{i}", "published") for i in range(2)]


def _logs(stack: Stack, flow_run_id: UUID) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    time.sleep(1.0)  # logs ship in batches
    with _api(stack), get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def _wait(condition: object, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _cancel(stack: Stack, flow_run_id: UUID) -> None:
    result = stack.prefect("flow-run", "cancel", str(flow_run_id))
    assert result.returncode == 0, result.stdout + result.stderr


def _state(stack: Stack, flow_run_id: UUID, timeout: float = 60) -> Any:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with _api(stack), get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state.is_final() or time.monotonic() > deadline:
                return state
            time.sleep(0.5)
