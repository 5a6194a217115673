"""One run per target: a lease on the run ledger that a second run waits for, then refuses.

The rule, the same on local folders and object stores: a run that finds its target held waits,
saying once who holds it ("waiting for run X on host Y (pid Z) that holds URL; started …, lease
until …"), for up to AVATARFLOW_TARGET_WAIT seconds (unset: as long as it takes, like a scheduled
run queued behind the one before it); past that it refuses with LedgerBusyError naming the holder.

How it is held:
- local ledger: an flock on run.lock, which the kernel frees the moment its process dies, and a
  holder document run.lease beside it, for the message;
- S3: run.lease itself, created with the store's conditional create (If-None-Match: *) so one run
  wins, renewed by a heartbeat with a conditional overwrite (If-Match on its ETag) and expiring
  LEASE_TTL_S after its run stops renewing; a waiting run takes an expired lease over with the
  same If-Match, so two waiters cannot both take it;
- other stores (GCS, Azure, memory, sftp, …): no conditional write that avatarflow knows of, said
  at start; run.lease is written, then read back, and a run that sees another holder waits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

import fsspec
import pydantic
from fsspec.implementations.local import LocalFileSystem

from avatarflow.tasks.records import from_json, json_bytes
from avatarflow.tasks.stop import wait_unless_stopped
from avatarflow.tasks.storage import write_fs, write_local

log = logging.getLogger(__name__)

WAIT_ENV = "AVATARFLOW_TARGET_WAIT"
LEASE_TTL_S = 60.0  # how long a killed run keeps an object-store target from the next one
POLL_S = 2.0  # how often a waiting run looks again
# Stores whose conditional create and If-Match overwrite avatarflow uses (tested on S3's API).
CONDITIONAL_PROTOCOLS = frozenset({"s3", "s3a"})
# Errors a store answers when a condition did not hold, or another conditional write raced ours.
_CONDITION_FAILED = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


class LedgerBusyError(RuntimeError):
    """Another run holds this target: two runs on one target could both pay for a chunk."""


@dataclass(frozen=True)
class Holder:
    """Who holds a target: the run.lease document."""

    token: str  # unique per hold: whose lease this is
    target: str  # the ledger URL (and shard scope) held
    host: str
    pid: int
    flow_run: str | None  # "name (id)" of the Prefect flow run, when there is one
    started: float
    expires_at: float | None  # None: a local flock, held until its process ends

    @classmethod
    def mine(cls, target: str, ttl_s: float | None) -> Holder:
        now = time.time()
        expires = now + ttl_s if ttl_s is not None else None
        return cls(
            uuid.uuid4().hex, target, socket.gethostname(), os.getpid(), _flow_run(), now, expires
        )

    def expired(self) -> bool:
        return self.expires_at is not None and self.expires_at < time.time()

    def describe(self) -> str:
        """'run X on host Y (pid Z) that holds URL; started …, lease until …'"""
        who = f"run {self.flow_run}" if self.flow_run else "a run"
        until = _iso(self.expires_at) if self.expires_at is not None else "its process ends"
        return (
            f"{who} on host {self.host} (pid {self.pid}) that holds {self.target}; "
            f"started {_iso(self.started)}, lease until {until}"
        )


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _flow_run() -> str | None:
    from prefect.runtime import flow_run

    return f"{flow_run.name} ({flow_run.id})" if flow_run.id else None


def wait_limit() -> float | None:
    """Seconds a run waits for a held target (AVATARFLOW_TARGET_WAIT; unset: no limit)."""
    value = os.environ.get(WAIT_ENV, "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"{WAIT_ENV} must be a number of seconds, not {value!r}") from None


class Lease:
    """The hold of one run on one target; subclasses say how a hold is taken and kept."""

    def __init__(self, url: str, scope: str | None) -> None:
        self.url = url
        self.target = f"{url} (shard {scope})" if scope else url
        self.seen: Holder | None = None  # the other holder, when the last try failed
        self.lost = False

    def _try_take(self) -> bool:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    @property
    def valid(self) -> bool:
        """False once this run can no longer be sure it alone holds the target."""
        return not self.lost

    def acquire(self, wait_s: float | None) -> None:
        """Take the target, waiting up to wait_s seconds (None: no limit) for its holder."""
        began, said = time.monotonic(), ""
        while not self._try_take():
            holder = self.seen.describe() if self.seen else f"another run that holds {self.target}"
            waited = time.monotonic() - began
            if wait_s is not None and waited >= wait_s:
                raise LedgerBusyError(
                    f"{holder}; gave up after {waited:.0f} s ({WAIT_ENV}={wait_s:g})"
                )
            if holder != said:  # once per holder, not once a poll
                log.warning("waiting for %s", holder)
                said = holder
            wait_unless_stopped(POLL_S)


class LocalLease(Lease):
    """An flock on run.lock (freed by the kernel when its process dies) + the holder document."""

    def __init__(self, root: str, url: str, scope: str | None) -> None:
        super().__init__(url, scope)
        os.makedirs(root, exist_ok=True)
        name = f"run-{scope}" if scope else "run"
        self.doc = f"{root}/{name}.lease"
        self._fh: IO[str] = open(f"{root}/{name}.lock", "a+")  # noqa: SIM115 (held until release)
        self.mine = Holder.mine(self.target, None)

    def acquire(self, wait_s: float | None) -> None:
        try:
            super().acquire(wait_s)
        except BaseException:
            self._fh.close()
            raise

    def _try_take(self) -> bool:
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.seen = self._holder()
            return False
        write_local(self.doc, json_bytes(self.mine))
        return True

    def _holder(self) -> Holder | None:
        # A holder writes its document just after taking the flock: give it a moment to.
        for _ in range(20):
            holder = _parse(_read_local(self.doc))
            if holder is not None:
                return holder
            time.sleep(0.05)
        return None

    def release(self) -> None:
        with contextlib.suppress(OSError):
            if _parse(_read_local(self.doc)) == self.mine:
                os.unlink(self.doc)
        self._fh.close()  # frees the flock


def _read_local(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _parse(data: bytes | None) -> Holder | None:
    if data is None:
        return None
    with contextlib.suppress(ValueError, pydantic.ValidationError):
        return from_json(Holder, json.loads(data))
    return None


class StoreLease(Lease):
    """run.lease on a store: conditional create, heartbeat renewal, expiry and takeover."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        url: str,
        scope: str | None,
        ttl_s: float = LEASE_TTL_S,
    ) -> None:
        super().__init__(url, scope)
        self.fs, self.ttl_s = fs, ttl_s
        self.path = f"{root}/run-{scope}.lease" if scope else f"{root}/run.lease"
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self.conditional = bool(protocols & CONDITIONAL_PROTOCOLS)
        self.mine = Holder.mine(self.target, ttl_s)
        self.etag = ""
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def valid(self) -> bool:
        # A run whose heartbeat has not renewed in time may already have been taken over.
        return not self.lost and not self.mine.expired()

    def acquire(self, wait_s: float | None) -> None:
        if not self.conditional:
            log.warning(
                "%s: this store has no conditional write avatarflow knows of; its lease is "
                "written and read back, so two runs started at the same instant could both go "
                "on: start one run per target at a time",
                self.target,
            )
        super().acquire(wait_s)
        self._beat = threading.Thread(target=self._heartbeat, name="lease-heartbeat", daemon=True)
        self._beat.start()

    def _try_take(self) -> bool:
        self.mine = dataclasses.replace(self.mine, expires_at=time.time() + self.ttl_s)
        for _ in range(3):  # a lease released between our create and our read: try again
            etag = self._create(self.mine)
            if etag is not None:
                self.etag = etag
                return True
            current = self._read()
            if current is None:
                continue
            self.seen, stale_etag = current
            if self.seen is not None and not self.seen.expired():
                return False
            etag = self._replace(self.mine, stale_etag)  # only one waiter's If-Match matches
            if etag is not None:
                log.warning(
                    "took over %s",
                    self.seen.describe() if self.seen else f"an unreadable lease on {self.target}",
                )
                self.etag = etag
                return True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as exc:  # the store may be briefly down: try again next beat
                log.warning("%s: lease not renewed (%s: %s)", self.target, type(exc).__name__, exc)
            if not self.valid:
                if not self.lost:
                    log.error("%s: lease expired unrenewed; no new paid submit", self.target)
                self.lost = True
                return

    def renew(self) -> None:
        """Extend the lease by ttl_s, unless another run has taken it over (then: lost)."""
        renewed = dataclasses.replace(self.mine, expires_at=time.time() + self.ttl_s)
        etag = self._replace(renewed, self.etag)
        if etag is None:
            holder, current_etag = self._read() or (None, "")
            if holder is not None and holder.token == self.mine.token:
                self.mine, self.etag = holder, current_etag  # our last renewal landed unanswered
                return
            self.lost = True
            log.error(
                "%s: lost the lease to %s; no new paid submit from this run",
                self.target,
                holder.describe() if holder else "nobody (it was removed)",
            )
            return
        self.mine, self.etag = renewed, etag

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        try:
            current = None if self.lost else self._read()
            if current is not None and current[0] == self.mine:
                self.fs.rm_file(self.path)
        except Exception as exc:  # the run's outcome matters more: the lease expires by itself
            log.warning("%s: lease left to expire (%s: %s)", self.target, type(exc).__name__, exc)

    # --- the store's operations: an ETag (or, without conditional writes, the token) ----------

    def _read(self) -> tuple[Holder | None, str] | None:
        """The lease document and its ETag, or None when there is none."""
        self.fs.invalidate_cache(self.path)
        try:
            with self.fs.open(self.path, "rb") as fh:
                data = fh.read()
                details: dict[str, Any] = getattr(fh, "details", {})
        except FileNotFoundError:
            return None
        except OSError as exc:
            if _condition_failed(exc):  # rewritten while we read it
                return None
            raise
        holder = _parse(data)
        if self.conditional:
            return holder, str(details.get("ETag", ""))
        return holder, holder.token if holder else ""

    def _create(self, doc: Holder) -> str | None:
        """Write doc only if no lease exists; its ETag, or None when one does."""
        data = json_bytes(doc)
        if self.conditional:
            try:
                return str(self.fs.pipe_file(self.path, data, mode="create")["ETag"])
            except FileExistsError:
                return None
            except OSError as exc:
                if _condition_failed(exc):
                    return None
                raise
        if self.fs.exists(self.path):
            return None
        return self._write_and_check(doc)

    def _replace(self, doc: Holder, etag: str) -> str | None:
        """Overwrite the lease only if it is still the one with etag; the new ETag, or None."""
        data = json_bytes(doc)
        if self.conditional:
            try:
                return str(self.fs.pipe_file(self.path, data, IfMatch=etag)["ETag"])
            except FileNotFoundError:
                return None
            except OSError as exc:
                if _condition_failed(exc):
                    return None
                raise
        current = self._read()
        if current is None or current[1] != etag:
            return None
        return self._write_and_check(doc)

    def _write_and_check(self, doc: Holder) -> str | None:
        write_fs(self.fs, self.path, json_bytes(doc))
        time.sleep(min(1.0, self.ttl_s / 20))  # give a racing writer's document time to land
        current = self._read()
        return doc.token if current is not None and current[0] == doc else None


