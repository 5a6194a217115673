"""Benchmark: our concat_row (PyAV stream copy + master AAC mux) against ffmpeg's concat demuxer.

Generates 120 x 5 s 832x480 16 fps H.264 segments and a 10-minute narration once into bench/_work/,
then times each method (best of 3) and prints a markdown table row.
Run: .venv/bin/python bench/concat_speed.py
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
import wave
from collections.abc import Callable
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avatarflow.tasks.concat import concat_row, encode_master_audio  # noqa: E402
from avatarflow.tasks.verify import verify_final  # noqa: E402

WORK = Path(__file__).resolve().parent / "_work"
SEGMENTS, SEGMENT_FRAMES, FPS = 120, 80, 16
WIDTH, HEIGHT = 832, 480
SAMPLE_RATE = 16_000
REPEATS = 3


def make_segments() -> list[Path]:
    """Encode the test segments once (x264 ultrafast); reuse them on later runs."""
    folder = WORK / "segments"
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"seg_{i:03d}.mp4" for i in range(SEGMENTS)]
    ramp = np.linspace(0, 255, WIDTH, dtype=np.uint8)
    base = np.stack([np.tile(ramp, (HEIGHT, 1))] * 3, axis=-1)
    for index, path in enumerate(paths):
        if path.exists():
            continue
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264", rate=FPS, options={"preset": "ultrafast"})
            stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
            for n in range(SEGMENT_FRAMES):
                # A moving ramp plus a per-segment block: cheap to make, not trivially compressible.
                image = np.roll(base, 7 * n + index, axis=1)
                image[40:120, 40 + n * 4 : 120 + n * 4] = (index * 2) % 256
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = n
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return paths


def make_narration() -> Path:
    """Write a 10-minute mono 16 kHz WAV (a warbling tone) once."""
    path = WORK / "narration.wav"
    if not path.exists():
        t = np.arange(SEGMENTS * SEGMENT_FRAMES * SAMPLE_RATE // FPS) / SAMPLE_RATE
        tone = 0.3 * np.sin(2 * np.pi * (220 + 40 * np.sin(t)) * t)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(SAMPLE_RATE)
            out.writeframes((tone * 32767).astype("<i2").tobytes())
    return path


def best_of(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Time each run REPEATS times, taking turns so outside load hits all alike; keep the best."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(REPEATS):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def ffmpeg_concat(paths: list[Path], out: Path, *extra: str) -> None:
    """Run ffmpeg's concat demuxer with stream copy (extra: more inputs and options)."""
    listing = WORK / "list.txt"
    listing.write_text("".join(f"file '{p}'\n" for p in paths))
    command = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-f", "concat", "-safe", "0"]
    subprocess.run([*command, "-i", str(listing), *extra, str(out)], check=True)


def main() -> None:
    start = time.perf_counter()
    paths = make_segments()
    wav = make_narration()
    print(f"inputs ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    master = WORK / "narration.m4a"
    encode_s = best_of({"encode": lambda: encode_master_audio(wav, master)})["encode"]
    ours = WORK / "ours.mp4"
    frames = [SEGMENT_FRAMES] * SEGMENTS
    mux_args = ("-i", str(master), "-map", "0:v", "-map", "1:a", "-c", "copy", "-shortest")
    best = best_of(
        {
            "ours": lambda: concat_row(paths, frames, master, ours, fps=FPS),
            "plain": lambda: ffmpeg_concat(paths, WORK / "ffmpeg_plain.mp4", "-c", "copy"),
            "muxed": lambda: ffmpeg_concat(
                paths, WORK / "ffmpeg_mux.mp4", *mux_args, "-movflags", "+faststart"
            ),
        }
    )
    ours_s, plain_s, muxed_s = best["ours"], best["plain"], best["muxed"]
    verdict = verify_final(ours, SEGMENTS * SEGMENT_FRAMES / FPS, SAMPLE_RATE, fps=FPS)
    print(f"our output passes verify_final: {verdict.passed} {verdict.reasons}", file=sys.stderr)
    machine = f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, Python "
    machine += platform.python_version()
    print(
        "| date | machine | segments | master AAC encode (s) | concat_row copy+mux (s) "
        "| ffmpeg concat -c copy (s) | ratio | ffmpeg concat + mux + faststart (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {datetime.date.today()} | {machine} | {SEGMENTS} x {SEGMENT_FRAMES / FPS:g} s "
        f"{WIDTH}x{HEIGHT} | {encode_s:.2f} | {ours_s:.2f} | {plain_s:.2f} "
        f"| {ours_s / plain_s:.2f} | {muxed_s:.2f} |"
    )


if __name__ == "__main__":
    main()
