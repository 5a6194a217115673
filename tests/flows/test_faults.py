"""Fault injection through the whole flow: fal's 429/5xx, failed completions, gateway 504s and cut
downloads; an S3 outage while publishing; a full work dir. Every run must end with each row either
published and verified, or failed alone with a clear error, and a rerun must pay for nothing twice.

Billing model of the fake (tests/fakes/fal_server.py): a request is billed when it completes
successfully; one that ends COMPLETED with an error (5xx runner failure) or is cancelled is not,
as fal documents ("Failed requests that return 5xx status codes are not billed").
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import av
import fsspec
import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError

import avatarflow.tasks.backends.fal.client
import avatarflow.tasks.concat
from avatarflow.flows.produce import run_batch
from avatarflow.tasks import publish
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.finish import CHUNKS_KEPT
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.media import count_audio_samples, probe_video
from avatarflow.tasks.publish import RetryPolicy
from tests.factories import narrated_manifest
from tests.fakes.fal_server import FakeFal, Faults
from tests.fakes.s3_server import ACCESS_KEY, SECRET_KEY, S3Server

FPS = 16
FULL_DEVICE = "/dev/full"  # every write to it fails with ENOSPC, as on a full disk

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def fal(fake: FakeFal) -> FakeFal:
    """The module's fake fal, reset, with FAL_* pointing at it (see tests/conftest.py)."""
    return fake


def _config(manifest: str, target: str, work: Path, fal: FakeFal, **update: Any) -> BatchConfig:
    # Millisecond backoff and fast polls: the retry logic is real, only its waits are short.
    return BatchConfig(
        manifest=manifest,
        target=target,
        backend="fal",
        work_dir=str(work),
        fal=fal.settings(),
        **update,
    )


def _check_video(path: str | Path, audio_s: float) -> None:
    """An H.264 + AAC MP4 whose picture and sound both last the narration's length ±1 frame."""
    probe = probe_video(str(path))
    assert (probe.codec, probe.audio_codec) == ("h264", "aac")
    assert abs(probe.frames / FPS - audio_s) <= 1 / FPS
    samples, rate = count_audio_samples(str(path))
    assert abs(samples / rate - audio_s) <= 1 / FPS


# 16 single-chunk rows and 4 that are cut into 2-3 chunks (chunk_target_s=11 below).
FAULT_ROWS = {f"short{i:02d}": 3.0 + i % 4 for i in range(16)}
FAULT_ROWS |= {f"multi{i}": 13.0 + 2.5 * i for i in range(4)}


@pytest.mark.timeout(90, func_only=True)  # the budget of the test itself
def test_batch_rides_out_fal_faults_and_pays_at_most_5_percent_more(
    fal: FakeFal, tmp_path: Path
) -> None:
    """20 rows under 10 % 429 and 5 % 503 on submit, 5 % failed completions, a gateway 504 on a
    result and a cut download: all publish, and the bill matches a fault-free run's."""
    manifest = narrated_manifest(tmp_path, FAULT_ROWS)

    clean = run_batch(
        _config(manifest, str(tmp_path / "clean"), tmp_path / "w1", fal, chunk_target_s=11)
    )
    assert clean.exit_code == 0, [r.error for r in clean.results if r.error]
    clean_units, clean_completed = fal.billed_units, fal.counts["completed"]
    assert clean_completed > len(FAULT_ROWS)  # the multi rows really have several chunks

    # Each kind fires at least once (scripted), and more at random: the random draws alone depend
    # on the order the pool's threads reach the fake, so they cannot promise every kind.
    faults = Faults(
        submit_429=1,
        submit_5xx=1,
        completed_error=1,
        result_504=1,
        download_cut=1,
        rates={"submit_429": 0.10, "submit_5xx": 0.05, "completed_error": 0.05},
        seed=20261125,
    )
    fal.reset(faults)
    target = tmp_path / "faulty"
    outcome = run_batch(_config(manifest, str(target), tmp_path / "w2", fal, chunk_target_s=11))

    errors = {r.id: r.error for r in outcome.results if r.status != "published"}
    assert errors == {}
    for row_id, seconds in FAULT_ROWS.items():
        _check_video(target / f"{row_id}.mp4", seconds)
    for fault in ("submit_429", "submit_5xx", "completed_error", "result_504", "download_cut"):
        assert fal.counts[f"fault:{fault}"] >= 1, fault  # every kind of fault really happened
    assert fal.counts["file_range"] >= 1  # the cut download resumed where it stopped
    # Each chunk was billed once: failed completions cost nothing and were resubmitted once each.
    assert fal.counts["completed"] == clean_completed
    assert fal.submissions == clean_completed + fal.counts["fault:completed_error"]
    assert fal.billed_units <= 1.05 * clean_units


