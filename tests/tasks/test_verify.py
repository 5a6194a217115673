"""Tests for tasks.verify: the chunk and final-video QC gates on small real files."""

from __future__ import annotations

from pathlib import Path

import av
import pytest

from tasks.backends import NOMINAL_AREA
from tasks.concat import concat_row, encode_master_audio
from tasks.verify import verify_chunk, verify_final
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
