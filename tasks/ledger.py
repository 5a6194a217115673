"""Run ledger: durable per-row, per-chunk state beside the target; reruns resume, never pay twice.

Layout under the state URL (default <target>/.avatarflow), one small JSON document per fact so that
concurrent writers never share a file:
    rows/<id>/<input_hash>/chunk-<k>.attempt.json   written immediately before a paid submit
    rows/<id>/<input_hash>/chunk-<k>.request.json   the request id, once submit returned
    rows/<id>/<input_hash>/chunk-<k>.done.json      the rendered chunk (sha256) once downloaded
    rows/<id>/<input_hash>/chunk-<k>.mp4            a copy of the rendered chunk, for reuse
    rows/<id>/published.json                        what was published, with its input hash
A changed input (audio, image, prompt, parameters) changes input_hash, so stale chunks are ignored.

Lifecycle of a paid chunk: attempt n → request (answering attempt n) → done. An attempt whose number
no request answers is an *ambiguous* submit: the POST may or may not have reached fal.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.records import ChunkVideo, to_dict

if TYPE_CHECKING:
    from flows.settings import BatchConfig

log = logging.getLogger(__name__)

# Temp files carry the writer's pid, so a later run can tell a dead writer's leftovers apart.
_TEMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{32}$")
# tasks/publish.py writes "<target>/.<name>.<8 hex>.part" and renames it over <name>.
_PUBLISH_TEMP = re.compile(r"^\..+\.[0-9a-f]{8}\.part$")


class LedgerBusyError(RuntimeError):
    """Another run holds this ledger: two runs on one target could both pay for a chunk."""


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ChunkRecord:
    """What the ledger knows about one chunk's paid request."""

    row_id: str
    input_hash: str
    chunk: int
    attempt: dict[str, Any] | None
    request: dict[str, Any] | None
    done: bool

    @property
    def ambiguous(self) -> bool:
        """True when the latest submit was sent (maybe) but its request id was never recorded."""
        if self.attempt is None or self.done:
            return False
        answered = self.request.get("attempt", 1) if self.request else 0
        return int(self.attempt.get("n", 1)) > answered

    @property
    def request_id(self) -> str | None:
        """The recorded request id, unless a later ambiguous attempt superseded it."""
        if self.request is None or self.ambiguous:
            return None
        return str(self.request["request_id"])


