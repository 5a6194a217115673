"""QC gates: a good synthetic render passes every gate; each defect fails exactly its gate."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from avatarflow.flows.cli import app
from avatarflow.tasks.config import QCSettings
from avatarflow.tasks.qc import GATES, QCInputError, run_gates
from avatarflow.tasks.records import to_json
from tests.media_factory import write_audio
from tests.qc_factory import (
    Render,
    talking_head,
    with_audio_delay,
    with_black,
    with_colour_jump,
    with_freeze,
    write_render,
)

SEAM = 93  # the first model segment join at 16 fps


@pytest.fixture(scope="module")
def render() -> Render:
    """One 12 s 256x256 good render (192 frames: joins at 93 and 173)."""
    return talking_head(12.0)


@pytest.fixture(scope="module")
def videos(render: Render, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The good render and every defect derived from it, as MP4s."""
    folder = tmp_path_factory.mktemp("qc")
    short_audio = dataclasses.replace(render, audio=render.audio[: -render.sample_rate])
    cases = {
        "good": render,
        "black": with_black(render, 5.0, 1.0),
        "frozen": with_freeze(render, 4.0, 3.0),
        "faceless": talking_head(12.0, face=False),
        "audio_late": with_audio_delay(render, 5),
        "seam_colour": with_colour_jump(render, SEAM, (8, 0, -8)),
        "cut": with_colour_jump(render, 120, (30, 0, -30)),
        "short_audio": short_audio,
    }
    return {name: write_render(folder / f"{name}.mp4", case) for name, case in cases.items()}


def _invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["qc", *map(str, args)])
    return result.exit_code, result.output


def _table_rows(output: str) -> list[list[str]]:
    """The cells of each gate row of the rich table (continuation lines left out)."""
    rows = [line.split("│") for line in output.splitlines() if line.startswith("│")]
    return [cells for cells in rows if cells[1].strip()]


def test_the_good_render_passes_every_gate(videos: dict[str, Path]) -> None:
    report = run_gates(videos["good"])
    assert report.passed
    assert [g.name for g in report.gates] == list(GATES)
    assert {g.name: g.status for g in report.gates} == dict.fromkeys(GATES, "passed")
    assert report.frames == 192
    assert report.gate("duration").value == 0
    assert report.gate("black").value == 0
    assert report.gate("face").value == 1.0
    lipsync = report.gate("lipsync")
    assert lipsync.value == 0
    assert lipsync.measured["corr"] >= 0.8
    seams = report.gate("seams")
    assert seams.measured["joins"] == 2  # 93 and 173 on the model's grid
    assert seams.value < 0.1


@pytest.mark.parametrize(
    ("case", "gates", "value", "threshold"),
    [
        ("black", {"black"}, 1.0, 0.1),  # seconds of black
        ("frozen", {"freeze"}, pytest.approx(3.0, abs=0.15), 1.0),  # seconds frozen
        ("faceless", {"face"}, 0.0, 0.8),  # share of sampled frames with a face
        ("audio_late", {"lipsync"}, 5, 2),  # offset in frames
        ("short_audio", {"duration", "sync"}, 16, 1),  # frames more than the audio covers
    ],
)
def test_each_defect_fails_exactly_its_gate(
    videos: dict[str, Path], case: str, gates: set[str], value: object, threshold: float
) -> None:
    report = run_gates(videos[case])
    assert not report.passed
    assert set(report.failed) == gates
    first = report.gate(sorted(gates)[0])
    assert first.value == value
    assert first.threshold == threshold


def test_black_frames_are_timed_and_not_counted_as_frozen_or_faceless(
    videos: dict[str, Path],
) -> None:
    report = run_gates(videos["black"])
    assert report.gate("black").measured == {"start_frame": 80, "frames": 16}
    assert report.gate("freeze").status == "passed"
    assert report.gate("face").value == 1.0  # black samples are not looked at
    assert report.gate("seams").status == "passed"  # nor compared across


