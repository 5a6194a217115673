"""Crash safety of `avatarflow run` on the fal backend: SIGKILL at random moments, Ctrl-C and
`avatarflow cancel`, against the loopback fake fal and one shared Prefect server.

A *duplicate submission* is a second request that carries the same narration audio bytes and seed
as an earlier one in the same trial: the same row's same chunk, paid for twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from avatarflow.tasks.backends.fal.client import FalQueueClient
from avatarflow.tasks.config import FalSettings
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.media import probe_video
from tests.cli import flat, invoke
from tests.factories import write_manifest, write_narrations
from tests.fakes.fal_server import APP, FakeFal, Faults

pytestmark = pytest.mark.usefixtures("prefect_server")

AVATARFLOW = str(Path(sys.executable).with_name("avatarflow"))
ROWS = {"intro": 3.0, "lesson": 15.0, "lecture": 24.0, "outro": 2.5}
CHUNKS = 1 + 2 + 3 + 1  # with --chunk-target-s 11
# 4 chains of 3 SIGKILLs each (12 trials) on one target per chain, then a run to the end.
CHAINS, KILLS_PER_CHAIN = 4, 3
HANG_CHAINS = {1, 3}  # the fake holds a submit's answer: the first kill lands inside the window
SEED = 20261125
FPS = 16


@dataclass
class Sandbox:
    """Where the children run: everything they may write outside a trial's target and work dir
    (home, temp, cache, cwd) is watched and must stay empty."""

    root: Path
    manifest: str
    env: dict[str, str]

    def watched(self) -> list[Path]:
        return [self.root / name for name in ("home", "tmp", "cache", "cwd")]


def _latency(payload: dict[str, Any]) -> float:
    """0.3–1 s per request, fixed by the request's audio so trials are reproducible."""
    return 0.3 + 0.7 * (zlib.crc32(str(payload.get("audio_url")).encode()) % 100) / 100


@pytest.fixture(scope="module")
def fal() -> Iterator[FakeFal]:
    with FakeFal(latency_s=_latency) as fake:
        yield fake


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, fal: FakeFal) -> Sandbox:
    from prefect.settings import get_current_settings

    root = tmp_path_factory.mktemp("resume")
    media = root / "media"
    rows = [row | {"n": i} for i, row in enumerate(write_narrations(media, ROWS, subdir=""))]
    manifest = write_manifest(media / "manifest.parquet", rows)
    for name in ("home", "tmp", "cache", "cwd", "prefect"):
        (root / name).mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "FAL_"))}
    env |= fal.env() | {
        "PREFECT_API_URL": str(get_current_settings().api.url),  # the session's test server
        "PREFECT_HOME": str(root / "prefect"),  # Prefect's own files, not ours
        "HOME": str(root / "home"),
        "TMPDIR": str(root / "tmp"),
        "XDG_CACHE_HOME": str(root / "cache"),
    }
    return Sandbox(root, manifest, env)


def _start(sandbox: Sandbox, trial: Path, *extra: str) -> subprocess.Popen[bytes]:
    args = [AVATARFLOW, "run", sandbox.manifest, "--backend", "fal", "--chunk-target-s", "11"]
    args += ["--target", str(trial / "out"), "--work-dir", str(trial / "work"), *extra]
    with (trial / "log.txt").open("ab") as log:  # the test's own file, beside the trial's
        return subprocess.Popen(
            args,
            env=sandbox.env,
            cwd=sandbox.root / "cwd",
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )


def _run(sandbox: Sandbox, trial: Path, *extra: str) -> int:
    proc = _start(sandbox, trial, *extra)
    try:
        return proc.wait(timeout=180)
    finally:
        proc.kill()


def _requests(state: Path) -> int:
    return len(list(state.glob("rows/*/*/chunk-*.request.json")))


def _journal(state: Path) -> Path | None:
    """The run's local request journal in its work dir. A request id is written there first and
    then to the ledger: a kill between the two leaves it there only, and a rerun reads it."""
    found = sorted((state.parent.parent / "work" / "journal").glob("*"))
    return found[0] if found else None


def _ledger_ids(state: Path) -> set[str]:
    """Every request id the ledger or its journal ever recorded (current and replaced)."""
    ids: set[str] = set()
    journal = _journal(state)
    for folder in (state, *([journal] if journal else [])):
        for path in folder.glob("rows/*/*/chunk-*.request.json"):
            doc = json.loads(path.read_text())
            ids |= {doc["request_id"], *doc.get("replaced", [])}
    return ids


def _sha(fal: FakeFal, payload: dict[str, Any]) -> str:
    return hashlib.sha256(fal.file_bytes(payload["audio_url"]) or b"").hexdigest()


def _duplicates(fal: FakeFal) -> int:
    """Submissions that repeat an earlier one's audio bytes and seed (see the module docstring)."""
    keys = Counter((_sha(fal, p), p.get("seed")) for p in fal.payloads)
    return sum(n - 1 for n in keys.values())