class Ledger:
    """Durable run state on any fsspec URL."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        journal_dir: str | Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        # A local copy of every request id: a paid request must survive the state store being
        # unreachable at the moment fal answers (e.g. an S3 target that is briefly down).
        self.journal = Path(journal_dir) if journal_dir else None
        self._attempts: dict[tuple[str, str, int], int] = {}  # attempt numbers sent by this process

    @classmethod
    def for_run(cls, config: BatchConfig) -> Ledger:
        """The ledger of a run, with its local request journal in the run's work dir."""
        key = hashlib.sha256(config.state_url.encode()).hexdigest()[:16]
        return cls(config.state_url, journal_dir=config.work_path / "journal" / key)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _chunk_path(self, row_id: str, input_hash: str, chunk: int, suffix: str) -> str:
        return self._path("rows", row_id, input_hash[:24], f"chunk-{chunk}.{suffix}")

    def read(self, path: str) -> dict[str, Any] | None:
        """Return the JSON document at path, or None when it does not exist (or is unreadable)."""
        try:
            with self.fs.open(path, "rb") as f:
                doc = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write from a killed process is the same as no record
        return doc if isinstance(doc, dict) else None

    def write(self, path: str, doc: dict[str, Any]) -> None:
        """Write a JSON document so that readers see either the old or the complete new one."""
        data = json.dumps(doc, sort_keys=True, default=str).encode()
        self._put(
            path, lambda tmp: Path(tmp).write_bytes(data), lambda: self.fs.pipe_file(path, data)
        )

    def _put(self, path: str, write_local, write_remote) -> None:
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        if not isinstance(self.fs, LocalFileSystem):
            write_remote()  # object-store PUTs are atomic: the key appears complete or not at all
            return
        # POSIX rename is atomic within a directory; fsync first so a crash never exposes a hole.
        tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            write_local(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the ledger for one run (local state; object stores have no locks to take)."""
        if not isinstance(self.fs, LocalFileSystem):
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        with open(f"{self.root}/run.lock", "a+") as fh:
            try:
                # Released by the kernel when the process ends, even on SIGKILL.
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerBusyError(f"another run is using the ledger at {self.url}") from None
            yield

    def sweep_temp_files(self, target: str | None = None) -> list[str]:
        """Delete what killed writers left: ledger temps of dead processes and, in the local
        target folder, publish temps (call it while holding lock(), so none is in use)."""
        if not isinstance(self.fs, LocalFileSystem):
            return []  # object-store writes are single PUTs: nothing is ever left half-written
        swept = []
        for path in self.fs.find(self.root) if self.fs.exists(self.root) else []:
            match = _TEMP.search(path)
            if match and not _pid_alive(int(match[1])):
                swept.append(path)
        fs, folder = fsspec.core.url_to_fs(target) if target else (None, "")
        if isinstance(fs, LocalFileSystem) and fs.exists(folder):
            names = (p for p in Path(folder).iterdir() if _PUBLISH_TEMP.match(p.name))
            swept += [str(p) for p in names if p.is_file()]
        for path in swept:
            Path(path).unlink(missing_ok=True)
        return swept

    # --- paid requests -------------------------------------------------------------------------

    def chunk(self, row_id: str, input_hash: str, chunk: int) -> ChunkRecord:
        """Everything recorded about one chunk's paid request."""
        return ChunkRecord(
            row_id,
            input_hash,
            chunk,
            attempt=self.read(self._chunk_path(row_id, input_hash, chunk, "attempt.json")),
            request=self.request(row_id, input_hash, chunk),
            done=self.fs.exists(self._chunk_path(row_id, input_hash, chunk, "done.json")),
        )

    def record_attempt(self, row_id: str, input_hash: str, chunk: int, endpoint: str) -> int:
        """Note that a paid submit is about to be sent; return its attempt number."""
        previous = self.attempt(row_id, input_hash, chunk)
        n = int(previous.get("n", 1)) + 1 if previous else 1
        doc = {"endpoint": endpoint, "n": n, "started_at": time.time()}
        self.write(self._chunk_path(row_id, input_hash, chunk, "attempt.json"), doc)
        self._attempts[(row_id, input_hash, chunk)] = n
        return n

    def attempt(self, row_id: str, input_hash: str, chunk: int) -> dict[str, Any] | None:
        """The latest attempt record of a chunk, or None."""
        return self.read(self._chunk_path(row_id, input_hash, chunk, "attempt.json"))

    def record_request(
        self, row_id: str, input_hash: str, chunk: int, request_id: str, endpoint: str
    ) -> None:
        """Record a submitted request id (answering the latest attempt) before it is waited on."""
        # Known locally when this process sent the attempt: no read that a down store would fail.
        n = self._attempts.get((row_id, input_hash, chunk))
        if n is None:
            attempt = self.attempt(row_id, input_hash, chunk)
            n = int(attempt.get("n", 1)) if attempt else 1
        try:
            earlier = self.request(row_id, input_hash, chunk)
        except Exception:  # the audit trail is best effort; the new id is what matters
            earlier = None
        replaced = [*earlier.get("replaced", []), earlier["request_id"]] if earlier else []
        doc = {
            "request_id": request_id,
            "endpoint": endpoint,
            "attempt": n,
            "replaced": replaced,  # earlier ids of this chunk (expired or failed), for audit
            "submitted_at": time.time(),
        }
        path = self._chunk_path(row_id, input_hash, chunk, "request.json")
        if self.journal is not None:
            self._journal_path(path).parent.mkdir(parents=True, exist_ok=True)
            self._journal_path(path).write_text(json.dumps(doc, sort_keys=True))
        try:
            self.write(path, doc)
        except Exception as exc:
            if self.journal is None:
                raise
            # Never abandon a request fal accepted: it is journalled locally, keep waiting on it.
            log.warning(
                "row %s chunk %d: request %s kept in the local journal only (%s: %s)",
                row_id,
                chunk,
                request_id,
                type(exc).__name__,
                exc,
            )

    def _journal_path(self, path: str) -> Path:
        assert self.journal is not None
        return self.journal / path.removeprefix(self.root).lstrip("/")

    def request(self, row_id: str, input_hash: str, chunk: int) -> dict[str, Any] | None:
        """The chunk's recorded request (from the state store, else the local journal), or None."""
        path = self._chunk_path(row_id, input_hash, chunk, "request.json")
        doc = self.read(path)
        if doc is None and self.journal is not None and self._journal_path(path).exists():
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                doc = json.loads(self._journal_path(path).read_text())
        return doc

    def in_flight(self) -> list[ChunkRecord]:
        """Every chunk with a recorded or ambiguous request and no rendered result yet."""
        keys = set()
        for suffix in ("attempt", "request"):  # ledgers from before attempts only have requests
            for path in self.fs.glob(self._path("rows", "*", "*", f"chunk-*.{suffix}.json")):
                row_id, short_hash, name = path.split("/")[-3:]
                keys.add((row_id, short_hash, int(name.split(".")[0].removeprefix("chunk-"))))
        records = (self.chunk(*key) for key in sorted(keys))
        return [record for record in records if not record.done]

    # --- rendered chunks -----------------------------------------------------------------------

    def record_chunk(self, video: ChunkVideo, input_hash: str) -> None:
        """Keep a copy of a rendered chunk and its metadata so any later run can reuse it."""
        mp4 = self._chunk_path(video.row_id, input_hash, video.chunk_index, "mp4")
        self._put(
            mp4,
            lambda tmp: self.fs.put_file(video.path, tmp),
            lambda: self.fs.put_file(video.path, mp4),
        )
        done = self._chunk_path(video.row_id, input_hash, video.chunk_index, "done.json")
        self.write(done, to_dict(video))

    def rendered_chunk(
        self, row_id: str, input_hash: str, chunk: int, local_dir: Path
    ) -> ChunkVideo | None:
        """Return a previously rendered chunk, copied to local_dir and sha-checked, or None."""
        doc = self.read(self._chunk_path(row_id, input_hash, chunk, "done.json"))
        if doc is None:
            return None
        local = local_dir / Path(doc["path"]).name
        if not (local.exists() and sha256_file(local) == doc["sha256"]):
            local_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._chunk_path(row_id, input_hash, chunk, "mp4"), str(local))
            except FileNotFoundError:
                return None
            if sha256_file(local) != doc["sha256"]:
                return None
        return ChunkVideo(**{**doc, "path": str(local)})

    # --- published rows ------------------------------------------------------------------------

    def record_published(self, row_id: str, input_hash: str, result: dict[str, Any]) -> None:
        """Record that a row was published from inputs with this hash."""
        self.write(
            self._path("rows", row_id, "published.json"), {**result, "input_hash": input_hash}
        )

    def published(self, row_id: str) -> dict[str, Any] | None:
        """What was last published for a row, or None."""
        return self.read(self._path("rows", row_id, "published.json"))

    @staticmethod
    def exists(url: str) -> bool:
        """True when the file at url (any fsspec URL) exists."""
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
