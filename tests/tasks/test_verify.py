"""Tests for avatarflow.tasks.verify: the chunk and final-video QC gates on small real files."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from avatarflow.tasks.backends import NOMINAL_AREA
from avatarflow.tasks.concat import chunk_frames, concat_row, encode_master_audio
from avatarflow.tasks.config import QCSettings
from avatarflow.tasks.publish import RESULTS_SCHEMA
from avatarflow.tasks.qc import GATES
from avatarflow.tasks.records import RowPlan
from avatarflow.tasks.verify import QCError, check_final, qc_joins, verify_chunk, verify_final
from tests.factories import make_audio, make_chunks, make_plan
from tests.tasks.test_media import make_video, make_wav

SIZE_480P = (832, 480)
AREA = NOMINAL_AREA  # the planned pixel area per resolution


def test_chunk_with_the_promised_stream_passes(tmp_path: Path) -> None:
    path = make_video(tmp_path / "c.mp4", 12, size=SIZE_480P)
    verdict = verify_chunk(path, expected_frames=12, expected_area=AREA["480p"])
    assert verdict.passed, verdict.reasons
    assert verdict.measured["frames"] == 12


def test_chunk_may_be_an_equal_area_bucket(tmp_path: Path) -> None:
    path = make_video(tmp_path / "c.mp4", 4, size=(640, 640))
    assert verify_chunk(path, expected_frames=4, expected_area=AREA["480p"]).passed


@pytest.mark.parametrize(
    ("kwargs", "expected_frames", "resolution", "reason"),
    [
        ({"codec": "mpeg4"}, 4, "480p", "video codec mpeg4"),
        ({"size": (64, 64)}, 4, "480p", f"does not have the planned area {AREA['480p']}"),
        ({}, 4, "720p", f"does not have the planned area {AREA['720p']}"),
        ({"fps": 25}, 4, "480p", "frame rate 25"),
        ({}, 6, "480p", "4 frames, expected at least 6"),
    ],
)
def test_chunk_gate_names_what_is_wrong(
    tmp_path: Path, kwargs: dict, expected_frames: int, resolution: str, reason: str
) -> None:
    path = make_video(tmp_path / "c.mp4", 4, **{"size": SIZE_480P, **kwargs})
    verdict = verify_chunk(path, expected_frames, AREA[resolution])
    assert not verdict.passed
    assert any(reason in r for r in verdict.reasons), verdict.reasons


def test_720p_chunk_passes_at_1280x720(tmp_path: Path) -> None:
    path = make_video(tmp_path / "c.mp4", 3, size=(1280, 720))
    assert verify_chunk(path, 3, AREA["720p"]).passed


def test_no_expected_area_skips_only_the_size_check(tmp_path: Path) -> None:
    small = make_video(tmp_path / "c.mp4", 4, size=(32, 32))
    assert verify_chunk(small, 4, None).passed
    assert not verify_chunk(small, 5, None).passed
    assert not verify_chunk(
        make_video(tmp_path / "d.mp4", 4, size=(32, 32), fps=25), 4, None
    ).passed
    assert verify_chunk(tmp_path / "d.mp4", 4, None, fps=25).passed


def test_garbage_and_truncated_files_fail_without_raising(tmp_path: Path) -> None:
    garbage = tmp_path / "g.mp4"
    garbage.write_bytes(b"\0\0\0\x18ftypmp42" + b"x" * 500)
    assert not verify_chunk(garbage, 1, AREA["480p"]).passed
    whole = make_video(tmp_path / "v.mp4", 40, size=SIZE_480P, faststart=True).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])  # index intact, second half of the media missing
    verdict = verify_chunk(cut, 40, AREA["480p"])
    assert not verdict.passed
    assert verdict.reasons


@pytest.fixture
def final_video(tmp_path: Path) -> tuple[Path, float]:
    """A joined 2.5 s video with its master audio, as the concat stage makes it."""
    master = encode_master_audio(make_wav(tmp_path / "n.wav", 2.5), tmp_path / "n.m4a")
    chunks = [make_video(tmp_path / f"c{i}.mp4", 24, chunk=i) for i in range(2)]
    out = concat_row(chunks, [20, 20], master, tmp_path / "final.mp4")
    return Path(out), 2.5


def _two_chunk_plan(tmp_path: Path) -> RowPlan:
    """The plan final_video was joined from: two 1.25 s chunks (20 frames each) of n.wav."""
    audio = make_audio(2.5, pcm_path=str(tmp_path / "n.wav"))
    return make_plan(audio=audio, chunks=make_chunks("row-1", (0.0, 1.25, 2.5)))


def test_joins_are_chunk_starts_and_each_chunks_own_segment_grid() -> None:
    # 12 s + 8 s at 16 fps: chunk 0 renders 3 segments (253 frames) and keeps 192; chunk 1
    # renders 2 (173) and keeps 128, so its own grid's join at 93 lands at 192 + 93.
    plan = make_plan(audio=make_audio(20.0), chunks=make_chunks("r", (0.0, 12.0, 20.0)))
    assert chunk_frames(plan) == [192, 128]
    assert qc_joins(plan, continuous=False) == [93, 173, 192, 285]
    # one continuous render cut into chunks: the grid runs over the whole row
    assert qc_joins(plan, continuous=True) == [93, 173, 192, 253]


def test_final_check_records_every_gate_and_rejects_a_faceless_video(
    final_video: tuple[Path, float], tmp_path: Path
) -> None:
    path, _ = final_video
    check = check_final(path, _two_chunk_plan(tmp_path), QCSettings(), frozenset(), False)
    assert not check.passed
    assert check.failed == ("face",)
    assert check.reasons == ("qc face: a face in 0 of 3 sampled frames",)
    assert [g.name for g in check.gates] == list(GATES)
    duration = check.gates[0]
    assert (duration.value, duration.threshold) == (0, 1)  # 40 frames, 40 planned
    columns = check.to_columns()
    assert columns["qc_face_status"] == "failed"
    assert columns["qc_face_threshold"] == 0.8
    assert columns["qc_seams_value"] is not None  # the chunk join at frame 20 was measured
    assert set(columns) <= set(RESULTS_SCHEMA.names)


def test_skipped_gates_say_so_and_the_rest_decide(
    final_video: tuple[Path, float], tmp_path: Path
) -> None:
    path, _ = final_video
    skip = frozenset({"face", "lipsync"})
    check = check_final(path, _two_chunk_plan(tmp_path), QCSettings(), skip, False)
    assert check.passed, check.reasons
    columns = check.to_columns()
    assert columns["qc_face_status"] == columns["qc_lipsync_status"] == "skipped"
    assert columns["qc_passed"] is True


def test_structural_failures_join_the_qc_reasons(
    final_video: tuple[Path, float], tmp_path: Path
) -> None:
    path, _ = final_video
    plan = _two_chunk_plan(tmp_path)
    plan = make_plan(audio=make_audio(2.5, pcm_path=plan.audio.pcm_path, sample_rate_hz=22050))
    check = check_final(path, plan, QCSettings(), frozenset({"face", "lipsync"}), False)
    assert not check.passed
    assert check.failed == ()  # the gates passed: only the structural check failed
    assert any("sample rate 16000" in r for r in check.reasons)


def test_an_unreadable_final_video_fails_the_row(tmp_path: Path) -> None:
    garbage = tmp_path / "final.mp4"
    garbage.write_bytes(b"\0\0\0\x18ftypmp42" + b"x" * 500)
    make_wav(tmp_path / "n.wav", 2.5)
    with pytest.raises(QCError, match="final: unreadable video"):
        check_final(garbage, _two_chunk_plan(tmp_path), QCSettings(), frozenset(), False)


def test_final_video_matching_its_narration_passes(final_video: tuple[Path, float]) -> None:
    path, duration_s = final_video
    verdict = verify_final(path, duration_s, 16000)
    assert verdict.passed, verdict.reasons
    assert verdict.measured["faststart"] is True
    assert abs(verdict.measured["audio_samples"] - 40000) <= 1024


def test_final_video_of_the_wrong_length_fails(final_video: tuple[Path, float]) -> None:
    path, duration_s = final_video
    verdict = verify_final(path, duration_s + 0.5, 16000)
    assert not verdict.passed
    text = " ".join(verdict.reasons)
    assert "40 frames" in text
    assert "audio decodes to" in text


def test_final_video_at_another_rate_than_the_master_fails(final_video: tuple[Path, float]) -> None:
    path, duration_s = final_video
    verdict = verify_final(path, duration_s, 22050)
    assert any("sample rate 16000" in r for r in verdict.reasons)


def test_final_video_without_faststart_fails(
    final_video: tuple[Path, float], tmp_path: Path
) -> None:
    path, duration_s = final_video
    plain = tmp_path / "plain.mp4"
    with av.open(str(path)) as src, av.open(str(plain), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)
    verdict = verify_final(plain, duration_s, 16000)
    assert verdict.reasons == ("moov atom is not before mdat (not faststart)",)


def test_final_video_without_audio_fails(tmp_path: Path) -> None:
    verdict = verify_final(make_video(tmp_path / "v.mp4", 16, faststart=True), 1.0, 16000)
    assert verdict.reasons == ("no audio stream",)