@pytest.mark.parametrize("case", ["good", "black", "seam_colour"])
def test_a_render_in_another_pixel_format_is_judged_alike(
    render: Render, tmp_path: Path, videos: dict[str, Path], case: str
) -> None:
    # 4:2:0 frames are read from the decoder's planes; others are converted first.
    cases = {
        "good": render,
        "black": with_black(render, 5.0, 1.0),
        "seam_colour": with_colour_jump(render, SEAM, (8, 0, -8)),
    }
    other = write_render(tmp_path / f"{case}.444.mp4", cases[case], pix_fmt="yuv444p")
    with av.open(str(other)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv444p"
    usual, converted = run_gates(videos[case]), run_gates(other)
    assert converted.failed == usual.failed
    assert converted.gate("black").measured == usual.gate("black").measured
    assert converted.gate("face").value == pytest.approx(usual.gate("face").value, abs=0.1)


def test_a_faceless_clip_cannot_be_lip_synced(videos: dict[str, Path]) -> None:
    lipsync = run_gates(videos["faceless"]).gate("lipsync")
    assert lipsync.status == "skipped"
    assert "no face" in lipsync.detail


def test_lipsync_reports_the_offset_and_its_correlation(videos: dict[str, Path]) -> None:
    lipsync = run_gates(videos["audio_late"]).gate("lipsync")
    assert lipsync.value == 5  # audio 5 frames late
    assert lipsync.measured["corr"] >= 0.8  # the shape still matches, only late
    assert "+312 ms" in lipsync.detail


def test_a_colour_jump_at_a_join_fails_seams_there(videos: dict[str, Path]) -> None:
    seams = run_gates(videos["seam_colour"]).gate("seams")
    assert seams.status == "failed"
    assert seams.measured["worst_join_frame"] == SEAM
    assert seams.value > seams.threshold
    assert seams.measured["jump"] < seams.measured["jump_max"]  # caught at the join, not as a cut


def test_seams_checks_the_joins_the_caller_names(videos: dict[str, Path]) -> None:
    """In a run the joins come from the plan: a colour step where no join is planned is subtle
    enough to pass, the same step at a planned join fails."""
    path = videos["seam_colour"]
    assert run_gates(path, joins=[50, 150]).gate("seams").status == "passed"
    report = run_gates(path, joins=np.array([50, SEAM]))
    json.dumps(to_json(report))  # numpy indices come out as plain JSON numbers
    at_join = report.gate("seams")
    assert at_join.status == "failed"
    assert at_join.measured["worst_join_frame"] == SEAM


def test_an_abrupt_cut_between_joins_fails_seams(videos: dict[str, Path]) -> None:
    seams = run_gates(videos["cut"]).gate("seams")
    assert seams.status == "failed"
    assert seams.measured["jump_frame"] == 120
    assert seams.measured["jump"] > seams.measured["jump_max"]


def test_expected_frames_from_the_plan_override_the_audio(videos: dict[str, Path]) -> None:
    assert run_gates(videos["good"], expected_frames=193).gate("duration").status == "passed"
    duration = run_gates(videos["good"], expected_frames=200).gate("duration")
    assert duration.status == "failed"
    assert duration.value == -8
    assert duration.measured == {"frames": 192, "expected_frames": 200}


def test_thresholds_come_from_the_settings(videos: dict[str, Path]) -> None:
    lenient = QCSettings(black_max_s=2.0, lipsync_max_offset_frames=6)
    assert run_gates(videos["black"], settings=lenient).gate("black").status == "passed"
    lipsync = run_gates(videos["audio_late"], settings=lenient).gate("lipsync")
    assert (lipsync.status, lipsync.threshold) == ("passed", 6)
    with pytest.raises(ValueError, match="frozen"):
        lenient.black_max_s = 0.0  # type: ignore[misc]


def test_skipped_gates_do_not_fail(videos: dict[str, Path]) -> None:
    report = run_gates(videos["faceless"], skip={"face", "lipsync"})
    assert report.passed
    assert report.gate("face").status == "skipped"
    assert report.gate("face").passed is None


def test_report_turns_into_json_and_flat_columns(videos: dict[str, Path]) -> None:
    report = run_gates(videos["audio_late"], skip={"face"})
    data = json.loads(json.dumps(to_json(report)))
    assert data["passed"] is False
    assert [g["name"] for g in data["gates"]] == list(GATES)
    columns = report.to_columns()
    for gate in GATES:
        for suffix in ("status", "value", "threshold", "passed"):
            assert f"qc_{gate}_{suffix}" in columns
    assert columns["qc_passed"] is False
    assert columns["qc_lipsync_value"] == 5
    assert columns["qc_lipsync_passed"] is False
    assert columns["qc_lipsync_corr"] >= 0.8
    assert columns["qc_face_status"] == "skipped"
    assert columns["qc_face_passed"] is None
    # the same columns whatever ran, so results.parquet keeps one schema
    assert columns.keys() == run_gates(videos["good"]).to_columns().keys()


def test_audio_comes_from_the_given_file_when_the_mp4_has_none(
    render: Render, tmp_path: Path
) -> None:
    silent_mp4 = write_render(tmp_path / "video_only.mp4", render, with_audio=False)
    narration = write_audio(tmp_path / "narration.wav", render.audio, render.sample_rate, "wav")
    alone = run_gates(silent_mp4)
    assert alone.passed
    assert {alone.gate(g).status for g in ("duration", "sync", "lipsync")} == {"skipped"}
    report = run_gates(silent_mp4, narration)
    assert {g.name: g.status for g in report.gates} == dict.fromkeys(GATES, "passed")
    assert abs(report.gate("sync").value) < 0.01  # WAV: no codec padding


def test_unreadable_inputs_and_unknown_gates_raise(videos: dict[str, Path], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(QCInputError, match="not a readable video"):
        run_gates(garbage)
    with pytest.raises(QCInputError, match="not a readable audio file"):
        run_gates(videos["good"], tmp_path / "missing.wav")
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32)).save(picture)
    with pytest.raises(QCInputError, match="no audio stream"):
        run_gates(videos["good"], picture)
    with pytest.raises(QCInputError, match="unknown gate"):
        run_gates(videos["good"], skip={"lips"})


