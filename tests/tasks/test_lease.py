"""One run per target: the lease that a second run waits for, on a local folder and on S3 (moto
on loopback), with conditional create, heartbeat renewal, expiry and takeover."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest

from avatarflow.tasks import lease
from avatarflow.tasks.lease import Holder, Lease, LedgerBusyError, LocalLease, StoreLease
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.records import json_bytes
from tests.fakes.s3_server import S3Server

THREADS = 8


@dataclass
class Target:
    """Where a test's ledger lives, and how to make a lease on it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    def lease(self, ttl_s: float = 30.0) -> Lease:
        if self.url.startswith("s3://"):
            return StoreLease(self.fs, self.root, self.url, None, ttl_s=ttl_s)
        return LocalLease(self.root, self.url, None)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lease, "POLL_S", 0.05)


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "local":
        return Target(fsspec.filesystem("file"), str(tmp_path / "state"), str(tmp_path / "state"))
    s3: S3Server = request.getfixturevalue("s3")
    fs = fsspec.filesystem("s3", **s3.storage_options)
    root = f"{s3.bucket}/{tmp_path.name}/state"
    return Target(fs, root, f"s3://{root}")


@pytest.fixture
def s3_target(s3: S3Server, tmp_path: Path) -> Target:
    fs = fsspec.filesystem("s3", **s3.storage_options)
    root = f"{s3.bucket}/{tmp_path.name}/state"
    return Target(fs, root, f"s3://{root}")


def _race(leases: list[Lease], take: Callable[[Lease], bool]) -> list[bool]:
    """Start every lease's try at the same moment; what each got."""
    start = threading.Barrier(len(leases))

    def attempt(x: Lease) -> bool:
        start.wait()
        return take(x)

    with ThreadPoolExecutor(len(leases)) as pool:
        return list(pool.map(attempt, leases))


def test_conditional_create_wins_once_among_threads(target: Target) -> None:
    for _ in range(3):  # three rounds: each one taken once, then released for the next
        leases = [target.lease() for _ in range(THREADS)]
        won = _race(leases, lambda x: x._try_take())
        assert won.count(True) == 1, won
        winner = leases[won.index(True)]
        for loser in leases:
            if loser is not winner:
                assert loser.seen is not None
                assert loser.seen.token == winner.mine.token  # the loser sees who won
                if isinstance(loser, LocalLease):
                    loser.release()  # closes its lock file
        winner.release()


