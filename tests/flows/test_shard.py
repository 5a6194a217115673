"""Sharding a large manifest: shards find their audio, children run as ordinary batches on one
target with their own ledgers, and the parent merges their results."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flows.settings import BatchConfig

from flows.produce import run_batch
from flows.shard import child_config, merge_results, write_shards
from tests.fakes.fal_server import FakeFal
from tests.media_factory import write_narration


def _manifest(folder: Path, count: int) -> str:
    rows = []
    for i in range(count):
        write_narration(folder / f"n{i}.wav", 2.0 + i, seed=i)
        rows.append({"id": f"row{i}", "audio": f"n{i}.wav", "course": f"c{i}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return str(folder / "manifest.parquet")


def test_shards_are_deterministic_and_carry_absolute_audio_paths(tmp_path: Path) -> None:
    config = BatchConfig(manifest=_manifest(tmp_path, 5), target=str(tmp_path / "out"))
    shards = write_shards(config, rows_per_shard=2)
    assert len(shards) == 3
    assert write_shards(config, rows_per_shard=2) == shards  # a rerun resumes the same shards
    tables = [pq.read_table(url.removeprefix("file://")) for url in shards]
    assert [t.num_rows for t in tables] == [2, 2, 1]
    audio = [a for t in tables for a in t.column("audio").to_pylist()]
    assert audio == [str(tmp_path / f"n{i}.wav") for i in range(5)]
    child = child_config(config, shards[1], 1)
    assert child.target == config.target
    assert child.results_name == "results-shard-00001.parquet"
    assert child.state_url != config.state_url


@pytest.mark.usefixtures("prefect_server")
def test_children_publish_to_one_target_and_the_parent_merges_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeFal(latency_s=0.05) as fake:
        for key, value in fake.env().items():
            monkeypatch.setenv(key, value)
        config = BatchConfig(
            manifest=_manifest(tmp_path, 3),
            target=str(tmp_path / "out"),
            backend="fal",
            work_dir=str(tmp_path / "work"),
        )
        shards = write_shards(config, rows_per_shard=2)
        for n, url in enumerate(shards):  # what each child deployment run does
            assert run_batch(child_config(config, url, n)).exit_code == 0
    merged = merge_results(config, len(shards)).to_pylist()
    assert [r["id"] for r in merged] == ["row0", "row1", "row2"]
    assert {r["status"] for r in merged} == {"published"}
    assert [r["course"] for r in merged] == ["c0", "c1", "c2"]
    assert {p.name for p in (tmp_path / "out").glob("row*.mp4")} == {
        "row0.mp4",
        "row1.mp4",
        "row2.mp4",
    }
