"""Local renders on a Dask LocalCluster: 1 GPU worker against 2, with the tiny model on CPU.

Each worker process advertises GPU=1 and keeps its model loaded; the flow sends each row's render
to whichever worker is free. Two runs per cluster size: the first includes each worker's model
load, the second shows the resident model. On a CPU machine "GPU" is only the resource name: the
workers share the cores, so the ratio shows the engine's overhead and overlap, not GPU scaling.
Run: .venv/bin/python bench/dask_workers.py [--rows 8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from distributed import LocalCluster  # noqa: E402

from avatarflow.flows.produce import run_batch  # noqa: E402
from avatarflow.model.tiny import write_tiny_checkpoint  # noqa: E402
from avatarflow.tasks.config import BatchConfig, LocalSettings  # noqa: E402
from tests.media_factory import write_narration  # noqa: E402


def timed_runs(workers: int, rows: int, checkpoint: Path, folder: Path) -> list[float]:
    """Two runs of `rows` rows on a fresh cluster of `workers` GPU workers; their wall times."""
    times = []
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, resources={"GPU": 1}, dashboard_address=":0"
    ) as cluster:
        for attempt in range(2):
            work = folder / f"w{workers}-{attempt}"
            work.mkdir(parents=True)
            records = []
            for i in range(rows):
                write_narration(work / f"r{i}.wav", 6.0, seed=100 * attempt + i)  # 2 segments
                records.append({"id": f"r{i}", "audio": f"r{i}.wav"})
            pq.write_table(pa.Table.from_pylist(records), work / "m.parquet")
            local = LocalSettings(model_dir=str(checkpoint), dask_address=cluster.scheduler_address)
            config = BatchConfig(
                manifest=str(work / "m.parquet"),
                target=str(work / "out"),
                work_dir=str(work / "scratch"),
                backend="local",
                local=local,
            )
            started = time.monotonic()
            outcome = run_batch(config)
            times.append(time.monotonic() - started)
            assert outcome.exit_code == 0, [r.error for r in outcome.failed]
    return times


def main() -> None:
    """Print one markdown table row: wall times with 1 and 2 GPU workers."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint = write_tiny_checkpoint(folder / "tiny")
        one = timed_runs(1, args.rows, checkpoint, folder)
        two = timed_runs(2, args.rows, checkpoint, folder)
    print(
        f"| dask_workers | {args.rows} tiny-model rows (6 s, 2 segments) | 1 worker: first run "
        f"{one[0]:.1f} s, resident {one[1]:.1f} s | 2 workers: first {two[0]:.1f} s, resident "
        f"{two[1]:.1f} s | resident speed-up **{one[1] / two[1]:.2f}x** | nproc {os.cpu_count()}, "
        f"{platform.platform()}, Python {platform.python_version()} | {datetime.date.today()} |"
    )


if __name__ == "__main__":
    main()