# --- avatarflow qc -----------------------------------------------------------------------------


def test_cli_passes_the_good_render_with_exit_0(videos: dict[str, Path]) -> None:
    code, output = _invoke(videos["good"])
    assert code == 0, output
    rows = {cells[1].strip(): cells[2].strip() for cells in _table_rows(output)}
    assert rows == dict.fromkeys(GATES, "passed")


@pytest.mark.parametrize(
    ("case", "gate"),
    [
        ("black", "black"),
        ("frozen", "freeze"),
        ("faceless", "face"),
        ("audio_late", "lipsync"),
        ("seam_colour", "seams"),
    ],
)
def test_cli_names_the_failed_gate_and_exits_1(
    videos: dict[str, Path], case: str, gate: str
) -> None:
    code, output = _invoke(videos[case], "--json")
    assert code == 1
    data = json.loads(output)
    failed = [g["name"] for g in data["gates"] if g["status"] == "failed"]
    assert failed == [gate]
    code, output = _invoke(videos[case])
    assert code == 1
    rows = {cells[1].strip(): cells[2].strip() for cells in _table_rows(output)}
    assert rows[gate] == "failed"
    assert list(rows.values()).count("failed") == 1


def test_cli_skips_gates_on_request(videos: dict[str, Path]) -> None:
    code, output = _invoke(videos["faceless"], "--qc-skip", "face,lipsync", "--json")
    assert code == 0, output
    statuses = {g["name"]: g["status"] for g in json.loads(output)["gates"]}
    assert statuses["face"] == statuses["lipsync"] == "skipped"
    code, output = _invoke(videos["faceless"], "--qc-skip", "face,lipsync")
    assert code == 0
    assert output.count("skipped") >= 2


def test_cli_uses_the_given_audio(render: Render, tmp_path: Path) -> None:
    video = write_render(tmp_path / "late.mp4", with_audio_delay(render, 5))
    narration = write_audio(tmp_path / "narration.wav", render.audio, render.sample_rate, "wav")
    assert _invoke(video)[0] == 1  # its own track is late
    code, output = _invoke(video, "--audio", narration, "--json")
    assert code == 0, output  # the narration it was rendered from is in sync
    assert json.loads(output)["gates"][GATES.index("lipsync")]["value"] == 0


@pytest.mark.parametrize("problem", ["missing file", "not a video", "not audio", "unknown gate"])
def test_cli_exits_2_with_one_line_for_bad_input(
    videos: dict[str, Path], tmp_path: Path, problem: str
) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(1).bytes(4096))
    good = videos["good"]
    args = {
        "missing file": [tmp_path / "missing.mp4"],
        "not a video": [garbage],
        "not audio": [good, "--audio", garbage],
        "unknown gate": [good, "--qc-skip", "face,teeth"],
    }[problem]
    code, output = _invoke(*args)
    assert code == 2
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1
    assert output.startswith("qc error")


