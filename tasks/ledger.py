"""Run ledger: durable per-row, per-chunk state beside the target; reruns resume, never pay twice.

Layout under the state URL (default <target>/.avatarflow), one small JSON document per fact so that
concurrent writers never share a file:
    rows/<id>/<input_hash>/chunk-<k>.attempt.json   written immediately before a paid submit
    rows/<id>/<input_hash>/chunk-<k>.request.json   the request id, once submit returned
    rows/<id>/<input_hash>/chunk-<k>.done.json      the rendered chunk (sha256) once downloaded
    rows/<id>/<input_hash>/chunk-<k>.mp4            a copy of the rendered chunk, for reuse
    rows/<id>/<input_hash>/speech.attempt.json      the same for the row's paid speech recognition
    rows/<id>/<input_hash>/speech.request.json      (key SPEECH in place of a chunk index)
    rows/<id>/<input_hash>/speech.done.json         the recognised words (tasks/speech.py)
    rows/<id>/published.json                        what was published, with its input hash
A changed input (audio, image, prompt, parameters) changes input_hash, so stale chunks are ignored.

Lifecycle of a paid chunk: attempt n → request (answering attempt n) → done. An attempt whose number
no request answers is an *ambiguous* submit: the POST may or may not have reached fal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
import pydantic
from fsspec.implementations.local import LocalFileSystem

from avatarflow.tasks import lease
from avatarflow.tasks.lease import LedgerBusyError
from avatarflow.tasks.records import (
    Attempt,
    ChunkVideo,
    Published,
    Recognised,
    Request,
    RowResult,
    RowRoute,
    from_json,
    json_bytes,
)
from avatarflow.tasks.storage import sha256_file, sweep_temp_files, write_fs, write_local
from avatarflow.tasks.workdir import WorkDir

if TYPE_CHECKING:
    from avatarflow.tasks.config import BatchConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
# The key of a row's speech recognition request where chunk methods take a chunk index.
SPEECH = "speech"
ChunkKey = int | str  # a chunk index, or SPEECH


@dataclass(frozen=True)
class ChunkRecord:
    """What the ledger knows about one chunk's paid request."""

    row_id: str
    input_hash: str
    chunk: ChunkKey
    attempt: Attempt | None
    request: Request | None
    done: bool

    @property
    def ambiguous(self) -> bool:
        """True when the latest submit was sent (maybe) but its request id was never recorded."""
        if self.attempt is None or self.done:
            return False
        answered = self.request.attempt if self.request else 0
        return self.attempt.n > answered

    @property
    def request_id(self) -> str | None:
        """The recorded request id, unless a later ambiguous attempt superseded it."""
        if self.request is None or self.ambiguous:
            return None
        return self.request.request_id


