"""The run ledger: torn writes read as absent, attempt → request → done, temp files swept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatarflow.tasks.lease import LedgerBusyError
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import ChunkVideo, Published, Request, RowResult
from avatarflow.tasks.storage import sha256_file

ROW, HASH = "row-1", "a" * 64


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(str(tmp_path / "state"))


def _video(tmp_path: Path, chunk: int = 0, data: bytes = b"mp4 bytes") -> ChunkVideo:
    path = tmp_path / f"{ROW}.chunk{chunk}.mp4"
    path.write_bytes(data)
    return ChunkVideo(ROW, chunk, str(path), sha256_file(path), "fal", request_id="req-1")


def test_torn_writes_read_as_absent(ledger: Ledger) -> None:
    ledger.record_attempt(ROW, HASH, 0, "app/audio-to-video")
    ledger.record_request(ROW, HASH, 0, "req-1", "app/audio-to-video")
    request_path = ledger._chunk_path(ROW, HASH, 0, "request.json")
    with ledger.fs.open(request_path, "wb") as f:
        f.write(b'{"request_id": "req-1", "endp')  # a writer killed mid-write (no rename)
    assert ledger.request(ROW, HASH, 0) is None
    record = ledger.chunk(ROW, HASH, 0)
    assert record.ambiguous  # the attempt stands unanswered: never treated as "not submitted"
    assert record.request_id is None
    ledger.fs.pipe_file(request_path, b"\xff\xfe not json")
    assert ledger.request(ROW, HASH, 0) is None


def test_attempt_request_done_lifecycle(ledger: Ledger, tmp_path: Path) -> None:
    fresh = ledger.chunk(ROW, HASH, 0)
    assert (fresh.ambiguous, fresh.request_id, fresh.done) == (False, None, False)
    assert ledger.in_flight() == []

    assert ledger.record_attempt(ROW, HASH, 0, "app/audio-to-video") == 1
    assert ledger.chunk(ROW, HASH, 0).ambiguous
    assert [r.chunk for r in ledger.in_flight()] == [0]

    ledger.record_request(ROW, HASH, 0, "req-1", "app/audio-to-video")
    record = ledger.chunk(ROW, HASH, 0)
    assert (record.ambiguous, record.request_id) == (False, "req-1")

    # A resubmit (expired or failed): a newer unanswered attempt hides the old id...
    assert ledger.record_attempt(ROW, HASH, 0, "app/audio-to-video") == 2
    assert ledger.chunk(ROW, HASH, 0).ambiguous
    assert ledger.chunk(ROW, HASH, 0).request_id is None
    # ...until its own id is recorded, keeping the replaced one for audit.
    ledger.record_request(ROW, HASH, 0, "req-2", "app/audio-to-video")
    request = ledger.request(ROW, HASH, 0)
    assert request is not None
    assert (request.request_id, request.attempt, request.replaced) == ("req-2", 2, ("req-1",))

    ledger.record_chunk(_video(tmp_path), HASH)
    assert ledger.chunk(ROW, HASH, 0).done
    assert not ledger.chunk(ROW, HASH, 0).ambiguous
    assert ledger.in_flight() == []


def test_in_flight_lists_requested_and_ambiguous_chunks_only(
    ledger: Ledger, tmp_path: Path
) -> None:
    for chunk in range(3):
        ledger.record_attempt(ROW, HASH, chunk, "app/audio-to-video")
    ledger.record_request(ROW, HASH, 0, "req-0", "app/audio-to-video")
    ledger.record_request(ROW, HASH, 2, "req-2", "app/audio-to-video")
    ledger.record_chunk(_video(tmp_path, chunk=2), HASH)
    found = {(r.chunk, r.request_id, r.ambiguous) for r in ledger.in_flight()}
    assert found == {(0, "req-0", False), (1, None, True)}


def test_rendered_chunk_is_restored_and_sha_checked(ledger: Ledger, tmp_path: Path) -> None:
    video = _video(tmp_path)
    ledger.record_chunk(video, HASH)
    restored_dir = tmp_path / "elsewhere"
    restored = ledger.rendered_chunk(ROW, HASH, 0, restored_dir)
    assert restored is not None
    assert Path(restored.path).read_bytes() == b"mp4 bytes"
    ledger.fs.pipe_file(ledger._chunk_path(ROW, HASH, 0, "mp4"), b"torn")
    Path(restored.path).unlink()
    assert ledger.rendered_chunk(ROW, HASH, 0, restored_dir) is None
    assert ledger.rendered_chunk(ROW, "b" * 64, 0, restored_dir) is None  # other inputs


def test_records_work_on_an_object_store_url(tmp_path: Path) -> None:
    ledger = Ledger("memory://avatarflow-test-ledger/state")
    ledger.record_attempt(ROW, HASH, 0, "app/audio-to-video")
    ledger.record_request(ROW, HASH, 0, "req-1", "app/audio-to-video")
    assert ledger.chunk(ROW, HASH, 0).request_id == "req-1"
    ledger.record_chunk(_video(tmp_path), HASH)
    assert ledger.rendered_chunk(ROW, HASH, 0, tmp_path / "copy") is not None
    assert ledger.sweep_temp_files() == []


def test_writes_leave_no_temp_files_and_sweep_removes_only_dead_writers(
    ledger: Ledger, tmp_path: Path
) -> None:
    ledger.record_request(ROW, HASH, 0, "req-1", "app/audio-to-video")
    ledger.record_chunk(_video(tmp_path), HASH)
    folder = Path(ledger._chunk_path(ROW, HASH, 0, "x")).parent
    assert sorted(p.name for p in folder.iterdir()) == [
        "chunk-0.done.json",
        "chunk-0.mp4",
        "chunk-0.request.json",
    ]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    stale = folder / f".chunk-1.request.json.tmp-{dead_pid}-{'0' * 32}"
    live = folder / f".chunk-2.request.json.tmp-{os.getpid()}-{'1' * 32}"
    stale.write_bytes(b"{")
    live.write_bytes(b"{")
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.mp4").write_bytes(b"final")
    torn = target / f".a.mp4.tmp-{dead_pid}-{'2' * 32}"  # a publish killed before its rename
    torn.write_bytes(b"half")
    assert ledger.sweep_temp_files(str(target)) == [str(stale), str(torn)]
    assert live.exists()
    assert not stale.exists()
    assert [p.name for p in target.iterdir()] == ["a.mp4"]


def test_one_run_at_a_time_holds_a_ledger(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATARFLOW_TARGET_WAIT", "0")
    busy = pytest.raises(LedgerBusyError, match=f"pid {os.getpid()}\\) that holds {ledger.url};")
    with ledger.lock(), busy, Ledger(ledger.url).lock():
        pass
    with Ledger(ledger.url).lock():  # released with the first run
        pass


def test_in_flight_includes_requests_recorded_without_an_attempt(ledger: Ledger) -> None:
    ledger.record_request(ROW, HASH, 3, "req-3", "app/audio-to-video")  # an older ledger's layout
    assert [(r.chunk, r.request_id) for r in ledger.in_flight()] == [(3, "req-3")]


def test_documents_are_typed_records(ledger: Ledger, tmp_path: Path) -> None:
    ledger.record_attempt(ROW, HASH, 0, "app/audio-to-video")
    ledger.record_request(ROW, HASH, 0, "req-1", "app/audio-to-video")
    record = ledger.chunk(ROW, HASH, 0)
    assert record.attempt is not None
    assert (record.attempt.endpoint, record.attempt.n) == ("app/audio-to-video", 1)
    assert isinstance(record.request, Request)
    assert ledger.read(ledger._chunk_path(ROW, HASH, 0, "request.json"), Request) == record.request
    assert ledger.read(ledger._chunk_path(ROW, HASH, 9, "request.json"), Request) is None

    result = RowResult(ROW, "published", str(tmp_path / "row-1.mp4"), extra={"course": "c1"})
    ledger.record_published(result, HASH)
    assert ledger.published(ROW) == Published(result, HASH)
    assert ledger.published("other") is None
