"""Local renders on a Dask cluster of GPU workers: one render per worker at a time, the model loaded
once per worker process and kept across rows and flow runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from distributed import Client, LocalCluster, get_task_stream

from flows.produce import run_batch
from tasks.config import BatchConfig, LocalSettings
from tests.media_factory import write_narration

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Two worker processes, each advertising one GPU, as `dask worker --resources GPU=1` does."""
    with LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=True,
        resources={"GPU": 1},
        dashboard_address=None,
    ) as cluster:
        yield cluster


def _manifest(folder: Path, rows: int) -> str:
    folder.mkdir(parents=True)
    for i in range(rows):
        write_narration(folder / f"r{i}.wav", 1.5, "wav", seed=i)
    records = [{"id": f"r{i}", "audio": f"r{i}.wav"} for i in range(rows)]
    pq.write_table(pa.Table.from_pylist(records), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


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
        second = run_batch(_config(_manifest(tmp_path / "b", 3), tmp_path / "out-b", local))

    assert first.exit_code == second.exit_code == 0
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


def _config(manifest: str, target: Path, local: LocalSettings) -> BatchConfig:
    return BatchConfig(
        manifest=manifest,
        target=str(target),
        backend="local",
        work_dir=str(target.parent / "work"),
        local=local,
    )
