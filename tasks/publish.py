"""Publish stage: write videos, sidecars and results.parquet atomically to any fsspec target.

A file appears at its final name only when complete. S3 endpoints and credentials come from the
environment (botocore reads AWS_ENDPOINT_URL / AWS_*; fsspec reads FSSPEC_S3_* when it is imported)
or from an explicit storage_options dict. Names are checked so nothing lands outside the target.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.exceptions
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from avatarflow.tasks import progress
from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.captions import RowCaptions
from avatarflow.tasks.config import CAPTIONS_GATE, BatchConfig
from avatarflow.tasks.ledger import SPEECH, Ledger
from avatarflow.tasks.manifest import ID_PATTERN
from avatarflow.tasks.qc import GATES
from avatarflow.tasks.records import (
    ChunkVideo,
    GateResult,
    QCReport,
    Recognised,
    RowFinished,
    RowPlan,
    RowResult,
    RunAction,
    Sidecar,
    SidecarAudio,
    SidecarCaptions,
    SidecarChunk,
    SidecarInputs,
    SidecarRerender,
    Timings,
    from_json,
    json_bytes,
)
from avatarflow.tasks.redact import option_secrets, public_url, redact
from avatarflow.tasks.storage import write_url

# Errors that retrying cannot fix: the bucket/path is missing or access is denied.
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
TRANSIENT_ERRORS = (
    OSError,  # includes ConnectionError, TimeoutError and s3fs's translation of 5xx/SlowDown
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
)

# A paid video that failed QC is kept here, under the target, for a person to judge.
REJECTED_DIR = "_rejected"


def _qc_fields() -> list[pa.Field]:
    """The QC columns of every row, whatever was skipped: those of a report with every gate."""
    names = (*GATES, CAPTIONS_GATE)
    every_gate = QCReport(False, gates=tuple(GateResult(name, "skipped") for name in names))
    fields = []
    for name in every_gate.to_columns():
        if name.endswith("_passed"):
            fields.append(pa.field(name, pa.bool_()))
        elif name.endswith("_status"):
            fields.append(pa.field(name, pa.string()))
        else:  # a measured value, threshold or extra measure
            fields.append(pa.field(name, pa.float64()))
    return fields


QC_FIELDS = _qc_fields()
# --backend auto: RowRoute's fields, null for rows of other runs (see docs/routing.md).
ROUTE_FIELDS = [
    pa.field("route_reason", pa.string()),
    pa.field("route_predicted_finish_at", pa.timestamp("us", tz="UTC")),
    pa.field("route_deadline_at", pa.timestamp("us", tz="UTC")),
    pa.field("route_misses_deadline", pa.bool_()),
    pa.field("route_started_at", pa.timestamp("us", tz="UTC")),
    pa.field("route_finished_at", pa.timestamp("us", tz="UTC")),
]
RESULTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),  # published | failed | rejected: the row's state after this run
        ("video_url", pa.string()),
        ("sidecar_url", pa.string()),
        ("duration_s", pa.float64()),
        ("segments", pa.int64()),
        ("cost_usd", pa.float64()),  # paid for the row across every run
        ("error", pa.string()),
        ("run_action", pa.string()),  # rendered | reused | skipped | failed: what this run did
        ("billable_units", pa.float64()),  # received for the row across every run
        ("first_published_at", pa.timestamp("us", tz="UTC")),
        ("backend", pa.string()),  # the backend that rendered the published video
        *ROUTE_FIELDS,
        *QC_FIELDS,
        ("captions", pa.string()),  # the captions' text, when the row has captions
        ("captions_vtt_url", pa.string()),
        ("captions_srt_url", pa.string()),
    ]
)
_QC_NAMES = frozenset(f.name for f in QC_FIELDS)
_ROUTE_NAMES = {f.name: f.name.removeprefix("route_") for f in ROUTE_FIELDS}


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


def rejected_target(target_url: str) -> str:
    """The fixed folder for rejected videos under the target; names in it go through safe_join."""
    return safe_join(target_url, REJECTED_DIR)


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
        if field.name in _QC_NAMES:  # rows without a QC verdict (failed) leave them null
            values = [r.qc.get(field.name) for r in results]
        elif field.name in _ROUTE_NAMES:
            key = _ROUTE_NAMES[field.name]
            values = [getattr(r.route, key) if r.route else None for r in results]
        else:
            values = [getattr(r, field.name) for r in results]
        arrays.append(pa.array(values, type=field.type))
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
    chunk_qc: Sequence[QCReport],
    qc: QCReport,
    backend: str,
    model: str,
    rerender: SidecarRerender | None = None,
    captions: SidecarCaptions | None = None,
) -> Sidecar:
    """Describe how a video was made: inputs and hashes, model, requests, cost, timings, QC.

    chunk_qc holds each chunk's checks (in the order of chunks), qc the final video's."""
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
        chunks=tuple(
            _chunk_entry(plan, video, check) for video, check in zip(chunks, chunk_qc, strict=True)
        ),
        request_ids=tuple(c.request_id for c in chunks if c.request_id),
        timings=timings,
        billable_units=sum(c.billable_units for c in chunks),
        cost_usd=round(sum(c.cost_usd for c in chunks), 6),
        estimated_cost_usd=plan.estimated_cost_usd,
        qc=qc,
        rerender=rerender,
        route=plan.route,
        captions=captions,
    )


def _chunk_entry(plan: RowPlan, video: ChunkVideo, qc: QCReport) -> SidecarChunk:
    """One chunk's span, render metadata, hash and checks for the sidecar."""
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
        qc=qc,
        worker=video.worker,
        model_load=video.model_load,
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


