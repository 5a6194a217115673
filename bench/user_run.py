"""`avatarflow run` timed as a user times it: the real CLI in a subprocess, whole process tree.

The CLI runs with no PREFECT_API_URL, so Prefect starts its ephemeral server (a subprocess of the
CLI); the fal service is the loopback fake in this script's own process tree but not the CLI's,
rendering faceless stripes in a fixed time (fal's own CPU is not the user's). Reported:
- wall from spawn to exit, against ideal = ceil(rows / in_flight) × render_s;
- CPU-seconds of every process the command starts: the CLI's rusage as reaped (which includes
  its reaped descendants, the ephemeral server among them), plus any orphan this script reaps as
  the child subreaper; the split per process (flow, server, other) from psutil samples;
- peak RSS of the tree and of the flow process, and the flow process's RSS against published
  rows (least-squares slope per 1,000 rows over the second half of the run, start-up excluded;
  and its RSS at a quarter, half, three quarters and all of the rows);
- then the same command again (every render reused: 0 submits).
Run: .venv/bin/python bench/user_run.py --rows 1000 [--render-s 2] [--in-flight 16] [--no-rerun]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the fakes live in tests/


from tests.factories import copied_narration_manifest  # noqa: E402

CLI = Path(sys.executable).with_name("avatarflow")
PR_SET_CHILD_SUBREAPER = 36
SAMPLE_S = 0.5


def serve_fake(render_s: float, in_flight: int, conn: object) -> None:
    """The fal fake in its own process: send its environment, serve until terminated."""
    from tests.fakes.fal_server import FakeFal, Faults

    with FakeFal(latency_s=render_s, concurrency=in_flight, faults=Faults(faceless=True)) as fake:
        conn.send((fake.env(), os.getpid()))  # type: ignore[attr-defined]
        while True:
            time.sleep(3600)


@dataclass
class Tree:
    """What the psutil samples saw of the command's process tree."""

    cpu_by_pid: dict[int, float] = field(default_factory=dict)  # own user+system, last sample
    kind_by_pid: dict[int, str] = field(default_factory=dict)
    peak_tree_rss: int = 0
    peak_flow_rss: int = 0
    rss_vs_rows: list[tuple[int, int]] = field(default_factory=list)  # (published rows, flow RSS)

    def sample(self, root: psutil.Process, target: Path) -> None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        tree_rss = 0
        for proc in procs:
            try:
                with proc.oneshot():
                    times, rss = proc.cpu_times(), proc.memory_info().rss
                    if proc.pid not in self.kind_by_pid:
                        self.kind_by_pid[proc.pid] = _kind(proc, root)
            except psutil.Error:
                continue
            self.cpu_by_pid[proc.pid] = times.user + times.system
            tree_rss += rss
            if proc.pid == root.pid:
                self.peak_flow_rss = max(self.peak_flow_rss, rss)
                self.rss_vs_rows.append((_published(target), rss))
        self.peak_tree_rss = max(self.peak_tree_rss, tree_rss)

    def cpu_by_kind(self) -> dict[str, float]:
        split: dict[str, float] = {}
        for pid, cpu in self.cpu_by_pid.items():
            kind = self.kind_by_pid.get(pid, "other")
            split[kind] = split.get(kind, 0.0) + cpu
        return split


def _kind(proc: psutil.Process, root: psutil.Process) -> str:
    if proc.pid == root.pid:
        return "flow"
    line = " ".join(proc.cmdline())
    return "server" if "uvicorn" in line or "server" in line else "other"


def _published(target: Path) -> int:
    try:
        return sum(1 for e in os.scandir(target) if e.name.endswith(".mp4"))
    except FileNotFoundError:
        return 0


