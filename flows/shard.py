"""Large batches: shard the manifest, run each shard as a child deployment run, merge the results.

The parent validates the whole manifest (so ids are unique across shards), applies the budget to
the whole run in manifest order, and writes content-addressed shard files. Each child is an
ordinary produce_batch run on the target's one ledger, so sharded and plain runs never pay twice
between them; children lock only their own shard and run side by side. A child's idempotency key
is its shard's content (inputs included) and parameters: a rerun of the parent reuses Completed
children and reruns the others. The parent ends Failed when any row is not published, and its
results.parquet and report list every manifest row. Prefect schedules; we only split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task, unmapped
from prefect.client.schemas.objects import FlowRun, State
from prefect.deployments import run_deployment
from prefect.futures import wait
from prefect.states import Completed, Failed

from avatarflow.tasks.config import (
    BatchConfig,
    CaptionSettings,
    CaptionsMode,
    QCSettings,
    RouteSettings,
)
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.manifest import ManifestCheck, load_rows, read_manifest, resolve_location
from avatarflow.tasks.plan import Admission, prepare_row
from avatarflow.tasks.publish import parquet_bytes, publish_bytes, results_table
from avatarflow.tasks.records import Row, RowResult
from avatarflow.tasks.report import render_report
from avatarflow.tasks.route import parse_deadline
from avatarflow.tasks.stream import first_error

LOCATION_COLUMNS = ("audio", "image")
CHILD_ATTEMPTS = 5  # a rerun of the parent starts at most this many runs of one unchanged shard


@dataclass(frozen=True)
class Shard:
    """One child run's part of the manifest."""

    id: str  # content digest: the shard's rows, their inputs' fingerprints and the parameters
    url: str  # its manifest file
    row_ids: tuple[str, ...]


def _fingerprint(location: str) -> str:
    """What identifies an input's content without reading it: size and mtime / ETag."""
    try:
        fs, path = fsspec.core.url_to_fs(location)
        info = fs.info(path)
    except (OSError, ValueError):
        return "unreadable"
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size')}:{stamp}"


