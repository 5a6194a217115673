"""Run ledger: durable per-row, per-chunk state beside the target; reruns resume, never pay twice.

Layout under the state URL (default <target>/.avatarflow), one small JSON document per fact so that
concurrent writers never share a file:
    rows/<id>/<input_hash>/chunk-<k>.attempt.json   written just before a paid submit
    rows/<id>/<input_hash>/chunk-<k>.request.json   the request id, once submit returned
    rows/<id>/<input_hash>/chunk-<k>.done.json      the rendered chunk (sha256) once downloaded
    rows/<id>/<input_hash>/chunk-<k>.mp4            a copy of the rendered chunk, for reuse
    rows/<id>/published.json                        what was published, with its input hash
A changed input (audio, image, prompt, parameters) changes input_hash, so stale chunks are ignored.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.records import ChunkVideo, to_dict


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Ledger:
    """Durable run state on any fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _chunk_path(self, row_id: str, input_hash: str, chunk: int, suffix: str) -> str:
        return self._path("rows", row_id, input_hash[:24], f"chunk-{chunk}.{suffix}")

    def read(self, path: str) -> dict[str, Any] | None:
        """Return the JSON document at path, or None when it does not exist (or is unreadable)."""
        try:
            with self.fs.open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # a torn write from a killed process is the same as no record

    def write(self, path: str, doc: dict[str, Any]) -> None:
        """Write a JSON document so that readers see either the old or the complete new one."""
        self._put_bytes(path, json.dumps(doc, sort_keys=True, default=str).encode())

    def _put_bytes(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            # POSIX rename is atomic within a directory; object-store PUTs already are.
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    # --- paid requests -------------------------------------------------------------------------

    def record_attempt(self, row_id: str, input_hash: str, chunk: int, endpoint: str) -> None:
        """Note that a paid submit is about to be sent (so a crash mid-submit is detectable)."""
        doc = {"endpoint": endpoint, "started_at": time.time()}
        self.write(self._chunk_path(row_id, input_hash, chunk, "attempt.json"), doc)

    def attempt(self, row_id: str, input_hash: str, chunk: int) -> dict[str, Any] | None:
        return self.read(self._chunk_path(row_id, input_hash, chunk, "attempt.json"))

    def record_request(
        self, row_id: str, input_hash: str, chunk: int, request_id: str, endpoint: str
    ) -> None:
        """Record a submitted request id; written before its result is waited on."""
        doc = {"request_id": request_id, "endpoint": endpoint, "submitted_at": time.time()}
        self.write(self._chunk_path(row_id, input_hash, chunk, "request.json"), doc)

    def request(self, row_id: str, input_hash: str, chunk: int) -> dict[str, Any] | None:
        return self.read(self._chunk_path(row_id, input_hash, chunk, "request.json"))

    # --- rendered chunks -----------------------------------------------------------------------

    def record_chunk(self, video: ChunkVideo, input_hash: str) -> None:
        """Keep a copy of a rendered chunk and its metadata so any later run can reuse it."""
        mp4 = self._chunk_path(video.row_id, input_hash, video.chunk_index, "mp4")
        self.fs.makedirs(mp4.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(video.path, mp4)
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
        self.write(
            self._path("rows", row_id, "published.json"), {**result, "input_hash": input_hash}
        )

    def published(self, row_id: str) -> dict[str, Any] | None:
        return self.read(self._path("rows", row_id, "published.json"))

    @staticmethod
    def exists(url: str) -> bool:
        """True when the file at url (any fsspec URL) exists."""
        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path))
