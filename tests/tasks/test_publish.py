"""Tests for tasks/publish.py: atomic writes to local, memory, moto-S3; tables, sidecars."""

from __future__ import annotations

import datetime
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from avatarflow.tasks import publish
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.publish import (
    PublishError,
    RetryPolicy,
    build_sidecar,
    is_published,
    publish_bytes,
    publish_file,
    rejected_target,
    safe_join,
    settle_results,
    write_results,
)
from avatarflow.tasks.qc import GATES
from avatarflow.tasks.records import (
    Chunk,
    ChunkVideo,
    GateResult,
    QCReport,
    RowPlan,
    RowResult,
    Sidecar,
    SidecarRerender,
    Timings,
    from_json,
    json_bytes,
    to_json,
)
from avatarflow.tasks.storage import write_url
from tests.factories import make_audio, make_plan, make_row
from tests.fakes.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../x.mp4", "a/b.mp4", "a\\b.mp4", "/etc/passwd", "C:x", "x\0y", "~x"]
)
def test_safe_join_refuses_names_that_could_escape(name: str) -> None:
    with pytest.raises(ValueError, match="refusing output name"):
        safe_join("s3://bucket/prefix", name)


def test_safe_join_appends_a_plain_name_under_the_prefix() -> None:
    assert safe_join("s3://bucket/prefix/", "row-1.mp4") == "s3://bucket/prefix/row-1.mp4"
    assert safe_join("./out", "results.parquet") == "./out/results.parquet"
    with pytest.raises(ValueError, match="target URL is empty"):
        safe_join(" ", "x.mp4")


def test_publish_file_to_a_local_folder_lands_complete_without_leftovers(tmp_path: Path) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(b"\x00mp4" * 1000)
    target = tmp_path / "out" / "nested"
    url = publish_file(source, str(target), "row.mp4")
    assert _read(url) == source.read_bytes()
    assert [p.name for p in target.iterdir()] == ["row.mp4"]
    assert is_published(str(target), "row.mp4")
    assert not is_published(str(target), "other.mp4")


def test_failed_local_copy_leaves_neither_final_nor_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(b"x" * 10_000)
    calls = []

    def half_copy(src: str, dst: str, **kwargs: object) -> str:  # part of it, then disk "fails"
        calls.append(1)
        with open(src, "rb") as source, open(dst, "wb") as partial:
            partial.write(source.read(100))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", half_copy)  # how storage copies a local file
    target = tmp_path / "out"
    # (?i): storage.py rewords ENOSPC as "... full: no space left on device writing row.mp4"
    with pytest.raises(PublishError, match="(?i)row.mp4 \\(3 attempts\\).*no space left on device"):
        publish_file(source, str(target), "row.mp4", retry=FAST_RETRY)
    assert len(calls) == 3
    assert list(target.iterdir()) == []


def test_publish_to_a_memory_url() -> None:
    url = publish_bytes(b"hello", "memory://published/run1", "a.txt")
    assert url.startswith("memory://")
    assert url.endswith("/published/run1/a.txt")
    assert _read(url) == b"hello"