def publish_row(
    plan: RowPlan,
    video_path: str,
    videos: list[ChunkVideo],
    chunk_qc: list[QCReport],
    final: QCReport,
    config: BatchConfig,
    run_action: RunAction = "rendered",
    rerender: SidecarRerender | None = None,
    captions: RowCaptions | None = None,
) -> RowResult:
    """Publish a checked video, its captions and its sidecar: at <id>.mp4 (recorded in the
    ledger) when it passed, else under _rejected/ for a person to judge.

    plan is the render the video came from; for a re-render the ledger records the row under its
    first input hash (the manifest's), so a rerun of the same manifest finds it published.
    """
    if not final.passed:
        return keep_rejected(
            plan,
            video_path,
            videos,
            chunk_qc,
            final,
            config,
            run_action,
            rerender,
            captions=captions,
        )
    result = _publish_video(
        plan, video_path, videos, chunk_qc, final, config, run_action, rerender, captions
    )
    ledger = Ledger.for_run(config)
    prior = ledger.published(plan.row.id)
    first = prior.result.first_published_at if prior else None
    result = dataclasses.replace(
        result, qc=final.to_columns(), first_published_at=first or datetime.now(UTC)
    )
    first_hash = rerender.first_input_hash if rerender else plan.input_hash
    ledger.record_published(result, first_hash, captions.record.key if captions else None)
    progress.emit(RowFinished(plan.row.id, result.status))
    return result


def keep_rejected(
    plan: RowPlan,
    video_path: str,
    videos: list[ChunkVideo],
    chunk_qc: list[QCReport],
    final: QCReport | None,
    config: BatchConfig,
    run_action: RunAction = "rendered",
    rerender: SidecarRerender | None = None,
    reason: str | None = None,
    captions: RowCaptions | None = None,
) -> RowResult:
    """Keep a paid video that is not published under _rejected/<id>.mp4, with its sidecar and
    cost, for a person to judge and for the next run to re-check without paying.

    reason: the error of a stage after rendering (QC that raised, a thumbnail, the publish); None
    when the video failed its checks (final says why).
    """
    qc = final or QCReport(False)
    if reason is not None:
        qc = qc.with_reason(reason)
    result = _publish_video(
        plan, video_path, videos, chunk_qc, qc, config, run_action, rerender, captions
    )
    error = reason or "QC: " + "; ".join(qc.reasons)
    result = dataclasses.replace(result, error=error, qc=final.to_columns() if final else {})
    progress.emit(RowFinished(plan.row.id, result.status))
    return result