class Ledger:
    """Durable run state on any fsspec URL."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        journal_dir: str | Path | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = self.root.rstrip("/")
        # A local copy of every request id: a paid request must survive the state store being
        # unreachable at the moment fal answers (e.g. an S3 target that is briefly down).
        self.journal = Path(journal_dir) if journal_dir else None
        self._attempts: dict[
            tuple[str, str, ChunkKey], int
        ] = {}  # attempt numbers sent by this process

    @classmethod
    def for_run(cls, config: BatchConfig) -> Ledger:
        """The ledger of a run, with its local request journal in the run's work dir."""
        journal = WorkDir(config.work_path).journal(config.state_url)
        return cls(config.state_url, journal_dir=journal)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _chunk_path(self, row_id: str, input_hash: str, chunk: ChunkKey, suffix: str) -> str:
        stem = f"chunk-{chunk}" if isinstance(chunk, int) else chunk
        return self._path("rows", row_id, input_hash[:24], f"{stem}.{suffix}")

    def read(self, path: str, kind: type[T]) -> T | None:
        """The document of `kind` at path, or None when it does not exist or is unreadable."""
        try:
            with self.fs.open(path, "rb") as f:
                return from_json(kind, json.loads(f.read()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, pydantic.ValidationError):
            return None  # a torn write from a killed process is the same as no record

    def write(self, path: str, doc: Any) -> None:
        """Write a record as JSON so that readers see either the old or the complete new one."""
        write_fs(self.fs, path, json_bytes(doc))

    @contextlib.contextmanager
    def lock(self, scope: str | None = None) -> Iterator[lease.Lease]:
        """Hold the ledger for one run: a second run on this target waits, then refuses
        (tasks.lease has the rule, the same on local folders and object stores).

        scope: a shard of a sharded run, whose rows no other shard has: shards hold only
        themselves and run side by side on one ledger.
        """
        with lease.hold(self.fs, self.root, self.url, scope) as held:
            yield held

    def sweep_temp_files(self, *outputs: str) -> list[str]:
        """Delete what killed writers left in a local ledger and in local output folders (the
        target, its _rejected/; call it while holding lock(), so no other run is writing)."""
        swept = sweep_temp_files(self.root) if self.is_local else []
        for url in outputs:
            fs, folder = fsspec.core.url_to_fs(url)
            if isinstance(fs, LocalFileSystem):
                swept += sweep_temp_files(folder, recursive=False)
        return swept

    # --- paid requests -------------------------------------------------------------------------

    def chunk(self, row_id: str, input_hash: str, chunk: ChunkKey) -> ChunkRecord:
        """Everything recorded about one chunk's paid request."""
        return ChunkRecord(
            row_id,
            input_hash,
            chunk,
            attempt=self.attempt(row_id, input_hash, chunk),
            request=self.request(row_id, input_hash, chunk),
            done=self.fs.exists(self._chunk_path(row_id, input_hash, chunk, "done.json")),
        )

    def record_attempt(self, row_id: str, input_hash: str, chunk: ChunkKey, endpoint: str) -> int:
        """Note that a paid submit is about to be sent; return its attempt number."""
        lost = lease.lost(self.url)
        if lost is not None:  # another run may hold the target now: it could pay for this chunk
            raise LedgerBusyError(f"this run no longer holds {lost.target}; not submitting")
        previous = self.attempt(row_id, input_hash, chunk)
        n = previous.n + 1 if previous else 1
        path = self._chunk_path(row_id, input_hash, chunk, "attempt.json")
        self.write(path, Attempt(endpoint, n, time.time()))
        self._attempts[(row_id, input_hash, chunk)] = n
        return n

    def attempt(self, row_id: str, input_hash: str, chunk: ChunkKey) -> Attempt | None:
        """The latest attempt record of a chunk, or None."""
        return self.read(self._chunk_path(row_id, input_hash, chunk, "attempt.json"), Attempt)

    def record_request(
        self, row_id: str, input_hash: str, chunk: ChunkKey, request_id: str, endpoint: str
    ) -> None:
        """Record a submitted request id (answering the latest attempt) before it is waited on."""
        # Known locally when this process sent the attempt: no read that a down store would fail.
        n = self._attempts.get((row_id, input_hash, chunk))
        if n is None:
            attempt = self.attempt(row_id, input_hash, chunk)
            n = attempt.n if attempt else 1
        try:
            earlier = self.request(row_id, input_hash, chunk)
        except Exception:  # the audit trail is best effort; the new id is what matters
            earlier = None
        replaced = (*earlier.replaced, earlier.request_id) if earlier else ()
        doc = Request(request_id, endpoint, n, time.time(), replaced)
        path = self._chunk_path(row_id, input_hash, chunk, "request.json")
        if self.journal is not None:
            write_local(self._journal_path(path), json_bytes(doc))
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

    def request(self, row_id: str, input_hash: str, chunk: ChunkKey) -> Request | None:
        """The chunk's recorded request (from the state store, else the local journal), or None."""
        path = self._chunk_path(row_id, input_hash, chunk, "request.json")
        doc = self.read(path, Request)
        if doc is None and self.journal is not None and self._journal_path(path).exists():
            with contextlib.suppress(json.JSONDecodeError, pydantic.ValidationError):
                doc = from_json(Request, json.loads(self._journal_path(path).read_text()))
        return doc

    def in_flight(self) -> list[ChunkRecord]:
        """Every chunk with a recorded or ambiguous request and no rendered result yet."""
        keys = set()
        for suffix in ("attempt", "request"):
            for path in self.fs.glob(self._path("rows", "*", "*", f"chunk-*.{suffix}.json")):
                row_id, short_hash, name = path.split("/")[-3:]
                keys.add((row_id, short_hash, int(name.split(".")[0].removeprefix("chunk-"))))
        records = (self.chunk(*key) for key in sorted(keys))
        return [record for record in records if not record.done]

    # --- rendered chunks -----------------------------------------------------------------------

    def record_chunk(self, video: ChunkVideo, input_hash: str) -> None:
        """Keep a copy of a rendered chunk and its metadata so any later run can reuse it."""
        mp4 = self._chunk_path(video.row_id, input_hash, video.chunk_index, "mp4")
        write_fs(self.fs, mp4, video.path)
        self.write(
            self._chunk_path(video.row_id, input_hash, video.chunk_index, "done.json"), video
        )

    def rendered_chunk(
        self, row_id: str, input_hash: str, chunk: int, local_dir: Path
    ) -> ChunkVideo | None:
        """Return a previously rendered chunk, copied to local_dir and sha-checked, or None."""
        done = self.read(self._chunk_path(row_id, input_hash, chunk, "done.json"), ChunkVideo)
        if done is None:
            return None
        local = local_dir / Path(done.path).name
        if not (local.exists() and sha256_file(local) == done.sha256):
            local_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._chunk_path(row_id, input_hash, chunk, "mp4"), str(local))
            except FileNotFoundError:
                return None
            if sha256_file(local) != done.sha256:
                return None
        return dataclasses.replace(done, path=str(local))

    # --- recognised speech ---------------------------------------------------------------------

    def record_recognised(self, row_id: str, input_hash: str, recognised: Recognised) -> None:
        """Keep a row's recognised words, so no later run recognises (or pays for) them again."""
        self.write(self._chunk_path(row_id, input_hash, SPEECH, "done.json"), recognised)

    def recognised(self, row_id: str, input_hash: str) -> Recognised | None:
        """The row's recognised words for these inputs, or None."""
        return self.read(self._chunk_path(row_id, input_hash, SPEECH, "done.json"), Recognised)

    def recognitions(self, row_id: str) -> list[Recognised]:
        """Every recognised narration of a row, over all its input hashes."""
        paths = self.fs.glob(self._path("rows", row_id, "*", f"{SPEECH}.done.json"))
        found = (self.read(path, Recognised) for path in sorted(paths))
        return [doc for doc in found if doc is not None]

    # --- routed rows (--backend auto) ---------------------------------------------------------

    def record_route(self, row_id: str, input_hash: str, route: RowRoute) -> None:
        """Record where a row renders, before it does: a rerun keeps it (never both backends)."""
        self.write(self._path("rows", row_id, input_hash[:24], "route.json"), route)

    def route(self, row_id: str, input_hash: str) -> RowRoute | None:
        """Where an earlier run routed the row with these inputs, or None."""
        return self.read(self._path("rows", row_id, input_hash[:24], "route.json"), RowRoute)

    # --- published rows ------------------------------------------------------------------------

    def record_published(
        self, result: RowResult, input_hash: str, captions_key: str | None = None
    ) -> None:
        """Record that a row was published from inputs with this hash (and captions made from
        what captions_key hashes, if any)."""
        published = Published(result, input_hash, captions_key)
        self.write(self._path("rows", result.id, "published.json"), published)

    def published(self, row_id: str) -> Published | None:
        """What was last published for a row, or None."""
        return self.read(self._path("rows", row_id, "published.json"), Published)

    @staticmethod
    def exists(url: str) -> bool:
        """True when the file at url (any fsspec URL) exists."""
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
