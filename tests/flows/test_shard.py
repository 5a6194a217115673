"""Sharding a large manifest: shards find their audio, children run as ordinary batches on one
target with their own ledgers, and the parent merges their results."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.produce import run_batch
from flows.shard import child_config, merge_results, write_shards
from tasks.config import BatchConfig
from tests.factories import NO_FACE, write_manifest, write_narrations
from tests.fakes.fal_server import FakeFal


def _manifest(folder: Path, count: int) -> str:
    """row<i> narrates n<i>.wav (2 + i seconds) beside the manifest, with a passthrough column."""
    rows = write_narrations(folder, {f"n{i}": 2.0 + i for i in range(count)}, subdir="")
    rows = [{"id": f"row{i}", "audio": r["audio"], "course": f"c{i}"} for i, r in enumerate(rows)]
    return write_manifest(folder / "manifest.parquet", rows)


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
    tmp_path: Path, fake: FakeFal
) -> None:
    config = BatchConfig(
        manifest=_manifest(tmp_path, 3),
        target=str(tmp_path / "out"),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
        qc_skip=NO_FACE,
    )
    shards = write_shards(config, rows_per_shard=2)
    for n, url in enumerate(shards):  # what each child deployment run does
        assert run_batch(child_config(config, url, n)).exit_code == 0
    assert fake.submissions == 3
    merged = merge_results(config, len(shards)).to_pylist()
    assert [r["id"] for r in merged] == ["row0", "row1", "row2"]
    assert {r["status"] for r in merged} == {"published"}
    assert [r["course"] for r in merged] == ["c0", "c1", "c2"]
    assert {p.name for p in (tmp_path / "out").glob("row*.mp4")} == {
        "row0.mp4",
        "row1.mp4",
        "row2.mp4",
    }
