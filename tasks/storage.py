"""Files that appear complete or not at all, on local disk or any fsspec URL, and their hashes.

The one home of atomic writes: every stage writes through here, so a reader (a rerun, a user, a
sweep after a crash) never sees half a file at a final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

# Object stores make an object visible only once its upload completes (a single PUT, or the final
# CompleteMultipartUpload for large files), so a direct put is already atomic there.
ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oci", "memory"})
# Temp files carry the writer's pid, so a later run can tell a dead writer's leftovers apart.
_TEMP = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{32}$")


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a local file."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def temp_path(dest: str | Path) -> Path:
    """A unique hidden temp name beside dest, marked with this process's pid."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex}")


@contextlib.contextmanager
def writing(dest: str | Path) -> Iterator[Path]:
    """Yield a temp path to write dest's content to; on success it is fsynced and renamed onto
    dest (atomic on POSIX within a folder), on failure removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # a crash after the rename never exposes a hole
        os.replace(tmp, dest)
    except OSError as exc:  # PyAV's own errors are OSErrors too
        if exc.errno != errno.ENOSPC:
            raise
        raise OSError(
            errno.ENOSPC,
            f"work dir is full: no space left on device writing {dest.name}; the partial file "
            "was removed (free space and rerun: what was rendered and paid for is kept)",
            str(dest),
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_local(dest: str | Path, source: bytes | str | Path) -> Path:
    """Write bytes, or a copy of a local file, to dest atomically."""
    with writing(dest) as tmp:
        if isinstance(source, bytes):
            tmp.write_bytes(source)
        else:
            shutil.copyfile(source, tmp)
    return Path(dest)


def write_url(
    url: str, source: bytes | str | Path, storage_options: Mapping[str, Any] | None = None
) -> str:
    """Write bytes, or a local file, to any fsspec URL atomically; return the written URL."""
    fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return write_fs(fs, path, source)


def write_fs(fs: fsspec.AbstractFileSystem, path: str, source: bytes | str | Path) -> str:
    """Write bytes, or a local file, to path on an open filesystem atomically; return its URL."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if isinstance(fs, LocalFileSystem):
        write_local(path, source)
    elif protocols & ATOMIC_PUT_PROTOCOLS:
        _put(fs, path, source)
    else:  # other filesystems (sftp, smb, ...): upload beside the final name, then rename
        tmp = str(temp_path(path))
        _put(fs, tmp, source)
        fs.mv(tmp, path)
    return str(fs.unstrip_protocol(path))


def _put(fs: fsspec.AbstractFileSystem, path: str, source: bytes | str | Path) -> None:
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(source, bytes):
        fs.pipe_file(path, source)
    else:
        fs.put_file(str(source), path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp_files(folder: str | Path, recursive: bool = True) -> list[str]:
    """Delete the temp files that writers which have since died left under a local folder."""
    root = Path(folder)
    if not root.is_dir():
        return []
    swept = []
    for path in root.rglob(".*") if recursive else root.glob(".*"):
        match = _TEMP.match(path.name)
        if match and path.is_file() and not _pid_alive(int(match[1])):
            path.unlink(missing_ok=True)
            swept.append(str(path))
    return swept