def _kill_somewhere(
    proc: subprocess.Popen[bytes], state: Path, fal: FakeFal, hang: bool, rng: random.Random
) -> bool:
    """SIGKILL the run at a seeded random point of its life; True if it was still running."""
    recorded = _requests(state)
    if hang:  # right after the fake received the body it will never answer
        trigger, delay = (lambda: fal.counts["fault:submit_hang"] >= 1), 0.1
    else:  # after k more request ids were recorded (k = 0: any time), plus a random delay
        k = rng.randint(0, CHUNKS - recorded)
        trigger = lambda: _requests(state) >= recorded + k  # noqa: E731
        delay = rng.uniform(0, 2.0) if k else rng.uniform(0, 10.0)
    deadline = time.monotonic() + 120
    while not trigger() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    running = proc.poll() is None
    proc.kill()
    proc.wait()
    return running


def _unanswered(state: Path) -> set[tuple[str, int]]:
    """(row id, chunk) of every chunk whose latest submit attempt no recorded request answers."""
    ledger = Ledger(str(state), journal_dir=_journal(state))  # as a rerun sees it
    return {(r.row_id, r.chunk) for r in ledger.in_flight() if r.ambiguous}


def _chunk_of(trial: Path) -> dict[str, tuple[str, int]]:
    """sha256 of each chunk's narration WAV (what the fake receives) → (row id, chunk index)."""
    return {
        hashlib.sha256(wav.read_bytes()).hexdigest(): (wav.parts[-3], int(wav.stem.split("-")[1]))
        for wav in (trial / "work" / "rows").glob("*/*/chunk-*.wav")
    }


def _settle_ambiguous(sandbox: Sandbox, trial: Path, unanswered: set[tuple[str, int]]) -> int:
    """Rerun: the rows of unanswered chunks fail as ambiguous; then force them as a user would."""
    assert _run(sandbox, trial) == 1
    table = pq.read_table(trial / "out" / "results.parquet").to_pylist()
    flagged = {r["id"] for r in table if "ambiguous submit" in (r["error"] or "")}
    assert flagged == {row for row, _ in unanswered}, table
    assert {r["status"] for r in table if r["id"] not in flagged} <= {"published"}
    assert _run(sandbox, trial, "--resubmit-ambiguous") == 0
    return len(flagged)


def _check_published(trial: Path, fal: FakeFal) -> None:
    """Every row published once, complete; nothing partial or temporary in the target."""
    out = trial / "out"
    table = pq.read_table(out / "results.parquet").to_pylist()
    assert [r["id"] for r in table] == list(ROWS)
    assert {r["status"] for r in table} == {"published"}, table
    for row_id, seconds in ROWS.items():
        probe = probe_video(out / f"{row_id}.mp4")
        assert abs(probe.frames / FPS - seconds) <= 1 / FPS
        sidecar = json.loads((out / f"{row_id}.json").read_text())
        assert len(set(sidecar["request_ids"])) == len(sidecar["chunks"])
        assert set(sidecar["request_ids"]) <= set(fal.request_ids)
    names = {p.name for p in out.iterdir()}
    assert names == {f"{r}.{ext}" for r in ROWS for ext in ("mp4", "json")} | {
        "results.parquet",
        "report.html",
        ".avatarflow",
    }
    assert len(list(out.glob(".avatarflow/rows/*/*/chunk-*.done.json"))) == CHUNKS
    leftovers = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".part")]
    assert leftovers == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_at_random_moments_then_rerun_publishes_all_and_never_pays_twice(
    fal: FakeFal, sandbox: Sandbox
) -> None:
    """Chains of runs on one target, each SIGKILLed at a random point, then one run to the end."""
    rng = random.Random(SEED)
    stats: Counter[str] = Counter()
    for chain in range(CHAINS):
        trial = sandbox.root / f"chain-{chain}"
        trial.mkdir()
        state = trial / "out" / ".avatarflow"
        fal.reset(Faults(submit_hang=1, hang_s=1.0) if chain in HANG_CHAINS else None)
        unrecorded: set[str] = set()
        for kill in range(KILLS_PER_CHAIN):
            hang = kill == 0 and chain in HANG_CHAINS
            stats["mid_run"] += _kill_somewhere(_start(sandbox, trial), state, fal, hang, rng)
            # What the kill left: chunks whose latest attempt no request id answers, and submits
            # the fake saw that the ledger never recorded (only possible inside such an attempt).
            unanswered = _unanswered(state)
            unrecorded |= set(fal.request_ids) - _ledger_ids(state)
            chunk_of = _chunk_of(trial)
            payload_of = dict(zip(fal.request_ids, fal.payloads, strict=True))
            seen = {chunk_of[_sha(fal, payload_of[i])] for i in unrecorded}
            assert seen <= unanswered, (chain, kill)
            assert not hang or seen
        if unanswered := _unanswered(state):
            stats["ambiguous_rows"] += _settle_ambiguous(sandbox, trial, unanswered)
        else:
            assert _run(sandbox, trial) == 0
        stats["unrecorded"] += len(unrecorded)
        assert _duplicates(fal) == len(unrecorded), chain  # paid twice only where forced
        _check_published(trial, fal)
    for folder in sandbox.watched():
        assert [p for p in folder.rglob("*") if p.is_file()] == [], folder
    assert stats["mid_run"] >= CHAINS * KILLS_PER_CHAIN // 2, stats  # kills landed mid-run
    assert stats["ambiguous_rows"] >= len(HANG_CHAINS), stats
    assert stats["unrecorded"] >= len(HANG_CHAINS), stats