def rss_at_quarters(points: list[tuple[int, int]], rows: int) -> str:
    """The flow process's RSS when a quarter, half, three quarters and all rows were published."""
    marks = []
    for quarter in (1, 2, 3, 4):
        seen = [rss for published, rss in points if published >= rows * quarter // 4]
        marks.append(f"{seen[0] / 1e6:.0f}" if seen else "—")
    return " / ".join(marks) + " MB"


def slope_per_1000(points: list[tuple[int, int]]) -> float:
    """Least-squares MB of flow RSS per 1,000 published rows, over the run's second half."""
    last = points[-1][0] if points else 0
    tail = [(x, y / 1e6) for x, y in points if x >= last / 2]
    if len(tail) < 3 or tail[-1][0] == tail[0][0]:
        return float("nan")
    mx = sum(x for x, _ in tail) / len(tail)
    my = sum(y for _, y in tail) / len(tail)
    sxx = sum((x - mx) ** 2 for x, _ in tail)
    sxy = sum((x - mx) * (y - my) for x, y in tail)
    return 1000 * sxy / sxx


@dataclass
class Result:
    wall_s: float
    cpu_s: float  # the whole tree, from rusage
    exit_code: int
    published: int  # rows published when it ended (fewer than asked if it was stopped)
    tree: Tree
    unreaped: int  # descendants still alive 30 s after the CLI left


def run_cli(
    launcher: list[str], args: list[str], env: dict[str, str], target: Path, fake_pid: int
) -> Result:
    """Spawn the CLI, sample its tree until it exits, reap it and every orphan it left."""
    tree = Tree()
    started = time.monotonic()
    # stderr to a file, not a pipe: an orphan the CLI leaves (its server after SIGTERM) keeps
    # the pipe open, and reading it would wait for that orphan
    errors = target.parent / "cli-stderr.txt"
    with errors.open("wb") as sink:
        child = subprocess.Popen(
            [*launcher, "run", *args], env=env, stdout=subprocess.DEVNULL, stderr=sink
        )
    root = psutil.Process(child.pid)
    while True:
        tree.sample(root, target)
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(SAMPLE_S)
    wall_s = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    cpu_s = usage.ru_utime + usage.ru_stime  # the CLI and the descendants it reaped
    # Orphans the CLI left (re-parented to us, the subreaper): their CPU is the command's too.
    deadline, unreaped = time.monotonic() + 30, 0
    while True:
        others = [p for p in psutil.Process().children() if p.pid != fake_pid]
        if not others:
            break
        if time.monotonic() > deadline:
            unreaped = len(others)
            break
        for proc in others:
            pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                cpu_s += usage.ru_utime + usage.ru_stime
        time.sleep(0.2)
    if child.returncode != 0:
        sys.stderr.write(errors.read_text(errors="replace")[-2000:])
    return Result(wall_s, cpu_s, child.returncode, _published(target), tree, unreaped)


def main() -> None:
    """Generate the manifest, start the fake, run the CLI (and its rerun), print table rows."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--narration-s", type=float, default=3.0)
    parser.add_argument("--render-s", type=float, default=2.0, help="fake seconds per request")
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--no-rerun", action="store_true")
    parser.add_argument("--keep", help="work folder to use and keep (default: a temporary one)")
    parser.add_argument(
        "--launcher", default=str(CLI), help="what runs `run ARGS` (e.g. a profiling wrapper)"
    )
    args = parser.parse_args()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    parent, conn = multiprocessing.Pipe()
    fake = multiprocessing.Process(
        target=serve_fake, args=(args.render_s, args.in_flight, conn), daemon=True
    )
    fake.start()
    fal_env, fake_pid = parent.recv()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-user-run-"))
    work.mkdir(parents=True, exist_ok=True)
    copied_narration_manifest(work, args.rows, args.narration_s)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FAL_", "AVATARFLOW"))
    }
    env.update(fal_env, PREFECT_HOME=str(work / "prefect-home"))
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "600"  # a loaded shared machine
    target = work / "out"
    cli_args = [
        str(work / "manifest.parquet"),
        "--backend=fal",
        f"--target={target}",
        f"--work-dir={work / 'work'}",
        f"--max-concurrency={args.in_flight}",
        "--qc-skip=face,lipsync,seams",  # the fake renders stripes: no face to judge
    ]
    ideal_s = math.ceil(args.rows / args.in_flight) * args.render_s
    try:
        runs = [("first", run_cli(args.launcher.split(), cli_args, env, target, fake_pid))]
        if not args.no_rerun:
            runs.append(("rerun", run_cli(args.launcher.split(), cli_args, env, target, fake_pid)))
    finally:
        fake.terminate()
        fake.join()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    machine = (
        f"nproc {os.cpu_count()}, {platform.machine()}, Python {platform.python_version()}, "
        f"load {' '.join(f'{x:.1f}' for x in os.getloadavg())} at end"
    )
    for name, r in runs:
        split = r.tree.cpu_by_kind()
        split_text = ", ".join(f"{k} {v:.0f}" for k, v in sorted(split.items()))
        ratio = f"**{r.wall_s / ideal_s:.2f}×**" if name == "first" else "—"
        print(
            f"| {args.rows} | {name} | {args.narration_s:g} s | {args.render_s:g} s × "
            f"{args.in_flight} | {r.wall_s:.1f} s | {ideal_s:.0f} s | {ratio} | {r.cpu_s:.0f} "
            f"({split_text}) | **{r.cpu_s / max(1, r.published):.3f}** per published row | "
            f"{r.tree.peak_tree_rss / 1e6:.0f} MB | {r.tree.peak_flow_rss / 1e6:.0f} MB | "
            f"{slope_per_1000(r.tree.rss_vs_rows):.1f} MB | "
            f"{rss_at_quarters(r.tree.rss_vs_rows, args.rows)} | exit {r.exit_code}, "
            f"{r.published} published"
            f"{f', {r.unreaped} left running' if r.unreaped else ''} | {machine} | "
            f"{datetime.date.today()} |"
        )


if __name__ == "__main__":
    main()
