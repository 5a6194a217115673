"""Tests for tasks/plan.py: segment counts, chunking, cost, seeds, input hash, budget gate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from avatarflow.tasks.audio import probe_audio
from avatarflow.tasks.captions import captions_key
from avatarflow.tasks.config import BatchConfig, CaptionSettings, LocalSettings
from avatarflow.tasks.ledger import Ledger
from avatarflow.tasks.plan import Admission, PlanError, derive_seed, plan_row
from avatarflow.tasks.records import (
    V1_GRID,
    AudioInfo,
    FrameGrid,
    Row,
    RowPlan,
    RowPlanTotals,
    RowResult,
)
from avatarflow.tasks.workdir import WorkDir
from tests.factories import make_audio, make_plan, make_row, with_params
from tests.media_factory import speechlike, write_audio

CONFIG = BatchConfig(
    manifest="m.parquet", backend="fal", chunk_target_s=20.0, chunk_window_s=4.0, chunk_min_s=3.0
)


def _audio(duration_s: float, sha: str = "a" * 64) -> AudioInfo:
    """An AudioInfo for a short narration (plan_row only reads PCM when it must cut)."""
    return make_audio(duration_s, source="n.wav", sha256=sha)


@pytest.mark.parametrize(
    ("duration_s", "segments"),
    [
        (0.5, 1),
        (5.8125, 1),
        (5.8126, 2),
        (10.8125, 2),
        (10.8126, 3),
        (15.8125, 3),
        (60.0, 12),
    ],
)
def test_segments_for_duration_at_the_grid_boundaries(duration_s: float, segments: int) -> None:
    assert V1_GRID.segments_for(duration_s) == segments


def test_segments_follow_the_frame_grid_at_other_frame_rates() -> None:
    # v1.5 at 25 fps: 93 frames = 3.72 s, then +3.2 s per segment
    grid = FrameGrid(25)
    assert grid.segments_for(3.72) == 1
    assert grid.segments_for(3.7201) == 2
    assert grid.video_s(2) == pytest.approx(6.92)


def test_short_row_is_one_chunk_priced_per_video_second() -> None:
    row = Row(index=0, id="intro", audio="n.wav", seed=7)
    plan = plan_row(row, _audio(7.0), CONFIG)
    assert [(c.start_s, c.end_s, c.num_segments) for c in plan.chunks] == [(0.0, 7.0, 2)]
    assert plan.seed == 7
    assert plan.video_s == 10.8125
    assert plan.billable_units == pytest.approx(10.8125)
    assert plan.estimated_cost_usd == pytest.approx(10.8125 * 0.15)


def test_a_fal_row_with_captions_is_estimated_with_its_whisper_request() -> None:
    from avatarflow.tasks.speech import whisper_estimate

    spoken = replace(Row(0, "a", "n.wav"), transcript="Hello there.")
    plain = plan_row(Row(0, "a", "n.wav"), _audio(7.0), CONFIG)  # no transcript: no captions
    captioned = plan_row(spoken, _audio(7.0), CONFIG)  # auto: fal times the script
    whisper_usd = whisper_estimate(CONFIG.fal, 7.0)[1]
    assert whisper_usd > 0
    assert captioned.estimated_cost_usd == pytest.approx(plain.estimated_cost_usd + whisper_usd)
    assert captioned.billable_units == plain.billable_units  # the render's units only
    off = plan_row(spoken, _audio(7.0), CONFIG.model_copy(update={"captions": "off"}))
    assert off.estimated_cost_usd == pytest.approx(plain.estimated_cost_usd)


def test_720p_costs_twice_480p_and_bills_four_units_per_second() -> None:
    low = plan_row(Row(0, "a", "n.wav"), _audio(12.0), CONFIG)
    high = plan_row(make_row("a", "n.wav", resolution="720p"), _audio(12.0), CONFIG)
    assert high.estimated_cost_usd == pytest.approx(2 * low.estimated_cost_usd)
    assert high.billable_units == pytest.approx(4 * high.video_s)
    assert low.billable_units == pytest.approx(low.video_s)


def test_long_row_is_cut_into_chunks_that_tile_the_audio(tmp_path: Path) -> None:
    pauses = [(3.3 + 3.7 * i, 3.7 + 3.7 * i) for i in range(12)]
    wav = write_audio(tmp_path / "n.wav", speechlike(47.0, 16000, pauses), 16000, "wav")
    audio = probe_audio(str(wav), WorkDir(tmp_path / "work").audio)
    plan = plan_row(Row(0, "long", str(wav)), audio, CONFIG)
    assert len(plan.chunks) >= 3
    assert plan.chunks[0].start_s == 0.0
    assert plan.chunks[-1].end_s == audio.duration_s
    for before, after in zip(plan.chunks, plan.chunks[1:], strict=False):
        assert before.end_s == after.start_s
    max_segments = V1_GRID.segments_for(V1_GRID.longest_span_s(CONFIG.chunk_target_s))
    for i, chunk in enumerate(plan.chunks):
        assert chunk.index == i
        assert chunk.num_segments == V1_GRID.segments_for(chunk.duration_s) <= max_segments
        assert chunk.video_s >= chunk.duration_s
    assert plan.num_segments == sum(c.num_segments for c in plan.chunks)


def test_num_segments_override_is_one_chunk_or_a_plan_error() -> None:
    plan = plan_row(Row(0, "a", "n.wav", num_segments=5), _audio(12.0), CONFIG)
    assert [(c.end_s, c.num_segments) for c in plan.chunks] == [(12.0, 5)]
    with pytest.raises(PlanError) as info:
        plan_row(Row(3, "b", "n.wav", num_segments=2), _audio(12.0), CONFIG)
    error = info.value.error
    assert (error.row, error.id, error.column, error.kind) == (
        3,
        "b",
        "num_segments",
        "too_few_segments",
    )
    assert "at least 3" in error.reason


def test_missing_seed_is_derived_stably_from_the_id() -> None:
    first = plan_row(Row(0, "lesson-01", "n.wav"), _audio(4.0), CONFIG)
    again = plan_row(Row(5, "lesson-01", "other.wav"), _audio(4.0), CONFIG)
    other = plan_row(Row(0, "lesson-02", "n.wav"), _audio(4.0), CONFIG)
    assert first.seed == again.seed == derive_seed("lesson-01")
    assert first.seed != other.seed
    assert 0 <= first.seed < 2**32


def test_input_hash_tracks_render_inputs_only() -> None:
    row = make_row("a", "n.wav", prompt="hello", seed=1, extra={"course": "x"})
    base = plan_row(row, _audio(4.0), CONFIG).input_hash
    assert plan_row(replace(row, extra={"course": "y"}), _audio(4.0), CONFIG).input_hash == base
    fal = CONFIG.model_copy(update={"backend": "fal"})
    assert plan_row(row, _audio(4.0), fal).input_hash == base
    changed = [
        plan_row(with_params(row, prompt="bye"), _audio(4.0), CONFIG),
        plan_row(replace(row, seed=2), _audio(4.0), CONFIG),
        plan_row(with_params(row, resolution="720p"), _audio(4.0), CONFIG),
        plan_row(with_params(row, num_inference_steps=8), _audio(4.0), CONFIG),
        plan_row(with_params(row, negative_prompt="blur"), _audio(4.0), CONFIG),
        plan_row(with_params(row, text_guidance_scale=4.0), _audio(4.0), CONFIG),
        plan_row(with_params(row, audio_guidance_scale=4.0), _audio(4.0), CONFIG),
        plan_row(replace(row, num_segments=3), _audio(4.0), CONFIG),
        plan_row(row, _audio(4.0, sha="b" * 64), CONFIG),
        plan_row(row, _audio(4.0), CONFIG, image_sha256="c" * 64),
    ]
    hashes = {p.input_hash for p in changed}
    assert base not in hashes
    assert len(hashes) == len(changed)


def _admitted(plans: list, budget_usd: float | None, tmp_path: Path) -> list[str]:
    """Row ids that Admission dispatches, in manifest order, with an empty ledger."""
    config = CONFIG.model_copy(update={"budget_usd": budget_usd, "target": str(tmp_path)})
    admission = Admission(config)
    held = {p.row.id: admission.admit(p) for p in plans}
    assert all(r is None or "budget" in (r.error or "") for r in held.values())
    return [row_id for row_id, result in held.items() if result is None]


def test_budget_dispatches_a_prefix_of_the_manifest(tmp_path: Path) -> None:
    plans = [
        plan_row(Row(i, f"r{i}", "n.wav"), _audio(d), CONFIG) for i, d in enumerate([5, 10, 5, 1])
    ]
    costs = [p.estimated_cost_usd for p in plans]
    # r3 alone would fit, but dispatch stops at the first row over budget
    assert _admitted(plans, costs[0] + costs[1], tmp_path / "a") == ["r0", "r1"]
    assert _admitted(plans, None, tmp_path / "b") == ["r0", "r1", "r2", "r3"]
    assert _admitted(plans, 0.0, tmp_path / "c") == []


def test_summarize_totals_the_plans() -> None:
    plans = [
        plan_row(Row(0, "a", "n.wav"), _audio(5.0), CONFIG),
        plan_row(make_row("b", "n.wav", index=1, resolution="720p"), _audio(11.0), CONFIG),
    ]
    summary = RowPlanTotals.of(plans)
    assert summary.rows == 2
    assert summary.chunks == 2
    assert summary.segments == 1 + 3
    assert summary.audio_s == 16.0
    assert summary.video_s == pytest.approx(5.8125 + 15.8125)
    assert summary.billable_units == pytest.approx(5.8125 + 4 * 15.8125)
    assert summary.estimated_cost_usd == pytest.approx(5.8125 * 0.15 + 15.8125 * 0.30)
    assert RowPlanTotals.of(iter(plans)) == summary  # any iterable
    assert RowPlanTotals.of([]) == RowPlanTotals()


def test_local_backend_rows_cost_nothing() -> None:
    local = CONFIG.model_copy(update={"backend": "local"})
    plan = plan_row(Row(0, "a", "n.wav"), _audio(12.0), local)
    assert plan.video_s == pytest.approx(15.8125)
    assert plan.estimated_cost_usd == 0.0
    assert plan.billable_units == 0.0


def test_a_local_v15_checkpoint_plans_on_its_25_fps_grid(tiny_checkpoint_v15: Path) -> None:
    local = CONFIG.model_copy(
        update={"backend": "local", "local": LocalSettings(model_dir=str(tiny_checkpoint_v15))}
    )
    plan = plan_row(Row(0, "a", "n.wav"), _audio(5.0), local)
    # 5 s at 25 fps is 125 frames: 93 + 80 → 2 segments (at 16 fps it would be 1)
    assert [(c.fps, c.num_segments) for c in plan.chunks] == [(25, 2)]
    assert plan.video_s == pytest.approx(173 / 25)


def test_a_published_row_is_skipped_only_with_the_captions_this_run_wants(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    config = BatchConfig(manifest="m.parquet", target=str(target), captions="all")
    plan = make_plan(replace(make_row("intro"), transcript="Hello there."))
    files = {ext: target / f"intro.{ext}" for ext in ("mp4", "vtt", "srt")}
    for path in files.values():
        path.write_bytes(b"x")
    result = RowResult(
        "intro",
        "published",
        video_url=str(files["mp4"]),
        captions_vtt_url=str(files["vtt"]),
        captions_srt_url=str(files["srt"]),
    )
    ledger = Ledger.for_run(config)
    ledger.record_published(result, plan.input_hash, captions_key(plan.row, config))

    def admitted(config: BatchConfig, plan: RowPlan = plan) -> bool:
        return Admission(config).admit(plan) is None

    assert not admitted(config)  # finished, captions included: skipped
    assert admitted(config, replace(plan, row=replace(plan.row, transcript="Hi.")))  # new script
    assert admitted(config.model_copy(update={"caption_settings": CaptionSettings(max_cps=12)}))
    assert admitted(config.model_copy(update={"captions": "vtt"}))  # other outputs
    assert not admitted(config.model_copy(update={"captions": "off"}))  # none wanted
    files["srt"].unlink()
    assert admitted(config)  # a caption file is gone: finished again
    ledger.record_published(result, plan.input_hash)  # published before captions existed
    assert not admitted(config.model_copy(update={"captions": "off"}))
    assert admitted(config)
