"""No state outlives a run: a stopped run leaves the next run in the same process free to publish,
a stop aimed at one run leaves the others alone, progress events reach only their own run's
listeners, and the temp files a killed publish left under _rejected/ are swept."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks import progress, stop
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.records import ChunkRendered, ProgressEvent, RowFinished
from tests.factories import narrated_manifest
from tests.fakes.fal_server import FakeFal

pytestmark = pytest.mark.usefixtures("prefect_server")

FAKE_FAL_LATENCY_S = 0.5  # long enough that a stop lands while later rows still wait
ROWS = {"one": 3.0, "two": 3.5, "three": 4.0}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    return narrated_manifest(tmp_path_factory.mktemp("run-state"), ROWS)


def _config(fake: FakeFal, manifest: str, folder: Path, **options: object) -> BatchConfig:
    return BatchConfig(
        manifest=manifest,
        target=str(folder / "out"),
        backend="fal",
        work_dir=str(folder / "work"),
        fal=fake.settings(),
        **options,
    )


def test_a_stopped_run_leaves_the_next_run_in_the_process_free_to_publish(
    fake: FakeFal, manifest: str, tmp_path: Path
) -> None:
    def stop_after_the_first_chunk(event: ProgressEvent) -> None:
        if isinstance(event, ChunkRendered):
            stop.request_stop()  # what Ctrl-C does: every run of this process stops

    # One request at a time: when the first chunk is back, the other rows are still waiting.
    config = _config(fake, manifest, tmp_path, max_concurrency=1)
    with progress.listening(stop_after_the_first_chunk):
        stopped = run_batch(config)

    failed = [r for r in stopped.results if r.status == "failed"]
    assert failed, "the stop came too late to stop anything"
    assert all("RenderStopped" in (r.error or "") for r in failed)

    again = run_batch(config)

    assert [r.status for r in again.results] == ["published"] * len(ROWS)
    assert fake.submissions == len(ROWS)  # an interrupted request was resumed, not paid twice


def test_a_stop_for_one_run_leaves_the_others_running() -> None:
    mine, other = uuid.uuid4(), uuid.uuid4()
    seen: dict[str, bool] = {}
    other_started, stopped = threading.Event(), threading.Event()

    def other_run() -> None:
        with stop.owned(other):
            other_started.set()
            stopped.wait(5)
            seen["other"] = stop.stop_requested()

    thread = threading.Thread(target=other_run)
    thread.start()
    other_started.wait(5)
    with stop.owned(mine):
        stop.request_stop(mine)  # e.g. the cancel hook of this run
        seen["mine"] = stop.stop_requested()
        with pytest.raises(stop.RenderStopped):
            stop.wait_unless_stopped(5)
    stopped.set()
    thread.join(5)
    assert seen == {"mine": True, "other": False}
    assert not stop.stop_requested()  # outside any run nothing is stopped


def test_progress_events_reach_only_their_own_runs_listeners(fake: FakeFal, tmp_path: Path) -> None:
    manifests = {
        name: narrated_manifest(tmp_path / name, {f"{name}-{i}": 3.0 for i in range(2)})
        for name in ("a", "b")
    }
    heard: dict[str, list[str]] = {"a": [], "b": []}

    def run(name: str) -> list[str]:
        def listen(event: ProgressEvent) -> None:
            if isinstance(event, ChunkRendered | RowFinished):
                heard[name].append(event.id)

        config = _config(fake, manifests[name], tmp_path / name)
        with progress.listening(listen):
            return [r.status for r in run_batch(config).results]

    with ThreadPoolExecutor(2) as pool:  # both runs at once, in one process
        statuses = list(pool.map(run, ["a", "b"]))

    assert statuses == [["published"] * 2] * 2
    # Each row's chunk and its finish, of this run only.
    assert sorted(heard["a"]) == ["a-0", "a-0", "a-1", "a-1"]
    assert sorted(heard["b"]) == ["b-0", "b-0", "b-1", "b-1"]


def test_a_run_sweeps_what_a_killed_publish_left_under_rejected(
    fake: FakeFal, tmp_path: Path
) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    rejected = tmp_path / "out" / "_rejected"
    rejected.mkdir(parents=True)
    torn = rejected / f".one.mp4.tmp-{int(dead.stdout)}-{'0' * 32}"
    torn.write_bytes(b"half a video")
    kept = rejected / "one.mp4"
    kept.write_bytes(b"a whole video")
    empty = tmp_path / "manifest.csv"
    empty.write_text("id,audio\n")  # no rows: the run only sweeps, publishes its results

    run_batch(_config(fake, str(empty), tmp_path))

    assert sorted(rejected.iterdir()) == [kept]
