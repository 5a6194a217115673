"""The whole flow on a real Prefect server against the loopback fal service: publish, fail alone,
resume without paying twice, and publish to S3."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import s3fs

from avatarflow.flows.produce import flow_parameters, run_batch
from avatarflow.tasks.config import BatchConfig, LocalSettings
from avatarflow.tasks.media import count_audio_samples, probe_video
from tests.factories import TINY_NOISE, narrated_manifest, write_manifest, write_narrations
from tests.fakes.fal_server import FakeFal
from tests.fakes.s3_server import S3Server

FPS = 16

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def mixed_manifest(tmp_path: Path) -> tuple[str, dict[str, float]]:
    """3 s wav, 12 s mp3, 47 s m4a and 190 s wav narrations, plus a row whose audio is missing."""
    lengths = {"short": (3.0, "wav"), "mid": (12.0, "mp3"), "long": (47.0, "m4a")}
    lengths["lecture"] = (190.0, "wav")
    rows = write_narrations(tmp_path, lengths)
    for i, row in enumerate(rows):
        row |= {"course": f"c{i}", "n": i}
    rows.insert(2, {"id": "ghost", "audio": "media/nope.wav", "course": "cx", "n": 99})
    return write_manifest(tmp_path / "manifest.parquet", rows), {
        k: v[0] for k, v in lengths.items()
    }


def _check_video(path: str, audio_s: float) -> None:
    probe = probe_video(path)
    assert probe.codec == "h264"
    assert abs(probe.frames / FPS - audio_s) <= 1 / FPS
    assert probe.audio_codec == "aac"
    samples, rate = count_audio_samples(path)
    assert abs(samples / rate - audio_s) <= 1 / FPS


@pytest.mark.slow
def test_fal_batch_publishes_every_valid_row_and_resumes_without_paying_twice(
    fake: FakeFal, mixed_manifest: tuple[str, dict[str, float]], tmp_path: Path
) -> None:
    fal = fake
    manifest, lengths = mixed_manifest
    target = tmp_path / "out"
    config = BatchConfig(
        manifest=manifest,
        target=str(target),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
    )

    outcome = run_batch(config)

    by_id = {r.id: r for r in outcome.results}
    assert [r.id for r in outcome.results] == ["short", "mid", "ghost", "long", "lecture"]
    assert by_id["ghost"].status == "failed"
    assert "column 'audio'" in by_id["ghost"].error
    assert "not found" in by_id["ghost"].error
    assert outcome.exit_code == 1
    request_ids: list[str] = []
    for row_id, seconds in lengths.items():
        assert by_id[row_id].status == "published", by_id[row_id].error
        _check_video(str(target / f"{row_id}.mp4"), seconds)
        sidecar = json.loads((target / f"{row_id}.json").read_text())
        request_ids += sidecar["request_ids"]
        assert len(sidecar["request_ids"]) == len(sidecar["chunks"]) >= 1
    table = pq.read_table(target / "results.parquet").to_pylist()
    assert [r["id"] for r in table] == ["short", "mid", "ghost", "long", "lecture"]
    assert [r["course"] for r in table] == ["c0", "c1", "cx", "c2", "c3"]
    report = (target / "report.html").read_text()
    assert "lecture" in report
    assert report.count("data:image/jpeg;base64,") == len(lengths)  # a thumbnail per published row
    assert len(set(request_ids)) == len(request_ids) == fal.submissions  # one request per chunk
    assert len(json.loads((target / "lecture.json").read_text())["chunks"]) > 1

    # A rerun skips what is published and pays for nothing.
    fal.reset()
    again = run_batch(config)
    # (a skipped row stays published; "skipped" is what this run did with it)
    assert {r.id: (r.status, r.run_action) for r in again.results} == {
        "short": ("published", "skipped"),
        "mid": ("published", "skipped"),
        "ghost": ("failed", "failed"),
        "long": ("published", "skipped"),
        "lecture": ("published", "skipped"),
    }
    assert fal.submissions == 0


def test_fal_batch_publishes_to_s3(
    fake: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = narrated_manifest(tmp_path, {"hello": 4.0}, subdir="")
    # s3fs caches filesystems by their options: one made for an earlier test's server (another
    # port) would be reused for the endpoint found in the environment here.
    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.setattr(s3fs.S3FileSystem, "cachable", False)
    with S3Server() as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        target = f"{s3.url}/{tmp_path.name}"  # moto keeps objects across tests in a process
        config = BatchConfig(
            manifest=manifest,
            target=target,
            backend="fal",
            work_dir=str(tmp_path / "w"),
            fal=fake.settings(),
        )
        outcome = run_batch(config)
        assert outcome.exit_code == 0, outcome.results
        fs = fsspec.filesystem("s3")
        names = {p.rsplit("/", 1)[1] for p in fs.ls(target)}
        assert {"hello.mp4", "hello.json", "results.parquet", "report.html"} <= names
        local = tmp_path / "hello.mp4"
        fs.get(f"{target}/hello.mp4", str(local))
        _check_video(str(local), 4.0)


def test_local_v15_checkpoint_renders_and_publishes_at_its_25_fps(
    tmp_path: Path, tiny_checkpoint_v15: Path
) -> None:
    config = BatchConfig(
        manifest=narrated_manifest(tmp_path, {"a": 7.0}, subdir=""),
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        local=LocalSettings(model_dir=str(tiny_checkpoint_v15)),
        qc_skip=TINY_NOISE,
    )
    outcome = run_batch(config)
    assert outcome.exit_code == 0, outcome.results
    probe = probe_video(str(tmp_path / "out" / "a.mp4"))
    assert (probe.fps, probe.frames) == (25, 175)  # 7 s at 25 fps, trimmed from 2 segments


def test_a_setting_the_flow_cannot_take_is_refused_not_dropped() -> None:
    config = BatchConfig(manifest="m.parquet", chunk_target_s=20.0, chunk_min_s=2.5)
    with pytest.raises(ValueError, match="no parameter for chunk_min_s"):
        flow_parameters(config)
    assert flow_parameters(BatchConfig(manifest="m.parquet"))["chunk_target_s"] == 60.0