def test_a_second_run_waits_naming_the_holder_then_refuses(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    first = target.lease()
    first.acquire(None)
    try:
        caplog.set_level(logging.WARNING, logger="avatarflow.tasks.lease")
        with pytest.raises(LedgerBusyError) as busy:
            target.lease().acquire(0.3)
    finally:
        first.release()
    holder = f"on host {socket.gethostname()} (pid {os.getpid()}) that holds {target.url}; started"
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for")]
    assert len(waiting) == 1  # said once, not once a poll
    assert holder in waiting[0]
    assert "lease until" in waiting[0]
    assert holder in str(busy.value)
    assert "gave up after" in str(busy.value)
    assert "AVATARFLOW_TARGET_WAIT=0.3" in str(busy.value)
    second = target.lease()
    second.acquire(0)  # released with the first run
    second.release()


def test_a_waiting_run_goes_on_once_the_holder_releases(target: Target) -> None:
    first = target.lease()
    first.acquire(None)
    threading.Timer(0.5, first.release).start()
    began = time.monotonic()
    second = target.lease()
    second.acquire(None)  # no limit: waits as long as the holder runs
    try:
        assert 0.4 < time.monotonic() - began < 10
    finally:
        second.release()


def test_the_heartbeat_renews_the_lease_past_its_ttl(s3_target: Target) -> None:
    held = s3_target.lease(ttl_s=0.8)
    assert isinstance(held, StoreLease)
    held.acquire(None)
    try:
        first_expiry = held.mine.expires_at
        time.sleep(2.0)  # 2.5 ttls: without renewal it would have expired
        assert held.valid
        assert held.mine.expires_at is not None
        assert first_expiry is not None
        assert held.mine.expires_at > first_expiry + 1.0
        other = s3_target.lease(ttl_s=0.8)
        assert not other._try_take()  # still held: no takeover
        assert other.seen is not None
        assert other.seen.token == held.mine.token
    finally:
        held.release()
    assert not s3_target.fs.exists(f"{s3_target.root}/run.lease")


def _dead_run_lease(t: Target) -> Holder:
    """The lease a killed run left behind: never renewed, now expired."""
    dead = dataclasses.replace(Holder.mine(t.url, 1.0), pid=999999, expires_at=time.time() - 1)
    t.fs.pipe_file(f"{t.root}/run.lease", json_bytes(dead))
    return dead


def test_an_expired_lease_is_taken_over_by_one_waiter(
    s3_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    dead = _dead_run_lease(s3_target)
    caplog.set_level(logging.WARNING, logger="avatarflow.tasks.lease")
    leases = [s3_target.lease() for _ in range(THREADS)]
    won = _race(leases, lambda x: x._try_take())
    assert won.count(True) == 1, won  # If-Match on the stale ETag: one waiter's write matches
    assert any(dead.describe() in r.getMessage() for r in caplog.records if "took over" in r.msg)
    leases[won.index(True)].release()


def test_a_run_that_lost_its_lease_submits_nothing_more(s3_target: Target) -> None:
    ledger = Ledger(s3_target.url, storage_options=dict(s3_target.fs.storage_options))
    with ledger.lock() as held:
        assert isinstance(held, StoreLease)
        ledger.record_attempt("row", "h" * 64, 0, "app/audio-to-video")  # held: allowed
        # Another run overwrote the lease (as one that took it over after a stall would).
        thief = dataclasses.replace(Holder.mine(s3_target.url, 30.0), host="other-host")
        s3_target.fs.pipe_file(held.path, json_bytes(thief))
        held.renew()
        assert held.lost
        with pytest.raises(LedgerBusyError, match="no longer holds"):
            ledger.record_attempt("row", "h" * 64, 1, "app/audio-to-video")
    assert s3_target.fs.exists(held.path)  # the other run's lease is left alone


def test_a_store_without_conditional_writes_says_so_and_still_sees_a_holder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fs = fsspec.filesystem("memory")
    root = f"/lease-test-{time.time_ns()}"
    caplog.set_level(logging.WARNING, logger="avatarflow.tasks.lease")
    first = StoreLease(fs, root, f"memory://{root}", None, ttl_s=5.0)
    first.acquire(None)
    try:
        assert "no conditional write" in caplog.text
        with pytest.raises(LedgerBusyError, match=f"pid {os.getpid()}"):
            StoreLease(fs, root, f"memory://{root}", None, ttl_s=5.0).acquire(0)
    finally:
        first.release()


def test_the_wait_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lease.WAIT_ENV, raising=False)
    assert lease.wait_limit() is None
    monkeypatch.setenv(lease.WAIT_ENV, "90")
    assert lease.wait_limit() == 90.0
    monkeypatch.setenv(lease.WAIT_ENV, "soon")
    with pytest.raises(ValueError, match="AVATARFLOW_TARGET_WAIT"):
        lease.wait_limit()


def test_a_renewal_whose_answer_was_lost_keeps_the_lease(s3_target: Target) -> None:
    held = s3_target.lease()
    assert isinstance(held, StoreLease)
    held.acquire(None)
    try:
        landed = held.etag
        held.etag = '"an-etag-from-before-the-lost-answer"'
        held.renew()  # If-Match fails, but the lease read back is still this run's
        assert not held.lost
        assert held.etag == landed
        held.renew()
        assert not held.lost
    finally:
        held.release()
