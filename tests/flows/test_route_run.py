"""`--backend auto` for real: two GPU workers of a Dask LocalCluster with the tiny model, plus the
loopback fal service. Each row renders on one backend only, the results say which and why, a
rerun submits nothing, and a worker lost mid-run sends its rows that have not started to fal."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster, get_task_stream

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.config import BatchConfig, LocalSettings, RouteSettings
from avatarflow.tasks.records import BatchOutcome
from tests.factories import gpu_cluster, narrated_manifest
from tests.fakes.fal_server import WHISPER_APP, FakeFal

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


def _manifest(folder: Path, rows: int) -> str:
    """rows 1.5 s narrations, r0 … r<rows-1>."""
    return narrated_manifest(folder, {f"r{i}": 1.5 for i in range(rows)}, subdir="")


def _config(
    tmp_path: Path, rows: int, address: str, fake: FakeFal, tiny: Path, **route: float
) -> BatchConfig:
    # The workers are predicted at 8 s a one-segment row, whatever they measure: two of them
    # finish 4 rows in 16 s; with a 30 s deadline less a 45 % margin, the fifth row onwards
    # overflows to fal. So wide a margin also sends fal its rows at once (they wait only while
    # they could start later and end before 3 s: twice the margin of the 30 s).
    priors = {
        "local_s_per_segment": 8.0,
        "local_load_s": 0.0,
        "poll_s": 0.2,
        "prior_segments": 1e9,
        "margin": 0.45,
        **route,
    }
    return BatchConfig(
        manifest=_manifest(tmp_path / "m", rows),
        target=str(tmp_path / "out"),
        backend="auto",
        deadline="30s",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
        local=LocalSettings(model_dir=str(tiny), dask_address=address),
        route=RouteSettings(fal_s_per_segment=1.0, fal_queue_s=1.0, **priors),  # type: ignore[arg-type]
    )


def _backends(target: Path) -> dict[str, str]:
    table = pq.read_table(target / "results.parquet").to_pylist()
    return {row["id"]: row["backend"] for row in table}


def _check_one_backend_each(
    outcome: BatchOutcome, target: Path, renders: int, fake: FakeFal
) -> dict[str, str]:
    """Every row published, by the backend results.parquet names, and rendered there only."""
    assert outcome.exit_code == 0, [r.error for r in outcome.results]
    backends = _backends(target)
    table = {r["id"]: r for r in pq.read_table(target / "results.parquet").to_pylist()}
    for row_id, backend in backends.items():
        sidecar = json.loads((target / f"{row_id}.json").read_text())
        assert sidecar["backend"] == backend == sidecar["route"]["backend"]
        assert table[row_id]["route_reason"] == sidecar["route"]["reason"]
        assert table[row_id]["route_reason"].startswith(f"{backend}: ")
        started, finished = sidecar["route"]["started_at"], sidecar["route"]["finished_at"]
        assert started is not None
        assert finished is not None
        assert started <= finished
        assert bool(sidecar["request_ids"]) == (backend == "fal")
    fal_rows = [row_id for row_id, backend in backends.items() if backend == "fal"]
    # one chunk each, submitted once; the captions of fal's rows come from fal's whisper (the
    # local rows' from the tiny checkpoint's Whisper), once each too
    assert fake.submissions - fake.counts[WHISPER_APP] == len(fal_rows)
    assert fake.counts[WHISPER_APP] == len(fal_rows)
    assert renders == len(backends) - len(fal_rows)  # one Dask render per local row
    return backends


@pytest.mark.timeout(600)  # two flow runs on a shared 2-core machine
def test_rows_split_between_gpu_workers_and_fal_each_rendered_once_and_a_rerun_submits_nothing(
    cluster: LocalCluster, fake: FakeFal, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, 9, cluster.scheduler_address, fake, tiny_checkpoint)
    with Client(cluster) as client, get_task_stream(client) as stream:
        outcome = run_batch(config)
    renders = sum(t["key"].startswith("_render_here") for t in stream.data)
    backends = _check_one_backend_each(outcome, tmp_path / "out", renders, fake)
    assert set(backends.values()) == {"local", "fal"}  # the workers alone would be late

    submitted = fake.submissions
    again = run_batch(config)
    assert again.exit_code == 0
    assert fake.submissions == submitted  # nothing submitted, nothing rendered again
    assert {r.run_action for r in again.results} == {"skipped"}
    assert _backends(tmp_path / "out") == backends


@pytest.fixture
def doomed_cluster() -> Iterator[LocalCluster]:
    """Two GPU workers, one of which the test kills."""
    with gpu_cluster(2) as cluster:
        yield cluster


@pytest.mark.timeout(600)
def test_a_lost_worker_sends_its_rows_that_have_not_started_to_fal(
    doomed_cluster: LocalCluster, fake: FakeFal, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    # 12 rows predicted at 3.5 s each: two workers finish them in 21 s, before the 50 s deadline
    # less its 49 % margin; one worker alone cannot finish the rows still waiting in time.
    rows = 12
    config = _config(
        tmp_path,
        rows,
        doomed_cluster.scheduler_address,
        fake,
        tiny_checkpoint,
        local_s_per_segment=3.5,
        margin=0.49,
    )
    config = config.model_copy(
        update={
            "deadline": "50s",
            "local": config.local.model_copy(update={"num_inference_steps": 40}),
        }
    )
    ledger = tmp_path / "out" / ".avatarflow"
    killed: list[str] = []

    def kill_a_busy_worker_once_every_row_is_routed() -> None:
        with Client(doomed_cluster, set_as_default=False) as client:
            give_up = time.monotonic() + 300
            while time.monotonic() < give_up:
                busy = [w for w, keys in client.processing().items() if keys]
                if busy and len(list(ledger.glob("rows/*/*/route.json"))) == rows:
                    killed.append(busy[0])
                    client.retire_workers([busy[0]], close_workers=True, remove=True)
                    return
                time.sleep(0.05)

    killer = threading.Thread(target=kill_a_busy_worker_once_every_row_is_routed)
    with Client(doomed_cluster) as client, get_task_stream(client) as stream:
        killer.start()
        outcome = run_batch(config)
        killer.join()
    assert killed
    keys = {t["key"] for t in stream.data if t["key"].startswith("_render_here")}
    backends = _check_one_backend_each(outcome, tmp_path / "out", len(keys), fake)
    reasons = {
        row_id: json.loads((tmp_path / "out" / f"{row_id}.json").read_text())["route"]["reason"]
        for row_id in backends
    }
    moved = [row_id for row_id, reason in reasons.items() if reason.startswith("fal: moved")]
    assert moved, reasons  # routed to the workers first: only the loss sent them to fal
