"""Every QC gate on the fal path: the loopback fal renders a talking face, and a batch with many
requests in flight publishes every row, chunk joins and a portrait included, nothing skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks.config import QC_GATES, BatchConfig
from avatarflow.tasks.media import probe_video
from avatarflow.tasks.qc import run_gates
from tests.factories import write_manifest, write_narrations
from tests.fakes.fal_server import AI2V, FakeFal, encode_face
from tests.media_factory import write_audio, write_image
from tests.qc_factory import narration

FAKE_FAL_LATENCY_S = 1.0  # long enough for every first chunk to be in flight at once
IN_FLIGHT = 8


def test_a_face_render_follows_its_own_audio_not_another(tmp_path: Path) -> None:
    """The fake's mouth moves with the request's audio: against that audio every gate passes and
    mouth motion follows loudness closely; against another narration it hardly does."""
    own = write_audio(tmp_path / "own.wav", narration(5.0, seed=11), 16_000, "wav")
    other = write_audio(tmp_path / "other.wav", narration(5.0, seed=12), 16_000, "wav")
    video = tmp_path / "chunk.mp4"
    video.write_bytes(encode_face(93, 832, 480, own.read_bytes()))

    ours = run_gates(video, own, expected_frames=93)
    theirs = run_gates(video, other, expected_frames=93)

    assert ours.passed, [g.detail for g in ours.gates if g.status != "passed"]
    assert ours.gate("face").value == 1.0
    assert ours.gate("lipsync").measured["corr"] > 0.9
    assert theirs.gate("lipsync").measured["corr"] < 0.5


@pytest.mark.usefixtures("prefect_server")
def test_every_gate_passes_on_the_fal_path_with_many_requests_in_flight(
    fake: FakeFal, tmp_path: Path
) -> None:
    lengths = {"long": 26.0, "portrait": 4.5, "square": 5.0}
    lengths |= {f"talk{i}": 3.5 + 0.7 * i for i in range(IN_FLIGHT - 2)}
    rows = write_narrations(tmp_path, lengths)
    images = {"portrait": (90, 160), "square": (120, 120)}  # fal's 480x832 and 640x640 buckets
    for row in rows:  # every row has the column (Parquet takes the schema from the first row)
        size = images.get(row["id"])
        row["image"] = (
            str(write_image(tmp_path / "media" / f"{row['id']}.png", size)) if size else None
        )
    target = tmp_path / "out"
    config = BatchConfig(
        manifest=write_manifest(tmp_path / "manifest.parquet", rows),
        target=str(target),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
        max_concurrency=IN_FLIGHT,
        chunk_target_s=11.0,  # chunks of at most 2 segments: the long row needs 3 or more
    )

    outcome = run_batch(config)

    assert [(r.id, r.status) for r in outcome.results] == [(i, "published") for i in lengths], [
        r.error for r in outcome.results
    ]
    assert outcome.exit_code == 0
    assert fake.max_in_progress == IN_FLIGHT
    table = {r["id"]: r for r in pq.read_table(target / "results.parquet").to_pylist()}
    for row_id in lengths:
        statuses = {gate: table[row_id][f"qc_{gate}_status"] for gate in QC_GATES}
        assert statuses == dict.fromkeys(QC_GATES, "passed"), row_id
    long = json.loads((target / "long.json").read_text())
    assert len(long["chunks"]) >= 3
    seams = next(g for g in long["qc"]["gates"] if g["name"] == "seams")
    assert seams["measured"]["joins"] >= len(long["chunks"]) - 1  # every chunk join was judged
    # The continuation chunks were rendered from a frame of chunk 0, in separate requests.
    assert fake.counts[AI2V] >= len(long["chunks"]) - 1 + 2
    tall, square = (
        probe_video(str(target / "portrait.mp4")),
        probe_video(str(target / "square.mp4")),
    )
    assert (tall.width, tall.height) == (480, 832)
    assert (square.width, square.height) == (640, 640)
