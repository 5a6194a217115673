"""Benchmark: speech recognition per minute of narration (avatarflow.tasks.speech.recognise).

Local: the tiny random-weight Whisper of `avatarflow model init-tiny` on CPU, one torch thread,
over a 1-minute speech-like narration: load time once, then recognition wall and CPU seconds per
narration-minute (best of --repeats, each on a fresh ledger so nothing is taken from it). The tiny
model's time is the code path's overhead (feature extraction, generate with word timestamps, DTW,
our word cleanup), not large-v3's speed.

fal: the cost of fal-ai/whisper per video-minute from FalSettings' documented price and estimate,
and, as a check of the billing path, one request to the loopback fake (tests/fakes/fal_server.py)
priced from its x-fal-billable-units header.
Run: .venv/bin/python bench/speech_speed.py [--repeats 2]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from avatarflow.tasks import speech  # noqa: E402
from avatarflow.tasks.config import BatchConfig, FalSettings  # noqa: E402
from avatarflow.tasks.ledger import Ledger  # noqa: E402
from tests.factories import make_plan, make_row  # noqa: E402
from tests.fakes.fal_server import FakeFal  # noqa: E402
from tests.media_factory import write_narration  # noqa: E402

MINUTE_S = 60.0


def local_per_minute(work: Path, wav: Path, repeats: int) -> tuple[float, float, float, int]:
    """(load s, best wall s, its CPU s, words) of recognising the minute on the tiny Whisper."""
    from avatarflow.model.tiny import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(work / "tiny")
    base = {"manifest": "m.jsonl", "work_dir": str(work / "w")}
    local = {"model_dir": str(checkpoint), "device": "cpu"}
    folder = speech.whisper_folder(BatchConfig(**base, local=local))
    assert folder is not None
    started = time.perf_counter()
    speech.whisper_pipeline(folder)
    load_s = time.perf_counter() - started
    best = (float("inf"), 0.0, 0)
    for i in range(repeats):
        config = BatchConfig(**base, target=str(work / f"out-{i}"), local=local)
        wall, cpu = time.perf_counter(), time.process_time()
        words = speech.recognise(make_plan(make_row(f"r{i}")), str(wav), config)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, len(words))
    return load_s, *best


def fal_fake_cost(work: Path, wav: Path) -> tuple[float, float]:
    """(billed units, USD) of one fal-ai/whisper request on the fake, as the ledger records it."""
    with FakeFal(latency_s=0.05) as fake:
        os.environ.update(fake.env())
        config = BatchConfig(
            manifest="m.jsonl",
            target=str(work / "fal-out"),
            work_dir=str(work / "fal-w"),
            backend="fal",
            fal=fake.settings(speech_recognition=True, concurrency_limit=None),
        )
        speech.recognise(make_plan(make_row("fal")), str(wav), config)
        kept = Ledger.for_run(config).recognised("fal", make_plan().input_hash)
        assert kept is not None
        return kept.billable_units, kept.cost_usd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wav = write_narration(work / "minute.wav", MINUTE_S)
        load_s, wall_s, cpu_s, words = local_per_minute(work, wav, args.repeats)
        units, usd = fal_fake_cost(work, wav)
    price = FalSettings()
    est_units, est_usd = speech.whisper_estimate(price, MINUTE_S)
    print(f"# {datetime.date.today()} {platform.node()} {os.cpu_count()} CPUs")
    print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| what | per narration-minute |")
    print("| --- | --- |")
    print(f"| tiny Whisper load (once per process) | {load_s:.2f} s |")
    print(f"| tiny Whisper recognition, wall (best of {args.repeats}) | {wall_s:.2f} s |")
    print(f"| tiny Whisper recognition, CPU | {cpu_s:.2f} s ({words} words) |")
    print(
        f"| fal-ai/whisper estimate (defaults) | {est_units:.2f} units, ${est_usd:.4f} "
        f"(${price.whisper_price_per_unit}/unit × {price.whisper_units_per_audio_s} units/s) |"
    )
    print(f"| fal-ai/whisper on the fake, as billed | {units:.2f} units, ${usd:.4f} |")


if __name__ == "__main__":
    main()
