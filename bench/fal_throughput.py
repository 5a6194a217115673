"""Throughput of the fal backend: 100 one-chunk rows through FalRenderer against the loopback fake.

The fake takes 2 s per request and, like a fal account whose concurrency limit equals our
max_concurrency (8), runs at most 8 at once. The ideal wall time is then ceil(rows / 8) × 2 s, and
wall ÷ ideal measures everything the client adds: uploads, submits, polling lateness, result
fetches and downloads. Run: .venv/bin/python bench/fal_throughput.py [--rows N] [--latency S]
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
import wave
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fake lives in tests/fakes

from avatarflow.tasks.backends import RenderJob  # noqa: E402
from avatarflow.tasks.backends.fal.renderer import FalRenderer  # noqa: E402
from avatarflow.tasks.config import BatchConfig, FalSettings  # noqa: E402
from avatarflow.tasks.ledger import Ledger  # noqa: E402
from tests.factories import make_audio, make_plan, make_row  # noqa: E402
from tests.fakes.fal_server import FakeFal  # noqa: E402


def make_job(work: Path, index: int) -> RenderJob:
    """A one-chunk row with 1 s of silent 16 kHz narration (uploaded through fal storage)."""
    wav = work / f"row{index}.wav"
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(bytes(32_000))
    row = make_row(f"row{index}", str(wav), index=index)
    plan = make_plan(row, make_audio(1.0, source=str(wav), pcm_path=str(wav)), seed=index)
    return RenderJob(plan, plan.chunks, (str(wav),), out_dir=str(work / "out"))


def main() -> None:
    """Render the rows, then print one markdown table row with the result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--latency", type=float, default=2.0, help="fake seconds per request")
    parser.add_argument("--max-concurrency", type=int, default=8)
    args = parser.parse_args()

    with FakeFal(latency_s=args.latency, concurrency=args.max_concurrency) as fake:
        os.environ.update(fake.env())  # FAL_KEY and the hosts, as a worker would have them
        config = BatchConfig(
            manifest="bench.parquet",
            backend="fal",
            max_concurrency=args.max_concurrency,
            fal=FalSettings(),  # production poll/backoff defaults
        )
        renderer = FalRenderer.shared(config)
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [make_job(Path(tmp), i) for i in range(args.rows)]
            ledger = Ledger(str(Path(tmp) / "state"))  # the renderer records each request here
            # The flow's fal pool size: spare threads upload and download while 8 are in flight.
            workers = args.max_concurrency * 2 + 2
            started = time.monotonic()
            with ThreadPoolExecutor(workers) as pool:
                rendered = pool.map(lambda job: renderer.render(job, ledger), jobs)
                videos = [v for vs in rendered for v in vs]
            wall_s = time.monotonic() - started
        stats = f"{fake.counts['status']} status polls, max {fake.max_in_progress} in progress"
    ideal_s = math.ceil(args.rows / args.max_concurrency) * args.latency
    assert len(videos) == args.rows
    print(f"<!-- {stats} -->")
    print(
        f"| fal_throughput | {args.rows} rows × 1 chunk, {args.latency:g} s/request, "
        f"{args.max_concurrency} in flight | wall {wall_s:.2f} s | ideal {ideal_s:.1f} s | "
        f"**{wall_s / ideal_s:.3f}** | nproc {os.cpu_count()}, {platform.platform()}, "
        f"Python {platform.python_version()} | {datetime.date.today()} |"
    )


if __name__ == "__main__":
    main()