def _read(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def test_a_record_published_as_json_is_readable_back(tmp_path: Path) -> None:
    record = RowResult("a", "failed", error="x", extra={"b": 1, "a": [1.5, None]})
    url = publish_bytes(json_bytes(record), f"file://{tmp_path}", "row.json")
    doc = json.loads(Path(url.removeprefix("file://")).read_text())
    assert doc == to_json(record)
    assert doc["extra"] == {"a": [1.5, None], "b": 1}
    assert from_json(RowResult, doc) == record


def _results() -> tuple[list[RowResult], pa.Schema]:
    schema = pa.schema(
        [
            ("speaker", pa.string()),
            ("priority", pa.int16()),
            ("tags", pa.list_(pa.string())),
            ("recorded", pa.timestamp("ms")),
            ("status", pa.string()),  # collides with ours: kept as input_status
        ]
    )
    when = datetime.datetime(2026, 1, 2, 3, 4, 5)
    results = [
        RowResult(
            "a",
            "published",
            "s3://b/a.mp4",
            "s3://b/a.json",
            12.5,
            3,
            1.95,
            extra={
                "speaker": "Ann",
                "priority": 2,
                "tags": ["x"],
                "recorded": when,
                "status": "new",
            },
        ),
        RowResult("b", "failed", error="fal: 422 invalid image", extra={"speaker": "Bo"}),
    ]
    return results, schema


def _check_results_table(table: pa.Table, schema: pa.Schema) -> None:
    assert table.column_names[: len(publish.RESULTS_SCHEMA)] == publish.RESULTS_SCHEMA.names
    assert table.schema.field("priority").type == pa.int16()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.schema.field("recorded").type == schema.field("recorded").type
    rows = table.to_pylist()
    assert rows[0]["input_status"] == "new"
    assert rows[0]["segments"] == 3
    assert rows[0]["recorded"] == datetime.datetime(2026, 1, 2, 3, 4, 5)
    assert rows[1]["error"] == "fal: 422 invalid image"
    assert rows[1]["priority"] is None
    assert rows[1]["cost_usd"] == 0.0


def test_results_parquet_round_trips_with_passthrough_types(tmp_path: Path) -> None:
    results, schema = _results()
    url = write_results(results, schema, str(tmp_path))
    _check_results_table(pq.read_table(url.removeprefix("file://")), schema)
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]


def test_results_without_passthrough_have_the_fixed_columns() -> None:
    table = publish.results_table([RowResult("a", "failed")], None)
    assert table.schema == publish.RESULTS_SCHEMA


def _qc_columns(skip: set[str], failed: str | None = None) -> dict[str, object]:
    gates = tuple(
        GateResult(n, "skipped")
        if n in skip
        else GateResult(n, "failed" if n == failed else "passed", 0.5, 1.0)
        for n in GATES
    )
    return QCReport(failed is None, gates=gates, frames=40, fps=16.0).to_columns()


def test_qc_columns_are_one_schema_whatever_was_skipped_or_failed() -> None:
    when = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=datetime.UTC)
    results = [
        RowResult("a", "published", run_action="rendered", qc=_qc_columns(set())),
        RowResult("b", "rejected", run_action="reused", qc=_qc_columns({"face"}, "seams")),
        RowResult("c", "failed", first_published_at=when, billable_units=5.8, cost_usd=0.87),
    ]
    table = publish.results_table(results, None)
    assert table.schema == publish.RESULTS_SCHEMA
    assert publish.results_table(results[2:], None).schema == table.schema
    rows = table.to_pylist()
    assert [r["run_action"] for r in rows] == ["rendered", "reused", "failed"]
    assert [r["qc_passed"] for r in rows] == [True, False, None]
    assert [r["qc_face_status"] for r in rows] == ["passed", "skipped", None]
    assert (rows[1]["qc_face_value"], rows[1]["qc_face_passed"]) == (None, None)
    assert (rows[1]["qc_seams_value"], rows[1]["qc_seams_threshold"]) == (0.5, 1.0)
    assert rows[1]["qc_seams_passed"] is False
    assert "qc_lipsync_corr" in table.column_names
    assert rows[2]["first_published_at"] == when
    assert (rows[2]["billable_units"], rows[2]["cost_usd"]) == (5.8, 0.87)


def test_rejected_videos_go_to_the_fixed_folder_and_names_stay_checked(tmp_path: Path) -> None:
    source = tmp_path / "v.mp4"
    source.write_bytes(b"v")
    folder = rejected_target(str(tmp_path / "out"))
    assert folder == f"{tmp_path}/out/_rejected"
    url = publish_file(source, folder, "intro.mp4")
    assert Path(url.removeprefix("file://")) == tmp_path / "out" / "_rejected" / "intro.mp4"
    with pytest.raises(ValueError, match="refusing output name"):
        publish_file(source, folder, "../intro.mp4")


def _done(ledger: Ledger, row_id: str, input_hash: str, chunk: int, units: float, usd: float):
    """Record a rendered chunk in the ledger as the render stage does."""
    path = Path(ledger.url) / "c.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"mp4")
    video = ChunkVideo(row_id, chunk, str(path), "0" * 64, "fal", "req", 1, units, usd)
    ledger.record_chunk(video, input_hash)


