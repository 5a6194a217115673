"""A large manifest through the whole flow against the loopback fal service (in its own process).

Measures what bulk users feel: time from the start of the run to the first paid submit, wall time
against the ideal ceil(rows / in-flight) × latency, CPU-seconds per row of the flow's process (the
fal fake's CPU is not counted), and peak RSS. The fake renders noise, so the picture gates (face,
lipsync, seams) are skipped; every other gate runs.
Run: .venv/bin/python bench/large_manifest.py [--rows 1000] [--latency 2] [--in-flight 16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake lives in tests/fakes


from avatarflow.flows.produce import run_batch  # noqa: E402
from avatarflow.tasks import progress  # noqa: E402
from avatarflow.tasks.config import BatchConfig, FalSettings  # noqa: E402
from avatarflow.tasks.records import RowsPlanned  # noqa: E402
from tests.factories import copied_narration_manifest  # noqa: E402


def serve_fake(latency_s: float, in_flight: int, conn: object) -> None:
    """The fal fake in its own process: send its environment, serve until terminated."""
    from tests.fakes.fal_server import FakeFal

    with FakeFal(latency_s=latency_s, concurrency=in_flight) as fake:
        conn.send(fake.env())  # type: ignore[attr-defined]
        while True:
            time.sleep(3600)


def start_fake(latency_s: float, in_flight: int) -> tuple[multiprocessing.Process, dict[str, str]]:
    """Start the fal fake in its own process; return it and the FAL_* environment to reach it."""
    parent, child = multiprocessing.Pipe()
    fake = multiprocessing.Process(
        target=serve_fake, args=(latency_s, in_flight, child), daemon=True
    )
    fake.start()
    env: dict[str, str] = parent.recv()
    return fake, env


def first_submit(state: Path) -> float:
    """The earliest paid submit of the run: the ledger's attempt records carry their time."""
    times = [json.loads(p.read_text())["started_at"] for p in state.rglob("*.attempt.json")]
    return min(times)


def main() -> None:
    """Run the flow once over a generated manifest and print one markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=2.0, help="fake seconds per request")
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()

    fake, env = start_fake(args.latency, args.in_flight)
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            copied_narration_manifest(work, args.rows, 1.0)
            config = BatchConfig(
                manifest=str(work / "manifest.parquet"),
                target=str(work / "out"),
                work_dir=str(work / "work"),
                backend="fal",
                max_concurrency=args.in_flight,
                fal=FalSettings(),  # production poll and backoff defaults
                qc_skip=frozenset({"face", "lipsync", "seams"}),
            )
            planning: list[float] = []  # when the flow starts planning rows (after start-up)
            listener = lambda event: (  # noqa: E731
                planning.append(time.time()) if isinstance(event, RowsPlanned) else None
            )
            cpu_before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.time()
            with progress.listening(listener):
                outcome = run_batch(config)
            ended = time.time()
            cpu = resource.getrusage(resource.RUSAGE_SELF)
            to_first_s = first_submit(work / "out" / ".avatarflow") - planning[0]
            streamed_s = ended - planning[0]
    finally:
        fake.terminate()
    assert outcome.exit_code == 0, [r.error for r in outcome.failed][:3]
    cpu_s = (cpu.ru_utime - cpu_before.ru_utime) + (cpu.ru_stime - cpu_before.ru_stime)
    ideal_s = math.ceil(args.rows / args.in_flight) * args.latency
    print(
        f"| large_manifest | {args.rows} rows, {args.latency:g} s/request, {args.in_flight} in "
        f"flight | planning → end {streamed_s:.1f} s, ideal {ideal_s:.1f} s, "
        f"**{streamed_s / ideal_s:.2f}x** (whole run {ended - started:.1f} s) | first submit "
        f"{to_first_s:.2f} s after planning starts | {cpu_s / args.rows:.3f} CPU-s/row | "
        f"peak RSS {cpu.ru_maxrss / 1024:.0f} MB | nproc {os.cpu_count()}, "
        f"{platform.platform()}, Python {platform.python_version()} | {datetime.date.today()} |"
    )


if __name__ == "__main__":
    main()
