"""Tests for avatarflow.tasks.cpu: media work holds one of the process's per-core slots."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from avatarflow.tasks import cpu


def test_no_more_blocks_run_at_once_than_the_process_has_cores() -> None:
    lock, inside, most = threading.Lock(), 0, 0

    def work(_: int) -> None:
        nonlocal inside, most
        with cpu.cpu_slot():
            with lock:
                inside += 1
                most = max(most, inside)
            time.sleep(0.02)
            with lock:
                inside -= 1

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(work, range(48)))
    assert most == cpu._cores()


def test_a_block_that_raises_gives_its_slot_back() -> None:
    for _ in range(cpu._cores() + 1):
        try:
            with cpu.cpu_slot():
                raise ValueError("a stage's own error")
        except ValueError:
            pass
    acquired = cpu._SLOTS.acquire(timeout=1)  # every slot is free again
    assert acquired
    cpu._SLOTS.release()
