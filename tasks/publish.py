"""Publish stage: write videos, sidecars and results.parquet atomically to any fsspec target.

A file appears at its final name only when complete. S3 endpoints and credentials come from the
environment (botocore reads AWS_ENDPOINT_URL / AWS_*; fsspec reads FSSPEC_S3_* when it is imported)
or from an explicit storage_options dict. Names are checked so nothing lands outside the target.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import botocore.exceptions
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks import progress
from tasks.backends import renderer_class
from tasks.config import BatchConfig
from tasks.ledger import Ledger
from tasks.records import (
    ChunkVideo,
    RowFinished,
    RowPlan,
    RowResult,
    Sidecar,
    SidecarAudio,
    SidecarChunk,
    SidecarInputs,
    SidecarQC,
    Timings,
    Verdict,
    json_bytes,
)
from tasks.redact import option_secrets, public_url, redact
from tasks.storage import write_url

# Errors that retrying cannot fix: the bucket/path is missing or access is denied.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_ERRORS = (
    OSError,  # includes ConnectionError, TimeoutError and s3fs's translation of 5xx/SlowDown
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)

RESULTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("video_url", pa.string()),
        ("sidecar_url", pa.string()),
        ("duration_s", pa.float64()),
        ("segments", pa.int64()),
        ("cost_usd", pa.float64()),
        ("error", pa.string()),
    ]
)


class PublishError(RuntimeError):
    """Writing to the target failed (after retries for transient errors); names the URL only."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a transient storage error."""

    attempts: int = 4
    backoff_s: float = 0.5  # doubled after each failed attempt
    max_backoff_s: float = 8.0


def safe_join(target_url: str, name: str) -> str:
    """Join a bare file name onto the target URL, refusing any name that could escape it."""
    if not target_url or not target_url.strip():
        raise ValueError("target URL is empty")
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise ValueError(f"refusing output name {name!r}: empty or a directory reference")
    bad = [c for c in ("/", "\\", ":", "\0") if c in name]
    if bad or any(ord(c) < 32 for c in name) or name.startswith("~"):
        raise ValueError(f"refusing output name {name!r}: it must be a plain file name")
    return target_url.rstrip("/") + "/" + name


