"""Regenerate manifests/examples/: spoken narration (espeak-ng), a drawn portrait, demo manifests.

Run `.venv/bin/python manifests/make_examples.py` (needs `espeak-ng` on PATH; the committed outputs
do not). Audio is 16 kHz mono and encoded as WAV, MP3 and M4A so the demo exercises each decoder.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

EXAMPLES = Path(__file__).resolve().parent / "examples"
SAMPLE_RATE = 16000
# (file name, container, codec, sentence): each is 3–8 s spoken at espeak's default rate
CLIPS = [
    ("intro.wav", "wav", "pcm_s16le", "Welcome to the course. Today we learn how avatars speak."),
    (
        "lesson-01.mp3",
        "mp3",
        "libmp3lame",
        "In the first lesson, we turn a short narration into a talking video, "
        "one segment at a time.",
    ),
    ("outro.m4a", "ipod", "aac", "Thanks for watching. See you next time."),
]


def speak(sentence: str, dest: Path, container: str, codec: str) -> None:
    """Speak `sentence` with espeak-ng and encode it at 16 kHz mono with PyAV."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "speech.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), sentence], check=True
        )
        with av.open(str(raw)) as src:
            resampler = av.AudioResampler("s16", "mono", SAMPLE_RATE)
            frames = [f for frame in src.decode(audio=0) for f in resampler.resample(frame)]
            frames += resampler.resample(None)
    pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).reshape(1, -1)
    with av.open(str(dest), "w", format=container) as out:
        stream = out.add_stream(codec, rate=SAMPLE_RATE, layout="mono")
        if codec == "libmp3lame":
            stream.bit_rate = 48_000
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, 0  # pts 0: the muxer records AAC priming
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


def draw_portrait(dest: Path, size: int = 256) -> None:
    """Draw a simple friendly face (a stand-in reference portrait)."""
    image = Image.new("RGB", (size, size), (214, 228, 240))
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.rectangle((40 * s, 200 * s, 216 * s, 256 * s), fill=(60, 90, 140))  # shoulders
    draw.ellipse((68 * s, 40 * s, 188 * s, 190 * s), fill=(236, 196, 164))  # face
    draw.chord((62 * s, 28 * s, 194 * s, 130 * s), 180, 360, fill=(90, 60, 40))  # hair
    for x in (100, 156):
        draw.ellipse(((x - 8) * s, 100 * s, (x + 8) * s, 114 * s), fill=(40, 40, 40))  # eyes
    draw.arc((104 * s, 130 * s, 152 * s, 164 * s), 20, 160, fill=(150, 60, 60), width=4)  # smile
    image.save(dest, optimize=True)


def demo_table() -> pa.Table:
    """Three narrated rows with a prompt on one, distinct seeds and a passthrough `course`."""
    return pa.table(
        {
            "id": ["intro", "lesson-01", "outro"],
            "audio": [name for name, *_ in CLIPS],
            "prompt": ["A friendly teacher talks to the camera in a bright classroom.", None, None],
            "seed": pa.array([11, 22, 33], pa.int64()),
            "resolution": ["480p", "480p", "480p"],
            "course": ["avatars-101", "avatars-101", "avatars-101"],
        }
    )


def ai2v_table() -> pa.Table:
    """One row in image+audio-to-video mode, using the drawn portrait."""
    return pa.table(
        {
            "id": ["welcome-portrait"],
            "audio": ["intro.wav"],
            "image": ["portrait.png"],
            "prompt": ["The person in the portrait greets the viewer warmly."],
            "seed": pa.array([44], pa.int64()),
            "course": ["avatars-101"],
        }
    )


def write_manifests(table: pa.Table, stem: str) -> None:
    """Write the table as Parquet, CSV and JSON Lines with identical content."""
    pq.write_table(table, EXAMPLES / f"{stem}.parquet")
    pa_csv.write_csv(table, EXAMPLES / f"{stem}.csv")
    lines = (json.dumps(row, ensure_ascii=False) for row in table.to_pylist())
    (EXAMPLES / f"{stem}.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    for name, container, codec, sentence in CLIPS:
        speak(sentence, EXAMPLES / name, container, codec)
    draw_portrait(EXAMPLES / "portrait.png")
    write_manifests(demo_table(), "demo")
    pq.write_table(ai2v_table(), EXAMPLES / "demo_ai2v.parquet")


if __name__ == "__main__":
    main()
