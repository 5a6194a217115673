"""The whole Prefect flow against the loopback fal service: 100 one-chunk rows, 2 s per request.

Like bench/fal_throughput.py but through produce_batch (manifest, probe, plan, render, verify,
concat, publish, results, report) on Prefect's ephemeral server. Reports the render phase (first
submit → last chunk downloaded) ÷ the ideal ceil(rows / 8) × 2 s, and the whole run for context.
Run: .venv/bin/python bench/fal_flow_throughput.py [--rows N] [--latency S]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="bench-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake lives in tests/fakes

from avatarflow.flows.produce import run_batch  # noqa: E402
from avatarflow.tasks import progress  # noqa: E402
from avatarflow.tasks.config import BatchConfig, FalSettings  # noqa: E402
from avatarflow.tasks.records import ChunkRendered, ProgressEvent  # noqa: E402
from tests.factories import write_manifest, write_narrations  # noqa: E402
from tests.fakes.fal_server import FakeFal, Faults  # noqa: E402


def main() -> None:
    """Run the flow once and print one markdown table row."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--latency", type=float, default=2.0, help="fake seconds per request")
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory() as tmp,
        # faceless stripes: one encode serves every row, so the fake never limits throughput
        FakeFal(
            latency_s=args.latency,
            concurrency=args.max_concurrency,
            faults=Faults(faceless=True),
        ) as fake,
    ):
        work = Path(tmp)
        os.environ.update(fake.env())  # FAL_KEY and the hosts, as a worker would have them
        # distinct audio per row (seeded by position), 2-4 s long
        lengths = {f"row{i:03d}": 2.0 + (i % 3) for i in range(args.rows)}
        manifest = write_manifest(work / "manifest.parquet", write_narrations(work, lengths, ""))
        config = BatchConfig(
            manifest=manifest,
            target=str(work / "out"),
            work_dir=str(work / "work"),
            backend="fal",
            max_concurrency=args.max_concurrency,
            fal=FalSettings(),  # production poll/backoff defaults
            qc_skip=frozenset({"face", "lipsync"}),  # stripes have no face to judge
        )
        rendered: list[float] = []

        def on_event(event: ProgressEvent) -> None:
            if isinstance(event, ChunkRendered):
                rendered.append(time.time())

        unsubscribe = progress.subscribe(on_event)
        started = time.time()
        outcome = run_batch(config)
        total_s = time.time() - started
        unsubscribe()
        first_submit = min(job.submitted_at for job in fake._jobs.values())
        # the fake stamps jobs with time.monotonic(); convert to wall time via the offset now
        offset = time.time() - time.monotonic()
        render_s = max(rendered) - (first_submit + offset)
        before_s = first_submit + offset - started  # Prefect start-up, probe and plan
        after_s = total_s - (max(rendered) - started)  # finish-row of the last rows, tables
    assert outcome.exit_code == 0, [r.error for r in outcome.results if r.error]
    ideal_s = math.ceil(args.rows / args.max_concurrency) * args.latency
    print(
        f"| fal_flow_throughput | {args.rows} rows through produce_batch, "
        f"{args.latency:g} s/request,"
        f" {args.max_concurrency} in flight | render phase {render_s:.2f} s | ideal {ideal_s:.1f} s"
        f" | **{render_s / ideal_s:.3f}** | whole run {total_s:.1f} s ({before_s:.1f} s before the"
        f" first submit, {after_s:.1f} s after the last render) | nproc {os.cpu_count()}, "
        f"{platform.platform()}, Python {platform.python_version()} | {datetime.date.today()} |"
    )


if __name__ == "__main__":
    main()