# A full work dir: the kernel's /dev/full fails every write with ENOSPC, so the real write calls
# (Python's file writes in the download, FFmpeg's own I/O in the concat) meet a real ENOSPC; the
# tests only steer which file lands there, through each module's Path / av name. A tmpfs or loop
# mount would need root (not to be assumed in CI) and would fill up for every row at once.
class _FullDownloads(type(Path())):  # type: ignore[misc]
    """The fal client's Path: the row's .part download files live on a full disk (/dev/full)."""

    row_id = "dlfull"

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:  # type: ignore[override]
        if self.suffix == ".part" and f"/rows/{self.row_id}/" in str(self) and mode[0] in "wa":
            self.unlink(missing_ok=True)
            os.symlink(FULL_DEVICE, self)
        return super().open(mode, *args, **kwargs)


class _FullConcatAv:
    """concat.py's av: the row's concat output is written by FFmpeg onto a full disk."""

    row_id = "concatfull"

    def __getattr__(self, name: str) -> Any:
        return getattr(av, name)

    def open(self, file: Any, mode: str = "r", **kwargs: Any) -> Any:
        path = Path(str(file))
        if mode == "w" and path.name.startswith(f".{self.row_id}.mp4.tmp-"):
            os.symlink(FULL_DEVICE, path)  # the temp file FFmpeg writes: ENOSPC on every write
        return av.open(file, mode, **kwargs)


