"""Sharding a large manifest: shards find their audio and are named by their content, children run
as ordinary batches on one target sharing its ledger, and the parent merges their results."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyarrow.parquet as pq
import pytest
from prefect.client.schemas.objects import FlowRun
from prefect.states import Failed

from avatarflow.flows.produce import batch_config, run_batch
from avatarflow.flows.shard import _child_parameters, _timing, merge_results, write_shards
from avatarflow.tasks.config import BatchConfig, RouteSettings
from avatarflow.tasks.manifest import ManifestCheck, read_manifest, validate_manifest
from avatarflow.tasks.route import DeadlineError, parse_deadline
from tests.factories import write_manifest, write_narrations
from tests.fakes.fal_server import FakeFal

QC_SKIP = frozenset({"black"})  # any gate: children must get the parent's qc_skip
CHILD = {"deployment": "produce-batch/test", "qc_skip": sorted(QC_SKIP)}


def _manifest(folder: Path, count: int) -> str:
    """row<i> narrates n<i>.wav (2 + i seconds) beside the manifest, with a passthrough column."""
    rows = write_narrations(folder, {f"n{i}": 2.0 + i for i in range(count)}, subdir="")
    rows = [{"id": f"row{i}", "audio": r["audio"], "course": f"c{i}"} for i, r in enumerate(rows)]
    return write_manifest(folder / "manifest.parquet", rows)


def _check(config: BatchConfig) -> ManifestCheck:
    return validate_manifest(read_manifest(config.manifest), config.manifest)


def test_shards_are_named_by_content_and_carry_absolute_audio_paths(tmp_path: Path) -> None:
    config = BatchConfig(manifest=_manifest(tmp_path, 5), target=str(tmp_path / "out"))
    rows = _check(config).rows
    shards = write_shards(config, rows, 2, CHILD)
    assert [s.row_ids for s in shards] == [("row0", "row1"), ("row2", "row3"), ("row4",)]
    assert write_shards(config, rows, 2, CHILD) == shards  # a rerun resumes the same shards
    tables = [pq.read_table(s.url.removeprefix("file://")) for s in shards]
    assert [t.num_rows for t in tables] == [2, 2, 1]
    audio = [a for t in tables for a in t.column("audio").to_pylist()]
    assert audio == [str(tmp_path / f"n{i}.wav") for i in range(5)]
    assert all(s.url.endswith(f"shard-{s.id}.parquet") for s in shards)

    # Other child parameters are other shards; the earlier shard files are removed.
    other = write_shards(config, rows, 2, {**CHILD, "qc_skip": []})
    assert {s.id for s in other}.isdisjoint({s.id for s in shards})
    folder = Path(config.state_url) / "shards"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"shard-{s.id}.parquet" for s in other
    )

    child = _child_parameters(shards[1], config, {"model_dir": "/elsewhere"})
    assert child["target"] == config.target
    assert (child["manifest"], child["shard"]) == (shards[1].url, shards[1].id)
    assert child["results_name"] == f"results-shard-{shards[1].id}.parquet"
    assert child["model_dir"] == "/elsewhere"  # what the parent was given reaches the child


def test_children_get_the_parents_deadline_as_one_absolute_time_and_its_route_settings() -> None:
    started = datetime(2026, 12, 7, 22, 0, tzinfo=UTC)
    timing = _timing("3h", RouteSettings(local_s_per_segment=200.0), started)
    assert timing["route"]["local_s_per_segment"] == 200.0
    # a child that starts an hour late still aims at the parent's 01:00
    late = started + timedelta(hours=1)
    assert parse_deadline(timing["deadline"], late) == started + timedelta(hours=3)
    assert _timing(None, None, started) == {}
    with pytest.raises(DeadlineError):
        _timing("soon", None, started)


@pytest.mark.usefixtures("prefect_server")
def test_children_publish_to_one_target_and_the_parent_merges_results(
    tmp_path: Path, fake: FakeFal
) -> None:
    config = BatchConfig(
        manifest=_manifest(tmp_path, 3), target=str(tmp_path / "out"), qc_skip=QC_SKIP
    )
    check = _check(config)
    shards = write_shards(config, check.rows, 2, CHILD)
    own: dict[str, Any] = {"backend": "fal", "work_dir": str(tmp_path / "work")}
    for shard in shards:  # what each child deployment run does, with its deployment's settings
        given = {"qc_skip": sorted(QC_SKIP)}
        child = batch_config(**_child_parameters(shard, config, given), **own, fal=fake.settings())
        assert child.qc_skip == QC_SKIP
        assert run_batch(child).exit_code == 0
    assert fake.submissions == 3
    runs = [cast(FlowRun, SimpleNamespace(name=f"child-{s.id}", state=None)) for s in shards]
    merged = merge_results(config, check, shards, runs, []).to_pylist()
    assert [r["id"] for r in merged] == ["row0", "row1", "row2"]
    assert {r["status"] for r in merged} == {"published"}
    assert [r["course"] for r in merged] == ["c0", "c1", "c2"]
    assert {p.name for p in (tmp_path / "out").glob("row*.mp4")} == {
        "row0.mp4",
        "row1.mp4",
        "row2.mp4",
    }


def test_rows_an_unfinished_child_did_not_report_fail_with_its_reason_in_manifest_order(
    tmp_path: Path,
) -> None:
    config = BatchConfig(manifest=_manifest(tmp_path, 3), target=str(tmp_path / "out"))
    check = _check(config)
    shards = write_shards(config, check.rows, 2, CHILD)
    why = "cannot run: model folder /models/longcat does not exist"
    states = [Failed(message=why), None]
    runs = [
        cast(FlowRun, SimpleNamespace(name=f"child-{s.id}", state=state))
        for s, state in zip(shards, states, strict=True)
    ]
    merged = merge_results(config, check, shards, runs, []).to_pylist()  # no child reported
    assert [(r["id"], r["status"]) for r in merged] == [(f"row{i}", "failed") for i in range(3)]
    assert [r["error"] for r in merged] == [
        f"shard {shards[0].id} did not finish: child flow run child-{shards[0].id} ended "
        f"Failed: {why}",
    ] * 2 + [
        f"shard {shards[1].id} did not finish: child flow run child-{shards[1].id} ended in an "
        "unknown state"
    ]