def test_settled_results_carry_what_every_run_paid_and_the_first_publish_time(
    tmp_path: Path,
) -> None:
    config = BatchConfig(manifest="m.parquet", target=str(tmp_path / "out"))
    ledger = Ledger.for_run(config)
    # row a: two input hashes (a first render and a re-render); row b: one chunk of a row that
    # failed later; row dup: paid once, but two manifest rows now claim the id
    _done(ledger, "a", "1" * 64, 0, 5.8125, 0.871875)
    _done(ledger, "a", "1" * 64, 1, 5.0, 0.75)
    _done(ledger, "a", "2" * 64, 0, 5.8125, 0.871875)
    _done(ledger, "b", "3" * 64, 0, 5.8125, 0.871875)
    _done(ledger, "dup", "4" * 64, 0, 1.0, 0.15)
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    ledger.record_published(RowResult("b", "published", first_published_at=when), "3" * 64)
    results = [
        RowResult("a", "rejected", cost_usd=0.871875),
        RowResult("b", "failed", error="fal: 422"),
        RowResult("dup", "failed"),
        RowResult("DUP", "failed"),
        RowResult("row-9", "failed"),
    ]
    settled = {r.id: r for r in settle_results(results, config)}
    assert settled["a"].cost_usd == pytest.approx(0.871875 * 2 + 0.75)
    assert settled["a"].billable_units == pytest.approx(16.625)
    assert settled["a"].first_published_at is None
    assert settled["b"].cost_usd == pytest.approx(0.871875)
    assert settled["b"].first_published_at == when
    assert settled["dup"].cost_usd == settled["DUP"].cost_usd == 0.0
    assert settled["row-9"].cost_usd == 0.0


def test_publish_to_s3_lands_only_final_names(s3: S3Server, tmp_path: Path) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(b"v" * 50_000)
    target = f"{s3.url}/run-1"
    url = publish_file(source, target, "row.mp4", storage_options=s3.storage_options)
    results, schema = _results()
    write_results(results, schema, target, storage_options=s3.storage_options)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
    assert url == f"{target}/row.mp4"
    assert fs.cat(url) == source.read_bytes()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(target, refresh=True)) == [
        "results.parquet",
        "row.mp4",
    ]
    with fs.open(f"{target}/results.parquet", "rb") as f:
        _check_results_table(pq.read_table(f), schema)