# --- concurrency and lip-sync judgement ---------------------------------------------------------

# Varied talking heads (seconds, size, seed, single phrase, jaw smoothing): the flow's thread pool
# QCs rows like these side by side.
_HEADS = [
    (3.0, (256, 256), 1, True, 0.0),
    (3.5, (192, 256), 2, False, 0.0),
    (4.0, (320, 192), 3, True, 0.0625),
    (4.5, (224, 224), 4, False, 0.0),
    (3.0, (288, 256), 5, False, 0.0625),
    (5.0, (256, 192), 6, True, 0.0),
    (3.5, (160, 224), 7, True, 0.0),
    (4.0, (256, 320), 8, False, 0.0625),
]


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("heads")
    return [
        write_render(
            folder / f"head{i}.mp4",
            talking_head(s, size, seed=seed, single_phrase=single, jaw_s=jaw),
        )
        for i, (s, size, seed, single, jaw) in enumerate(_HEADS)
    ]


def _judged(path: Path) -> dict[str, object]:
    """A report without its timing, for comparing runs."""
    data = to_json(run_gates(path))
    del data["elapsed_s"]
    return data


def test_gates_on_many_videos_at_once_match_a_serial_run(heads: list[Path]) -> None:
    """OpenCV's face cascade is not thread-safe: one shared by the pool's threads crashed
    (`getScaleData` assertions) or found wrong boxes. Each thread now has its own."""
    serial = [_judged(path) for path in heads]
    assert all(report["passed"] for report in serial), [r["gates"] for r in serial]
    with ThreadPoolExecutor(max_workers=len(heads)) as pool:
        for _ in range(2):  # a shared cascade failed in the first round, every time
            assert list(pool.map(_judged, heads)) == serial


@pytest.mark.parametrize("single", [True, False], ids=["one sentence", "phrases"])
@pytest.mark.parametrize("seconds", [3.0, 5.0, 12.0])
def test_good_renders_with_a_smooth_jaw_are_not_called_out_of_sync(
    seconds: float, single: bool, tmp_path: Path
) -> None:
    """A jaw that follows loudness a little smoothly (as a model does) moves less on every frame;
    the old measure then found near-ties at other lags and rejected all of these renders."""
    render = talking_head(seconds, seed=0, single_phrase=single, jaw_s=0.09)
    lipsync = run_gates(write_render(tmp_path / "good.mp4", render)).gate("lipsync")
    assert lipsync.status == "passed", lipsync.detail
    assert lipsync.value == 0
    assert lipsync.measured["corr"] >= QCSettings().lipsync_min_corr


@pytest.mark.parametrize("single", [True, False], ids=["one sentence", "phrases"])
def test_a_five_frame_shift_is_caught_on_a_12_s_render_with_a_smooth_jaw(
    single: bool, tmp_path: Path
) -> None:
    render = with_audio_delay(talking_head(12.0, seed=0, single_phrase=single, jaw_s=0.09), 5)
    lipsync = run_gates(write_render(tmp_path / "late.mp4", render)).gate("lipsync")
    assert (lipsync.status, lipsync.value) == ("failed", 5), lipsync.detail
    assert lipsync.measured["t"] >= QCSettings().lipsync_min_offset_t
    assert "counts" in lipsync.detail


def test_a_weak_offset_is_read_as_in_sync_and_says_so(videos: dict[str, Path]) -> None:
    """The same late video passes when the evidence bar is set above what it shows."""
    late = videos["audio_late"]
    strict = run_gates(late).gate("lipsync")
    assert strict.measured["t"] > 3
    lenient = QCSettings(lipsync_min_offset_t=strict.measured["t"] + 1)  # type: ignore[operator]
    lipsync = run_gates(late, settings=lenient).gate("lipsync")
    assert (lipsync.status, lipsync.value) == ("passed", 0)
    assert lipsync.measured["best_offset"] == 5
    assert "no clear offset: read as in sync" in lipsync.detail


def test_a_clip_too_short_to_judge_passes_lipsync_with_a_note(tmp_path: Path) -> None:
    """2.5 s = 40 frames: once ±8 frames of search are set aside, 24 remain (32 needed)."""
    lipsync = run_gates(write_render(tmp_path / "short.mp4", talking_head(2.5))).gate("lipsync")
    assert (lipsync.status, lipsync.value) == ("passed", None)
    assert "too little to judge" in lipsync.detail