def test_ctrl_c_stops_dispatching_keeps_request_ids_and_the_rerun_polls_them(
    fal: FakeFal, sandbox: Sandbox
) -> None:
    trial = sandbox.root / "ctrl-c"
    trial.mkdir()
    state = trial / "out" / ".avatarflow"
    fal.reset()
    fal.latency_s = 4.0  # long enough that requests are in flight when Ctrl-C comes
    try:
        proc = _start(sandbox, trial, "--max-concurrency", "2")
        deadline = time.monotonic() + 120
        while _requests(state) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        assert proc.wait(timeout=60) == 130
        assert time.monotonic() - sent < 15
    finally:
        fal.latency_s = _latency
        proc.kill()
    log = (trial / "log.txt").read_text()
    assert [line for line in log.splitlines() if line.startswith("interrupted:")] == [
        f"interrupted: in-flight fal request ids are kept in {state}; run the same command "
        f"again to resume them without paying twice, or `avatarflow cancel {trial / 'out'}`"
    ]
    kept = Ledger(str(state)).in_flight()
    assert kept
    assert all(r.request_id for r in kept)
    assert set(fal.request_ids) == _ledger_ids(state)  # no submit after the signal went unseen

    assert _run(sandbox, trial) == 0
    assert _duplicates(fal) == 0
    sidecar_ids = {
        i
        for row_id in ROWS
        for i in json.loads((trial / "out" / f"{row_id}.json").read_text())["request_ids"]
    }
    assert {r.request_id for r in kept} <= sidecar_ids  # resumed, not resubmitted
    _check_published(trial, fal)


def test_cancel_cancels_every_in_flight_request_and_a_rerun_resubmits_them(
    fal: FakeFal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fal.reset()
    for key, value in fal.env().items():
        monkeypatch.setenv(key, value)
    fal.latency_s = 30.0
    try:
        with FalQueueClient(FalSettings()) as c:
            url = c.upload(b"RIFF" + b"\0" * 64, "audio/wav")
            ids = [c.submit(f"{APP}/audio-to-video", {"audio_url": url}).request_id for _ in "ab"]
    finally:
        fal.latency_s = _latency
    ledger = Ledger(str(tmp_path / "out" / ".avatarflow"))
    for chunk, request_id in enumerate(ids):
        ledger.record_attempt("row-1", "h" * 64, chunk, f"{APP}/audio-to-video")
        ledger.record_request("row-1", "h" * 64, chunk, request_id, f"{APP}/audio-to-video")
    ledger.record_attempt("row-2", "h" * 64, 0, f"{APP}/audio-to-video")  # ambiguous: no id

    result = invoke("cancel", str(tmp_path / "out"))

    assert result.exit_code == 0, result.output
    for request_id in ids:
        assert f"{request_id}: CANCELLATION_REQUESTED" in result.output
        assert fal.state(request_id) == "COMPLETED"
    assert "row-2 chunk 0: request id unknown" in flat(result.output)
    assert "cancelled 2 of 3" in result.output
    assert fal.key not in result.output


def test_a_second_run_on_a_busy_target_exits_2_naming_the_holder_and_dispatches_nothing(
    fal: FakeFal, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in fal.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AVATARFLOW_TARGET_WAIT", "0")  # refuse at once instead of waiting
    fal.reset()
    target = tmp_path / "out"
    args = ["run", sandbox.manifest, "--backend", "fal", "--target", str(target)]
    with Ledger(str(target / ".avatarflow")).lock():  # the run already going on
        result = invoke(*args, "--work-dir", str(tmp_path / "work"))
    assert result.exit_code == 2, result.output
    holder = f"(pid {os.getpid()}) that holds {target / '.avatarflow'}; started"
    assert holder in flat(result.output)
    assert "gave up after 0 s (AVATARFLOW_TARGET_WAIT=0)" in flat(result.output)
    assert sum(fal.counts.values()) == 0


def test_a_second_run_on_a_local_target_waits_for_the_first_like_on_an_object_store(
    fal: FakeFal, sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in fal.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AVATARFLOW_TARGET_WAIT", raising=False)  # the default: wait
    fal.reset()
    target = tmp_path / "out"
    args = ["run", sandbox.manifest, "--backend", "fal", "--target", str(target)]
    args += ["--chunk-target-s", "11"]
    with contextlib.ExitStack() as first_run:
        first_run.enter_context(Ledger(str(target / ".avatarflow")).lock())
        threading.Timer(3.0, first_run.close).start()  # the first run ends 3 s from now
        result = invoke(*args, "--work-dir", str(tmp_path / "work"))
    assert result.exit_code == 0, result.output
    waiting = f"waiting for a run on host {socket.gethostname()} (pid {os.getpid()}) that holds"
    assert waiting in flat(result.output)
    assert "lease until its process ends" in flat(result.output)
    assert fal.submissions == CHUNKS  # then it ran
