"""Throughput with 1, 2 and 4 worker processes: the same rows split into N manifests, each run by
its own `avatarflow run` process (its own Prefect home) against one loopback fal service.

The fal account's concurrency is shared: N processes get in-flight / N requests each, so the
ideal wall time is the same for every N; what changes is how much per-row CPU the processes
spread over the cores. Prints one markdown table row per N.
Run: .venv/bin/python bench/worker_processes.py [--rows 400] [--latency 2] [--in-flight 16]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.large_manifest import start_fake  # noqa: E402
from tests.media_factory import write_narration  # noqa: E402

AVATARFLOW = str(Path(sys.executable).with_name("avatarflow"))


def run(processes: int, rows: int, in_flight: int, fal_env: dict[str, str], tmp: Path) -> float:
    """Split rows over `processes` CLI runs started together; return the wall time of all."""
    audio = tmp / "n.wav"
    started, children = 0.0, []
    folders = []
    for p in range(processes):
        folder = tmp / f"p{processes}-{p}"
        folder.mkdir()
        records = []
        for i in range(p, rows, processes):
            (folder / f"n{i}.wav").write_bytes(audio.read_bytes())
            records.append({"id": f"row{i:05d}", "audio": f"n{i}.wav"})
        pq.write_table(pa.Table.from_pylist(records), folder / "m.parquet")
        folders.append(folder)
    started = time.monotonic()
    for folder in folders:
        env = {**os.environ, **fal_env, "PREFECT_HOME": str(folder / "prefect")}
        args = [AVATARFLOW, "run", str(folder / "m.parquet"), "--backend", "fal"]
        args += ["--target", str(folder / "out"), "--work-dir", str(folder / "work")]
        args += ["--max-concurrency", str(in_flight // processes)]
        args += ["--qc-skip", "face,lipsync,seams"]  # throughput, as in RESULTS.md: not QC
        log = (folder / "log.txt").open("wb")
        children.append(subprocess.Popen(args, env=env, stdout=log, stderr=log))
    codes = [child.wait() for child in children]
    wall_s = time.monotonic() - started
    assert codes == [0] * processes, codes
    return wall_s


def main() -> None:
    """Run 1, 2 and 4 processes over the same number of rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--latency", type=float, default=2.0)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    fake, fal_env = start_fake(args.latency, args.in_flight)
    ideal_s = math.ceil(args.rows / args.in_flight) * args.latency
    try:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            write_narration(tmp / "n.wav", 1.0, seed=1)
            for processes in (1, 2, 4):
                wall_s = run(processes, args.rows, args.in_flight, fal_env, tmp)
                print(
                    f"| worker_processes | {args.rows} rows, {processes} process(es), "
                    f"{args.in_flight // processes} in flight each | wall {wall_s:.1f} s (start-up "
                    f"included) | ideal {ideal_s:.1f} s | **{wall_s / ideal_s:.2f}x** | "
                    f"{args.rows / wall_s:.2f} rows/s | nproc {os.cpu_count()}, "
                    f"{platform.platform()}, Python {platform.python_version()} | "
                    f"{datetime.date.today()} |",
                    flush=True,
                )
    finally:
        fake.terminate()


if __name__ == "__main__":
    main()
