"""Limits that hold across runs, on a real Prefect server: the shared fal concurrency limit, and
one run at a time per target on an object store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from flows.produce import run_batch
from tasks.config import BatchConfig
from tests.fakes.fal_server import FakeFal
from tests.fakes.s3_server import S3Server
from tests.media_factory import write_narration

pytestmark = [pytest.mark.usefixtures("prefect_server"), pytest.mark.slow]


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


def test_overlapping_runs_on_one_s3_target_pay_for_no_chunk_twice(
    fake: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        manifest = _manifest(tmp_path / "m", 4, "r")
        configs = [
            _config(fake, manifest, f"{s3.url}/videos", tmp_path / f"work-{n}") for n in range(2)
        ]
        with ThreadPoolExecutor(2) as pool:
            outcomes = list(pool.map(run_batch, configs))
    assert [o.exit_code for o in outcomes] == [0, 0]
    assert fake.submissions == 4  # the second run waited for the first, then reused its work
    first, second = sorted(outcomes, key=lambda o: sum(r.cost_usd for r in o.results))
    assert all(r.status == "published" for r in first.results + second.results)