@pytest.mark.skipif(not os.path.exists(FULL_DEVICE), reason="needs Linux's /dev/full")
def test_full_work_dir_fails_only_its_rows_and_a_rerun_pays_nothing(
    fal: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lengths = {"dlfull": 4.0, "concatfull": 5.0, "fine": 4.5}
    manifest = narrated_manifest(tmp_path, lengths)
    target, work = tmp_path / "out", tmp_path / "work"
    config = _config(manifest, str(target), work, fal)
    monkeypatch.setattr(avatarflow.tasks.backends.fal.client, "Path", _FullDownloads)
    monkeypatch.setattr(avatarflow.tasks.concat, "av", _FullConcatAv())

    first = run_batch(config)

    by_id = {r.id: r for r in first.results}
    assert by_id["fine"].status == "published"
    for row_id in ("dlfull", "concatfull"):
        assert by_id[row_id].status == "failed"
        assert "work dir is full" in by_id[row_id].error
        assert f"{work}/rows/{row_id}/" in by_id[row_id].error  # names the file it was writing
    assert "downloading a rendered chunk" in by_id["dlfull"].error
    assert "concatfull.mp4" in by_id["concatfull"].error
    leftovers = [p for p in work.rglob("*") if p.is_symlink() or p.name.endswith(".part")]
    assert leftovers == []  # partial files are removed, not left to fill the disk further
    assert fal.submissions == 3

    monkeypatch.setattr(avatarflow.tasks.backends.fal.client, "Path", Path)  # space is free again
    monkeypatch.setattr(avatarflow.tasks.concat, "av", av)
    fal.reset()
    second = run_batch(config)

    assert {r.id: r.status for r in second.results} == dict.fromkeys(lengths, "published")
    actions = {r.id: r.run_action for r in second.results}
    assert actions["fine"] == "skipped"  # published by the first run: not touched again
    assert actions["dlfull"] != "skipped"
    assert actions["concatfull"] != "skipped"
    assert fal.submissions == 0  # the known request is fetched again, the rendered chunk reused
    for row_id in ("dlfull", "concatfull"):
        _check_video(target / f"{row_id}.mp4", lengths[row_id])


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """moto S3 found through the environment; botocore and s3fs give up on a refused connection
    at once, so only avatarflow.tasks.publish's own retry policy is measured."""
    with S3Server() as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
        monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
        s3fs.S3FileSystem.clear_instance_cache()  # no client bound to an earlier test's endpoint
        yield server
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_outage_during_publish_fails_the_row_then_a_rerun_publishes_without_paying(
    fal: FakeFal, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = narrated_manifest(tmp_path, {"lesson": 14.0})
    target = f"{s3.url}/{tmp_path.name}"  # moto keeps every test's objects: a prefix of its own
    config = _config(manifest, target, tmp_path / "work", fal, chunk_target_s=11)
    real_publish_file = publish.publish_file

    def publish_during_outage(local_path: str, target_url: str, name: str, *args: Any) -> str:
        # S3 goes away as the row's video is published and is back before the results table.
        s3.stop()
        try:
            return real_publish_file(local_path, target_url, name, *args)
        finally:
            s3.start()

    monkeypatch.setattr(publish, "publish_file", publish_during_outage)
    first = run_batch(config)

    [row] = first.results
    assert row.status == "failed"
    assert row.error.startswith("publish error: PublishError: could not publish")
    assert f"{target}/lesson.mp4" in row.error
    assert f"({RetryPolicy().attempts} attempts)" in row.error  # publish retried before failing
    assert row.error.endswith(f"(nor kept under _rejected/: PublishError); {CHUNKS_KEPT}")
    for secret in (SECRET_KEY, ACCESS_KEY, fal.key):
        assert secret not in row.error
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    kept = fs.glob(f"{target}/.avatarflow/rows/lesson/*/chunk-*.mp4")
    assert len(kept) == fal.submissions == 2  # both paid chunks are kept in the run's ledger
    assert not fs.exists(f"{target}/lesson.mp4")
    assert len(list((tmp_path / "work").rglob("render/*.mp4"))) == 2

    monkeypatch.setattr(publish, "publish_file", real_publish_file)
    fal.reset()
    second = run_batch(config)

    assert [r.status for r in second.results] == ["published"]
    assert fal.submissions == 0
    local = tmp_path / "lesson.mp4"
    fs.get(f"{target}/lesson.mp4", str(local))
    _check_video(local, 14.0)


def test_unreachable_s3_state_stops_the_batch_before_anything_is_paid(
    fal: FakeFal, s3: S3Server, tmp_path: Path
) -> None:
    manifest = narrated_manifest(tmp_path, {"lesson": 4.0})
    config = _config(manifest, f"{s3.url}/{tmp_path.name}", tmp_path / "work", fal)
    s3.stop()  # the run's ledger lives beside the target: it cannot be read, so nothing may start

    ledger = re.escape(f"/{s3.bucket}/{tmp_path.name}/.avatarflow/")
    with pytest.raises(EndpointConnectionError, match=ledger):
        run_batch(config)

    assert fal.submissions == 0


def test_s3_outage_while_recording_a_request_id_still_pays_once(
    fal: FakeFal, s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = narrated_manifest(tmp_path, {"lesson": 4.0})
    config = _config(manifest, f"{s3.url}/{tmp_path.name}", tmp_path / "work", fal)
    real_record = Ledger.record_request

    def record_during_outage(self: Ledger, *args: Any) -> None:
        s3.stop()  # fal has queued (and will bill) the request; its id cannot be stored now
        try:
            real_record(self, *args)
        finally:
            s3.start()

    monkeypatch.setattr(Ledger, "record_request", record_during_outage)
    run_batch(config)
    monkeypatch.setattr(Ledger, "record_request", real_record)
    again = run_batch(config)

    assert [r.status for r in again.results] == ["published"]
    assert fal.submissions == 1  # the one paid request was used, not abandoned or paid again
