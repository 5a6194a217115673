"""Large batches: split the manifest into shards, run each as a child deployment, merge results.

Each child is an ordinary produce_batch run (on whatever work pool its deployment targets, e.g. one
GPU per pod) with its own ledger under <state>/shards/<n>, so shards resume independently; the
parent writes the merged results.parquet and report.html. Prefect schedules; we only split.
"""

from __future__ import annotations

import hashlib

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, task, unmapped
from prefect.deployments import run_deployment

from tasks.config import BatchConfig
from tasks.manifest import read_manifest, resolve_location
from tasks.publish import parquet_bytes, publish_bytes
from tasks.records import RowResult
from tasks.report import render_report

LOCATION_COLUMNS = ("audio", "image")


def _absolute(table: pa.Table, manifest_url: str) -> pa.Table:
    """Resolve relative audio/image paths, so a shard written elsewhere still finds its files."""
    for name in LOCATION_COLUMNS:
        if name in table.column_names:
            values = [
                resolve_location(v, manifest_url) if isinstance(v, str) and v else v
                for v in table.column(name).to_pylist()
            ]
            index = table.column_names.index(name)
            table = table.set_column(index, name, pa.array(values, pa.string()))
    return table


def write_shards(config: BatchConfig, rows_per_shard: int) -> list[str]:
    """Split the manifest into Parquet shards under the state URL; the same manifest gives the
    same shards, so a rerun resumes every shard's own ledger."""
    table = _absolute(read_manifest(config.manifest), config.manifest)
    digest = hashlib.sha256(parquet_bytes(table)).hexdigest()[:12]
    folder = f"{config.state_url}/shards/{digest}"
    urls = []
    for n, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        shard = table.slice(start, rows_per_shard)
        urls.append(publish_bytes(parquet_bytes(shard), folder, f"shard-{n:05d}.parquet"))
    return urls


def child_config(config: BatchConfig, shard_url: str, n: int) -> BatchConfig:
    """The child run's options: same target and backend, its own manifest, ledger and tables."""
    return config.model_copy(
        update={
            "manifest": shard_url,
            "state": f"{config.state_url}/shards/run-{n:05d}",
            "results_name": f"results-shard-{n:05d}.parquet",
            "report_name": f"report-shard-{n:05d}.html",
        }
    )


def merge_results(config: BatchConfig, shard_count: int) -> pa.Table:
    """Concatenate the children's results tables in shard order (missing shards are skipped)."""
    tables = []
    for n in range(shard_count):
        url = f"{config.target.rstrip('/')}/results-shard-{n:05d}.parquet"
        fs, path = fsspec.core.url_to_fs(url)
        if fs.exists(path):
            with fs.open(path, "rb") as fh:
                tables.append(pq.read_table(fh))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


@task(name="run-shard")
def run_shard(config: BatchConfig, shard_url: str, n: int, deployment: str) -> str:
    """Run one shard as a child flow run of `deployment` and wait for it; return its state."""
    child = child_config(config, shard_url, n)
    parameters = {
        "manifest": child.manifest,
        "target": child.target,
        "state": child.state,
        "results_name": child.results_name,
        "report_name": child.report_name,
    }  # the rest (backend, model folder ...) are the child deployment's own
    run = run_deployment(
        deployment,
        parameters=parameters,
        idempotency_key=f"{shard_url}#{n}",  # a retried parent does not start a shard twice
        timeout=None,
    )
    return run.state.name if run.state else "UNKNOWN"


@flow(name="produce-sharded")
def produce_sharded(
    manifest: str,
    target: str = "./out",
    deployment: str = "produce-batch/on-demand-local-gpu",
    rows: int = 200,
    state: str | None = None,
) -> dict[str, int]:
    """Split the manifest into shards of `rows`, run each as `deployment`, merge the results."""
    config = BatchConfig(manifest=manifest, target=target, state=state)
    shards = write_shards(config, rows)
    states = run_shard.map(unmapped(config), shards, range(len(shards)), unmapped(deployment))
    states.wait()
    table = merge_results(config, len(shards))
    publish_bytes(parquet_bytes(table), config.target, config.results_name)
    columns = ["id", "status", "video_url", "error"]
    found = table.select(columns).to_pylist() if table.num_rows else []
    results = [RowResult(**row) for row in found]
    html = render_report(results, {"shards": len(shards)}, {}, f"avatarflow — {config.manifest}")
    publish_bytes(html.encode(), config.target, config.report_name)
    statuses = pc.value_counts(table.column("status")).to_pylist() if table.num_rows else []
    return {s["values"]: s["counts"] for s in statuses}