def _publish_video(
    plan: RowPlan,
    video_path: str,
    videos: list[ChunkVideo],
    chunk_qc: list[QCReport],
    qc: QCReport,
    config: BatchConfig,
    run_action: RunAction,
    rerender: SidecarRerender | None,
    captions: RowCaptions | None = None,
) -> RowResult:
    """Publish a video, its caption files and its sidecar, at the target when its QC passed,
    else under _rejected/; the row's result, as published."""
    row = plan.row
    model = renderer_class(config.backend).model_name(config)
    record = captions.record if captions else None
    sidecar = build_sidecar(plan, videos, chunk_qc, qc, config.backend, model, rerender, record)
    target = config.target if qc.passed else rejected_target(config.target)
    # Captions, video, then sidecar: a row whose video is there has its captions too. On an
    # error finish_row says the chunks are kept (a rerun is free).
    caption_urls = {
        kind: publish_file(path, target, f"{row.id}.{kind}")
        for kind, path in (captions.files if captions else {}).items()
    }
    video_url = publish_file(video_path, target, f"{row.id}.mp4")
    sidecar_url = publish_bytes(json_bytes(sidecar), target, f"{row.id}.json")
    return RowResult(
        id=row.id,
        status="published" if qc.passed else "rejected",
        video_url=video_url,
        sidecar_url=sidecar_url,
        duration_s=plan.audio.duration_s,
        segments=plan.num_segments,
        cost_usd=sidecar.cost_usd,
        extra=row.extra,
        run_action=run_action,
        billable_units=sidecar.billable_units,
        backend=config.backend,
        route=plan.route,
        captions=captions.text if captions else None,
        captions_vtt_url=caption_urls.get("vtt"),
        captions_srt_url=caption_urls.get("srt"),
    )


def paid_per_row(ledger: Ledger) -> dict[str, tuple[float, float]]:
    """(billable units, USD) of every chunk and speech recognition the ledger holds, per row id,
    over all input hashes."""
    paths = ledger.fs.glob(f"{ledger.root}/rows/*/*/chunk-*.done.json")
    paths += ledger.fs.glob(f"{ledger.root}/rows/*/*/{SPEECH}.done.json")
    totals: dict[str, tuple[float, float]] = {}
    if not paths:
        return totals
    # One listing, then the documents in one batch (concurrent reads on object stores).
    for path, data in ledger.fs.cat(paths, on_error="omit").items():
        try:
            paid: ChunkVideo | Recognised
            if path.endswith(f"/{SPEECH}.done.json"):
                paid = from_json(Recognised, json.loads(data))
            else:
                paid = from_json(ChunkVideo, json.loads(data))
        except ValueError:  # a torn write: not a finished chunk
            continue
        row_id = path.split("/")[-3]
        units, usd = totals.get(row_id, (0.0, 0.0))
        totals[row_id] = (units + paid.billable_units, usd + paid.cost_usd)
    return totals


def settle_results(results: Sequence[RowResult], config: BatchConfig) -> list[RowResult]:
    """Fill in what the ledger remembers across runs: what was paid for each row (failed and
    rejected rows too) and when it was first published.

    Only rows whose id is valid and unique in the manifest are looked up: a refused duplicate or
    an invalid id names no row of the ledger for sure.
    """
    ledger = Ledger.for_run(config)
    uses = Counter(r.id.casefold() for r in results)
    paid = paid_per_row(ledger)
    settled = []
    for result in results:
        if uses[result.id.casefold()] > 1 or not re.fullmatch(ID_PATTERN, result.id):
            settled.append(result)
            continue
        units, usd = paid.get(result.id, (0.0, 0.0))
        first = result.first_published_at
        if first is None and (prior := ledger.published(result.id)) is not None:
            first = prior.result.first_published_at
        settled.append(
            dataclasses.replace(
                result,
                cost_usd=round(usd, 6),
                billable_units=round(units, 6),
                first_published_at=first,
            )
        )
    return settled


def publish_results(
    results: Sequence[RowResult], passthrough_schema: pa.Schema | None, config: BatchConfig
) -> str:
    """Write the batch's results table (results.parquet) to the target."""
    return write_results(results, passthrough_schema, config.target, name=config.results_name)
