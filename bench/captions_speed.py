"""How long the captions stage's own work takes per narration-minute, recognition excluded
(bench/speech_speed.py times that): aligning a script to recognised words with a recogniser's
mistakes, cutting cues, the captions gate and writing WebVTT and SRT.

Synthetic narrations read at 150 words a minute; the recogniser misses every 7th word, mishears
every 5th and adds one after every 11th (tests/tasks/test_captions.py's model). Prints one
Markdown table row per length.

    .venv/bin/python bench/captions_speed.py [minutes ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the synthetic timings

from avatarflow.tasks.captions import align, build_cues, captions_gate, to_srt, to_vtt  # noqa: E402
from avatarflow.tasks.config import CaptionSettings  # noqa: E402
from tests.tasks.test_captions import SCRIPT, duration_of, mishear, speak  # noqa: E402


def bench(minutes: float) -> tuple[int, float, float]:
    """(script words, narration minutes, seconds of caption work) for one narration."""
    words_wanted = round(150 * minutes)
    base = SCRIPT.split()
    script = " ".join(base[k % len(base)] for k in range(words_wanted))
    heard = mishear(speak(script, rate_wps=2.5))
    duration = duration_of(heard)
    settings = CaptionSettings()
    started = time.perf_counter()
    cues = build_cues(align(script, heard, duration), settings, duration)
    gate = captions_gate(cues, heard, script, duration, settings)
    to_vtt(cues), to_srt(cues)
    elapsed = time.perf_counter() - started
    assert gate.status == "passed", gate.detail
    return words_wanted, duration / 60, elapsed


def main(argv: list[str]) -> None:
    print("| narration min | script words | caption work s | s per narration-minute |")
    print("| --- | --- | --- | --- |")
    for minutes in [float(a) for a in argv] or [1.0, 10.0, 30.0]:
        words, narration_min, elapsed = bench(minutes)
        per_min = elapsed / narration_min
        print(f"| {narration_min:.1f} | {words} | {elapsed:.2f} | {per_min:.3f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