def publish_file(
    local_path: str | Path,
    target_url: str,
    name: str,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> str:
    """Copy a local file to target_url/name atomically and return its URL."""
    return _publish(str(local_path), target_url, name, storage_options, retry)


def publish_bytes(
    data: bytes,
    target_url: str,
    name: str,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> str:
    """Write bytes to target_url/name atomically and return its URL."""
    return _publish(data, target_url, name, storage_options, retry)


def is_published(
    target_url: str, name: str, storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Return whether target_url/name exists (complete, since publishing is atomic)."""
    fs, path = fsspec.core.url_to_fs(safe_join(target_url, name), **dict(storage_options or {}))
    return bool(fs.exists(path))


def results_table(results: Sequence[RowResult], passthrough_schema: pa.Schema | None) -> pa.Table:
    """Build the results table: fixed columns, then the manifest's passthrough columns as typed."""
    fields, arrays = list(RESULTS_SCHEMA), []
    for field in RESULTS_SCHEMA:
        arrays.append(pa.array([getattr(r, field.name) for r in results], type=field.type))
    for field in passthrough_schema or []:
        # A passthrough column named like one of ours keeps its data under a prefixed name.
        name = f"input_{field.name}" if field.name in RESULTS_SCHEMA.names else field.name
        fields.append(field.with_name(name))
        arrays.append(pa.array([r.extra.get(field.name) for r in results], type=field.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_results(
    results: Sequence[RowResult],
    passthrough_schema: pa.Schema | None,
    target_url: str,
    storage_options: Mapping[str, Any] | None = None,
    retry: RetryPolicy = RetryPolicy(),
    name: str = "results.parquet",
) -> str:
    """Write the results table (one row per manifest row) atomically and return its URL."""
    data = parquet_bytes(results_table(results, passthrough_schema))
    return publish_bytes(data, target_url, name, storage_options, retry)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialise a table as Parquet in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def build_sidecar(
    plan: RowPlan,
    chunks: Sequence[ChunkVideo],
    qc: SidecarQC,
    backend: str,
    model: str,
) -> Sidecar:
    """Describe how a video was made: inputs and hashes, model, requests, cost, timings, QC."""
    row, audio = plan.row, plan.audio
    timings = sum((c.timings for c in chunks), Timings())
    return Sidecar(
        id=row.id,
        inputs=SidecarInputs(
            audio=SidecarAudio(
                source=public_url(audio.source),
                sha256=audio.sha256,
                duration_s=audio.duration_s,
                sample_rate_hz=audio.sample_rate_hz,
                channels=audio.channels,
                codec=audio.codec,
            ),
            image=public_url(row.image) if row.image else None,
            image_sha256=plan.image_sha256,
            input_hash=plan.input_hash,
        ),
        parameters=row.params,
        num_segments_override=row.num_segments,
        model=model,
        backend=backend,
        seed=plan.seed,
        segments=plan.num_segments,
        chunks=tuple(_chunk_entry(plan, video) for video in chunks),
        request_ids=tuple(c.request_id for c in chunks if c.request_id),
        timings=timings,
        billable_units=sum(c.billable_units for c in chunks),
        cost_usd=round(sum(c.cost_usd for c in chunks), 6),
        estimated_cost_usd=plan.estimated_cost_usd,
        qc=qc,
    )


def _chunk_entry(plan: RowPlan, video: ChunkVideo) -> SidecarChunk:
    """One chunk's span, render metadata and hash for the sidecar."""
    chunk = plan.chunks[video.chunk_index]
    return SidecarChunk(
        index=video.chunk_index,
        start_s=chunk.start_s,
        end_s=chunk.end_s,
        num_segments=chunk.num_segments,
        num_frames=chunk.num_frames,
        sha256=video.sha256,
        request_id=video.request_id,
        seed=video.seed,
        billable_units=video.billable_units,
        cost_usd=video.cost_usd,
        timings=video.timings,
    )


def _publish(
    source: str | bytes,
    target_url: str,
    name: str,
    storage_options: Mapping[str, Any] | None,
    retry: RetryPolicy,
) -> str:
    """Write source (a local path or bytes) to target_url/name, retrying transient errors."""
    url = safe_join(target_url, name)
    options = dict(storage_options or {})
    attempt = 0
    while True:
        attempt += 1
        try:
            return write_url(url, source, options)
        except PERMANENT_ERRORS as exc:
            raise _publish_error(url, attempt, exc, options) from None
        except TRANSIENT_ERRORS as exc:
            if attempt >= retry.attempts:
                raise _publish_error(url, attempt, exc, options) from None
            time.sleep(min(retry.backoff_s * 2 ** (attempt - 1), retry.max_backoff_s))


def _publish_error(
    url: str, attempts: int, exc: BaseException, options: Mapping[str, Any]
) -> PublishError:
    """A PublishError naming the URL and the cause, with every known secret blanked out."""
    text = f"could not publish {public_url(url)} ({attempts} attempts): {type(exc).__name__}: {exc}"
    return PublishError(redact(text, option_secrets(options)))


def _publish_outputs(
    row_id: str, video_path: str, sidecar: Sidecar, target: str
) -> tuple[str, str]:
    """Publish a row's video, then its sidecar; return both URLs."""
    try:
        video_url = publish_file(video_path, target, f"{row_id}.mp4")
        sidecar_url = publish_bytes(json_bytes(sidecar), target, f"{row_id}.json")
    except PublishError as exc:
        # Rendered chunks are in the run's ledger by now: tell the user a rerun costs nothing.
        raise PublishError(
            f"{exc}; the rendered chunks are kept, so a rerun publishes without paying again"
        ) from None
    return video_url, sidecar_url


@task(name="publish-row")
def publish_row(
    plan: RowPlan,
    video_path: str,
    videos: list[ChunkVideo],
    verdicts: list[Verdict],
    final: Verdict,
    config: BatchConfig,
) -> RowResult:
    """Publish a checked video and its sidecar, then record it in the ledger."""
    row = plan.row
    model = renderer_class(config.backend).model_name(config)
    qc = SidecarQC(chunks=tuple(verdicts), final=final)
    sidecar = build_sidecar(plan, videos, qc, config.backend, model)
    video_url, sidecar_url = _publish_outputs(row.id, video_path, sidecar, config.target)
    result = RowResult(
        id=row.id,
        status="published",
        video_url=video_url,
        sidecar_url=sidecar_url,
        duration_s=plan.audio.duration_s,
        segments=plan.num_segments,
        cost_usd=sidecar.cost_usd,
        extra=row.extra,
    )
    Ledger.for_run(config).record_published(result, plan.input_hash)
    progress.emit(RowFinished(row.id, "published"))
    return result


def publish_results(
    results: Sequence[RowResult], passthrough_schema: pa.Schema | None, config: BatchConfig
) -> str:
    """Write the batch's results table (results.parquet) to the target."""
    return write_results(results, passthrough_schema, config.target, name=config.results_name)