def test_s3_endpoint_and_credentials_come_from_the_environment(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    # skip_instance_cache: an S3FileSystem cached earlier without the endpoint must not be reused.
    options = {"skip_instance_cache": True}
    url = publish_bytes(b"env", f"{s3.url}/env", "a.txt", storage_options=options)
    assert is_published(f"{s3.url}/env", "a.txt", storage_options=options)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
    assert fs.cat(url) == b"env"


def test_unavailable_s3_raises_publish_error_after_retries_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = S3Server().start()
    server.stop()
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retry loop: keep it short
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    sleeps: list[float] = []
    monkeypatch.setattr(publish.time, "sleep", sleeps.append)
    options = {
        **server.storage_options,
        "skip_instance_cache": True,
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    source = tmp_path / "v.mp4"
    source.write_bytes(b"v")
    with pytest.raises(PublishError) as caught:
        publish_file(source, f"{server.url}/x", "row.mp4", options, retry=FAST_RETRY)
    message = str(caught.value)
    assert f"{server.url}/x/row.mp4" in message
    assert "3 attempts" in message
    assert SECRET_KEY not in message
    assert ACCESS_KEY not in message
    assert caught.value.__cause__ is None
    assert sleeps == [0.01, 0.02]


SIGNED_AUDIO = "https://user:hunter22@example.com/a.wav?X-Amz-Signature=abc123&v=1"


def _plan() -> RowPlan:
    row = make_row("intro", SIGNED_AUDIO, prompt="a teacher", seed=7, extra={"note": "x"})
    audio = make_audio(9.0, source=row.audio, sha256="f" * 64, pcm_path="/work/a.wav")
    chunks = (Chunk("intro", 0, 0.0, 5.5, 1), Chunk("intro", 1, 5.5, 9.0, 1))
    return make_plan(row, audio, chunks, billable_units=11.625, estimated_cost_usd=1.74)


def test_sidecar_records_inputs_requests_cost_and_qc_but_no_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAL_KEY", "fal-secret-key-123")
    timings = Timings(upload_s=0.5, queue_s=1.0, run_s=3.5, download_s=0.25)
    videos = [
        ChunkVideo("intro", i, f"/w/{i}.mp4", str(i) * 64, "fal", f"req-{i}", 7, 5.8, 0.87, timings)
        for i in range(2)
    ]
    chunk_qc = [QCReport(True, (), {"frames": 93}, frames=93, fps=16.0)] * 2
    face = GateResult("face", "failed", 0.25, 0.8, "a face in 1 of 4", {"samples": 4, "faces": 1})
    reasons = ("moov atom is not before mdat", "qc face: a face in 1 of 4")
    final = QCReport(False, reasons, {"frames": 144}, (face,), 144, 16.0, 0.2)
    rerender = SidecarRerender(3, "e" * 64, ("face",), 1.2)
    sidecar = build_sidecar(_plan(), videos, chunk_qc, final, "fal", "longcat-avatar-1.0", rerender)
    text = json_bytes(sidecar).decode()
    doc = json.loads(text)
    assert set(doc) == {
        "id", "inputs", "parameters", "num_segments_override", "model", "backend", "seed",
        "segments", "chunks", "request_ids", "timings", "billable_units", "cost_usd",
        "estimated_cost_usd", "qc", "rerender", "route", "captions",
    }  # fmt: skip
    assert set(doc["inputs"]) == {"audio", "image", "image_sha256", "input_hash"}
    assert doc["inputs"]["audio"]["sha256"] == "f" * 64
    assert (
        doc["inputs"]["audio"]["source"]
        == "https://***@example.com/a.wav?X-Amz-Signature=***&v=***"
    )
    assert doc["inputs"]["input_hash"] == "h" * 64
    assert doc["parameters"]["prompt"] == "a teacher"
    assert doc["request_ids"] == ["req-0", "req-1"]
    assert doc["cost_usd"] == pytest.approx(1.74)
    assert doc["estimated_cost_usd"] == pytest.approx(1.74)
    assert doc["billable_units"] == pytest.approx(11.6)
    assert doc["segments"] == 2
    assert doc["chunks"][1]["start_s"] == 5.5
    assert doc["chunks"][1]["timings"] == to_json(timings)
    assert doc["timings"] == to_json(timings + timings)
    assert doc["qc"]["passed"] is False
    assert doc["qc"]["reasons"] == list(reasons)
    assert doc["qc"]["gates"][0] == {
        "name": "face", "status": "failed", "value": 0.25, "threshold": 0.8,
        "detail": "a face in 1 of 4", "measured": {"samples": 4, "faces": 1},
    }  # fmt: skip
    assert doc["rerender"] == {
        "first_seed": 3, "first_input_hash": "e" * 64, "first_failed": ["face"],
        "first_cost_usd": 1.2,
    }  # fmt: skip
    assert [c["qc"]["passed"] for c in doc["chunks"]] == [True, True]
    assert (doc["model"], doc["backend"], doc["seed"]) == ("longcat-avatar-1.0", "fal", 7)
    assert from_json(Sidecar, doc) == sidecar
    for secret in ("fal-secret-key-123", "hunter22", "abc123"):
        assert secret not in text


def test_other_filesystems_upload_beside_the_target_then_rename(tmp_path: Path) -> None:
    moves: list[tuple[str, str]] = []

    class Recording(LocalFileSystem):
        cachable = False

        def mv(self, path1: str, path2: str, **kwargs: object) -> None:
            moves.append((path1, path2))
            super().mv(path1, path2, **kwargs)

    # dir:// is neither local nor an object store: no atomic put, so a temp name and a rename
    options = {"path": str(tmp_path), "fs": Recording()}
    assert isinstance(fsspec.core.url_to_fs("dir://row.json", **options)[0], DirFileSystem)
    assert write_url("dir://row.json", b"{}", options) == "dir://row.json"
    [(temp, final)] = moves
    assert re.fullmatch(r"\.row\.json\.tmp-\d+-[0-9a-f]{32}", Path(temp).name), temp
    assert Path(final) == tmp_path / "row.json"
    assert [p.name for p in tmp_path.iterdir()] == ["row.json"]
    assert (tmp_path / "row.json").read_bytes() == b"{}"
