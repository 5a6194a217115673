"""Typed records: JSON round trips, the frame grid, and the shipped sidecar schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avatarflow.tasks.records import (
    V1_GRID,
    Attempt,
    ChunkVideo,
    FrameGrid,
    Published,
    RenderParams,
    Request,
    RowResult,
    Sidecar,
    Timings,
    from_json,
    json_schema,
    to_json,
)

SIDECAR_SCHEMA = Path(__file__).parents[2] / "manifests" / "sidecar.schema.json"


@pytest.mark.parametrize(
    "record",
    [
        Attempt("fal-ai/x/audio-to-video", 2, 1.5),
        Request("req-1", "fal-ai/x/audio-to-video", 2, 3.0, ("req-0",)),
        ChunkVideo("row", 1, "/w/a.mp4", "ab" * 32, "fal", "req-1", 7, 6.0, 0.9, Timings(1, 2)),
        Published(RowResult("row", "published", "s3://b/row.mp4", extra={"lang": "de"}), "h"),
        RenderParams(prompt="hi", resolution="720p", text_guidance_scale=4.0),
    ],
)
def test_records_round_trip_through_json(record: object) -> None:
    text = json.dumps(to_json(record))
    assert from_json(type(record), json.loads(text)) == record


def test_timings_add_phase_by_phase() -> None:
    total = Timings(upload_s=1.0, run_s=2.0) + Timings(run_s=3.0, encode_s=0.5)
    assert total == Timings(upload_s=1.0, run_s=5.0, encode_s=0.5)


@pytest.mark.parametrize(
    ("grid", "duration_s", "segments"),
    [
        (V1_GRID, 0.5, 1),
        (V1_GRID, 93 / 16, 1),  # exactly the first segment
        (V1_GRID, 93 / 16 + 1e-4, 2),
        (V1_GRID, (93 + 80) / 16, 2),
        (FrameGrid(25), 3.72, 1),
        (FrameGrid(25), 3.7201, 2),
    ],
)
def test_segments_for_follows_the_93_plus_80_frame_grid(
    grid: FrameGrid, duration_s: float, segments: int
) -> None:
    assert grid.segments_for(duration_s) == segments
    assert grid.video_s(segments) >= duration_s


def test_segment_joins_sit_on_the_grid() -> None:
    assert V1_GRID.segment_joins(V1_GRID.frames(3)) == [93, 173]
    assert V1_GRID.longest_span_s(60.0) == V1_GRID.video_s(11)  # 93 + 800 frames = 55.8 s


def test_shipped_sidecar_schema_matches_the_record() -> None:
    committed = json.loads(SIDECAR_SCHEMA.read_text())
    assert committed == json_schema(Sidecar), "run `make schema` to refresh it"
