"""Benchmark: CPU cost of the QC gates (avatarflow.tasks.qc.run_gates) per minute of 480p video.

Renders a 1-minute 832x480 16 fps synthetic talking head (H.264 crf 18 + AAC) once into
bench/_work/, runs every gate on it (best of 3, CPU seconds of the whole process, decode and
OpenCV threads included) and, as a floor, ffmpeg's blackdetect + freezedetect alone over the same
file. Prints a markdown table row with the ratio against fal's render time for that minute.

fal's API page states no render speed, so the ratio assumes fal renders a 480p video-minute in
--fal-s-per-minute seconds (default 60: no faster than real time, a conservative floor for a
13.6B-parameter DiT at 30 steps, which needs minutes per 5-s segment on one GPU); the target is
QC ≤ 5 % of that.
Run: .venv/bin/python bench/qc_speed.py [--fal-s-per-minute 60]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatarflow.tasks.qc import run_gates  # noqa: E402
from tests.qc_factory import talking_head, write_render  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work"
SECONDS, SIZE = 60.0, (832, 480)
REPEATS = 3
TARGET_SHARE = 0.05


def make_video() -> Path:
    """Render the test minute once; reuse it on later runs."""
    path = WORK / "qc_480p_60s.mp4"
    if not path.exists():
        WORK.mkdir(parents=True, exist_ok=True)
        write_render(path, talking_head(SECONDS, SIZE), preset="veryfast", crf=18)
    return path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def qc_cpu_s(path: Path) -> tuple[float, float]:
    """Best (CPU seconds, wall seconds) of REPEATS full QC runs; every gate must pass."""
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(REPEATS):
        cpu, wall = time.process_time(), time.perf_counter()
        report = run_gates(path)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
        if not report.passed:
            raise SystemExit(f"the benchmark render failed QC: {report.failed}")
    return best_cpu, best_wall


def ffmpeg_filters_cpu_s(path: Path) -> float:
    """Best CPU seconds of ffmpeg's blackdetect + freezedetect in one pass (no other gate)."""
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-an"]
    command += ["-vf", "blackdetect=d=0.1:pix_th=0.10,freezedetect=n=-60dB:d=1", "-f", "null", "-"]
    best = float("inf")
    for _ in range(REPEATS):
        before = children_cpu_s()
        subprocess.run(command, check=True)
        best = min(best, children_cpu_s() - before)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fal-s-per-minute", type=float, default=60.0)
    args = parser.parse_args()
    start = time.perf_counter()
    path = make_video()
    print(f"input ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    minutes = SECONDS / 60
    cpu, wall = qc_cpu_s(path)
    ffmpeg = ffmpeg_filters_cpu_s(path)
    per_minute = cpu / minutes
    ratio = per_minute / args.fal_s_per_minute
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, Python "
    machine += platform.python_version()
    print(
        "| date | machine | video | QC CPU-s per video-min | QC wall s per video-min "
        "| ffmpeg black+freeze CPU-s per video-min | fal s per video-min (assumed) | ratio "
        "| target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {datetime.date.today()} | {machine} | {SECONDS:g} s {SIZE[0]}x{SIZE[1]} 16 fps "
        f"| {per_minute:.2f} | {wall / minutes:.2f} | {ffmpeg / minutes:.2f} "
        f"| {args.fal_s_per_minute:g} | **{ratio:.3f}** | ≤ {TARGET_SHARE} |"
    )


if __name__ == "__main__":
    main()