def _condition_failed(exc: BaseException) -> bool:
    """True when the store refused a conditional request: s3fs wraps botocore's error once or
    twice (a read whose object changed under it raises FileExpired from it)."""
    cause: BaseException | None = exc
    while cause is not None:
        response: dict[str, Any] = getattr(cause, "response", None) or {}
        if response.get("Error", {}).get("Code") in _CONDITION_FAILED:
            return True
        cause = cause.__cause__
    return False


_active: set[Lease] = set()
_active_lock = threading.Lock()


@contextlib.contextmanager
def hold(
    fs: fsspec.AbstractFileSystem, root: str, url: str, scope: str | None = None
) -> Iterator[Lease]:
    """Hold the ledger at root (url) for one run, by the rule above; scope: a shard's own hold."""
    lease: Lease
    if isinstance(fs, LocalFileSystem):
        lease = LocalLease(root, url, scope)
    else:
        lease = StoreLease(fs, root, url, scope)
    lease.acquire(wait_limit())
    with _active_lock:
        _active.add(lease)
    try:
        yield lease
    finally:
        with _active_lock:
            _active.discard(lease)
        lease.release()


def lost(url: str) -> Lease | None:
    """A lease this process held on the ledger at url and can no longer vouch for, if any."""
    with _active_lock:
        return next((x for x in _active if x.url == url and not x.valid), None)