def write_shards(
    config: BatchConfig, rows: Sequence[Row], per_shard: int, child_parameters: dict[str, Any]
) -> list[Shard]:
    """Write the rows (manifest columns, locations made absolute) as shard files under the state
    URL, named by content; remove shard files of earlier splittings."""
    table = read_manifest(config.manifest)
    table = table.take([row.index for row in rows])
    for name in LOCATION_COLUMNS:  # a shard file lives elsewhere: make its paths absolute
        if name in table.column_names:
            values = [
                resolve_location(v, config.manifest) if isinstance(v, str) and v else v
                for v in table.column(name).to_pylist()
            ]
            table = table.set_column(
                table.column_names.index(name), name, pa.array(values, pa.string())
            )
    folder = f"{config.state_url}/shards"
    shards = []
    for start in range(0, table.num_rows, per_shard):
        part_rows = rows[start : start + per_shard]
        data = parquet_bytes(table.slice(start, per_shard))
        inputs = [_fingerprint(r.audio) + _fingerprint(r.image or "") for r in part_rows]
        key = json.dumps([hashlib.sha256(data).hexdigest(), inputs, child_parameters], default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        url = publish_bytes(data, folder, f"shard-{digest}.parquet")
        ids = tuple(r.id for r in part_rows)
        shards.append(Shard(digest, url, ids))
    _remove_stale(folder, {f"shard-{s.id}.parquet" for s in shards})
    _remove_stale(
        config.target, {f"results-shard-{s.id}.parquet" for s in shards}, "results-shard-"
    )
    return shards


def _remove_stale(folder: str, keep: set[str], prefix: str = "shard-") -> None:
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(prefix) and name.endswith(".parquet") and name not in keep:
            fs.rm(entry)


@task(name="run-shard")
def run_shard(
    shard: Shard,
    deployment: str,
    config: BatchConfig,
    given: dict[str, Any],
    parent_started: datetime,
) -> FlowRun:
    """Run one shard as a child flow run of `deployment` and wait for it.

    The key is the shard's content: a child that already Completed is reused; one that ended
    otherwise before this parent run started is run again under the next attempt's key.
    """
    parameters = _child_parameters(shard, config, given)
    for attempt in range(1, CHILD_ATTEMPTS + 1):
        run = cast(  # a FlowRun, called from this sync task
            FlowRun,
            run_deployment(
                deployment,
                parameters=parameters,
                idempotency_key=f"avatarflow-shard-{shard.id}-{attempt}",
                timeout=None,
            ),
        )
        earlier = run.created is not None and run.created < parent_started
        if run.state is None or run.state.is_completed() or not earlier:
            return run
    return run


def _timing(deadline: str | None, route: RouteSettings | None, now: datetime) -> dict[str, Any]:
    """What every child gets for routing: the deadline as the absolute time it means now (a child
    that starts late keeps the parent's), and the route settings. Neither is part of a shard's
    identity, so a rerun with another deadline reuses the children that completed."""
    timing: dict[str, Any] = {"route": route.model_dump(mode="json")} if route else {}
    if deadline:
        timing["deadline"] = parse_deadline(deadline, now.astimezone()).isoformat()
    return timing


def _child_parameters(shard: Shard, config: BatchConfig, given: dict[str, Any]) -> dict[str, Any]:
    """The child's parameters: its shard, the parent's target and ledger, and the render
    parameters given to the parent; the rest (backend ...) are its deployment's."""
    return {
        "manifest": shard.url,
        "target": config.target,
        "state": config.state,  # the target's one ledger, shared with plain runs
        "shard": shard.id,
        "results_name": f"results-shard-{shard.id}.parquet",
        "report_name": f"report-shard-{shard.id}.html",
        **given,
    }


def _within_budget(check: ManifestCheck, config: BatchConfig) -> tuple[list[Row], list[RowResult]]:
    """The rows to shard: all valid ones, or (with a budget) the manifest-order prefix whose
    estimates fit the budget for the whole parent run, rows already published included."""
    if config.budget_usd is None:
        return list(check.rows), []
    prepared = prepare_row.map(check.rows, unmapped(config))
    wait(prepared)
    plans, failures = [], []
    for row, future in zip(check.rows, prepared, strict=True):
        if future.state.is_completed():
            plans.append(future.result())
        else:
            failures.append(RowResult.failure(row.id, first_error([future]), row.extra))
    admission = Admission(config)
    chosen, over = set(), []
    for plan in plans:  # in manifest order: the budget holds for the whole parent run
        held = admission.admit(plan)
        if held is None or held.error is None:  # to dispatch, or published already
            chosen.add(plan.row.id)
        else:
            over.append(held)
    return [row for row in check.rows if row.id in chosen], failures + over


def merge_results(
    config: BatchConfig,
    check: ManifestCheck,
    shards: Sequence[Shard],
    runs: Sequence[FlowRun],
    parent_rows: Sequence[RowResult],
) -> pa.Table:
    """Every manifest row in manifest order: the children's rows, plus the parent's own (invalid,
    over budget) and a failed row for each row an unfinished child did not report."""
    tables, missing = [], list(parent_rows)
    extras = {row.id: row.extra for row in check.rows}
    for shard, run in zip(shards, runs, strict=True):
        table = _read_table(f"{config.target.rstrip('/')}/results-shard-{shard.id}.parquet")
        found = set(table.column("id").to_pylist()) if table is not None else set()
        if table is not None:
            tables.append(table)
        reason = f"shard {shard.id} did not finish: {_ended(run)}"
        missing += [
            RowResult.failure(i, reason, extras.get(i)) for i in shard.row_ids if i not in found
        ]
    for error in check.errors:
        if error.row is not None:
            missing.append(
                RowResult.failure(
                    error.id or f"row-{error.row}", str(error), check.extras(error.row)
                )
            )
    tables.append(results_table(missing, check.passthrough_schema))
    merged = pa.concat_tables(tables, promote_options="permissive")
    order = {row.id: row.index for row in check.rows}
    order.update({e.id or f"row-{e.row}": e.row for e in check.errors if e.row is not None})
    ids = merged.column("id").to_pylist()
    positions = sorted(range(len(ids)), key=lambda k: (order.get(ids[k], len(ids)), k))
    return merged.take(positions)


def _ended(run: FlowRun) -> str:
    """How a child run ended, with its state's message (why it failed, when it says)."""
    if run.state is None:
        return f"child flow run {run.name} ended in an unknown state"
    ended = f"child flow run {run.name} ended {run.state.name}"
    return f"{ended}: {run.state.message}" if run.state.message else ended


class ShardsFailed(Exception):
    """Rows of a sharded run were not published: the Failed parent run's result."""

    def __init__(self, message: str, counts: dict[str, int]) -> None:
        super().__init__(message)
        self.counts = counts


def _read_table(url: str) -> pa.Table | None:
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        return pq.read_table(fh)


@flow(name="produce-sharded")
def produce_sharded(
    manifest: str,
    target: str = "./out",
    deployment: str = "produce-batch/on-demand-local-gpu",
    rows: int = 200,
    state: str | None = None,
    budget_usd: float | None = None,
    model_dir: str | None = None,
    dask_address: str | None = None,
    work_dir: str | None = None,
    max_concurrency: int | None = None,
    chunk_target_s: float | None = None,
    qc: QCSettings | None = None,
    qc_skip: list[str] | None = None,
    rerender_on_qc_fail: bool | None = None,
    captions: CaptionsMode | None = None,
    caption_settings: CaptionSettings | None = None,
    fal_key_secret: str | None = None,
    backend_settings: dict[str, Any] | None = None,
    deadline: str | None = None,
    route: RouteSettings | None = None,
) -> State[dict[str, int]]:
    """Split the manifest into shards of `rows`, run each as `deployment`, merge the results.

    The render parameters from `model_dir` on are passed to every child when given; unset, the
    child deployment's own values stand. `budget_usd` holds for the whole run; so does
    `deadline` (for `auto` children), read once here so that a child started late keeps it.
    """
    config = BatchConfig(
        manifest=manifest,
        target=target,
        state=state,
        budget_usd=budget_usd,
        qc_skip=frozenset(qc_skip or ()),
    )
    forwarded = {
        "model_dir": model_dir,
        "dask_address": dask_address,
        "work_dir": work_dir,
        "max_concurrency": max_concurrency,
        "chunk_target_s": chunk_target_s,
        "qc": qc.model_dump(mode="json") if qc else None,
        "qc_skip": sorted(config.qc_skip) if qc_skip is not None else None,
        "rerender_on_qc_fail": rerender_on_qc_fail,
        "captions": captions,
        "caption_settings": caption_settings.model_dump(mode="json") if caption_settings else None,
        "fal_key_secret": fal_key_secret,  # a block's name, never a key
        "backend_settings": backend_settings,
    }
    given = {name: value for name, value in forwarded.items() if value is not None}
    started = datetime.now(UTC)
    timing = _timing(deadline, route, started)  # a DeadlineError fails the run before any shard
    ledger = Ledger.for_run(config)
    logger = get_run_logger()
    with ledger.lock():  # no plain run on this target overlaps the parent
        check = load_rows(config)
        chosen, parent_rows = _within_budget(check, config)
        shards = write_shards(config, chosen, rows, {"deployment": deployment, **given})
        futures = run_shard.map(
            shards,
            unmapped(deployment),
            unmapped(config),
            unmapped({**given, **timing}),
            unmapped(started),
        )
        runs = [future.result() for future in futures]
        table = merge_results(config, check, shards, runs, parent_rows)
    results_url = publish_bytes(parquet_bytes(table), config.target, config.results_name)
    _publish_report(config, table, len(shards))
    counts = dict(zip(*_value_counts(table.column("status").to_pylist()), strict=True))
    unfinished = [run for run in runs if not (run.state and run.state.is_completed())]
    for run in unfinished:
        logger.warning("%s", _ended(run))
    failed = table.num_rows - counts.get("published", 0)
    message = (
        f"{failed} of {table.num_rows} rows not published, {len(unfinished)} of {len(shards)} "
        f"shards did not complete; see {results_url}"
    )
    if failed or unfinished:
        logger.error(message)
        return Failed(message=message, data=ShardsFailed(message, counts))
    return Completed(
        message=f"{table.num_rows} rows published in {len(shards)} shards", data=counts
    )


def _value_counts(values: list[str]) -> tuple[list[str], list[int]]:
    names = sorted(set(values))
    return names, [values.count(name) for name in names]


def _publish_report(config: BatchConfig, table: pa.Table, shard_count: int) -> None:
    fields = {"id", "status", "video_url", "error", "cost_usd", "duration_s"}
    results = [
        RowResult(**{k: v for k, v in row.items() if k in fields})
        for row in table.select([c for c in table.column_names if c in fields]).to_pylist()
    ]
    title = f"avatarflow — {config.manifest}"
    html = render_report(results, {"shards": shard_count}, {}, title)
    publish_bytes(html.encode(), config.target, config.report_name)
