"""Tests for tasks/concat.py: master audio, uniformity, exact joins by copy and by re-encode."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from avatarflow.tasks.concat import check_uniform, concat_row, encode_master_audio
from avatarflow.tasks.media import count_audio_samples, probe_video
from avatarflow.tasks.verify import verify_final
from tests.media_factory import write_audio
from tests.tasks.test_media import make_video, make_wav, read_frame_ids

RATE = 16000


def _packets(path: str | Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(audio=0) if p.size]


def _atoms(path: str | Path) -> list[bytes]:
    """Top-level MP4 box types in file order."""
    kinds, data, at = [], Path(path).read_bytes(), 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        kinds.append(data[at + 4 : at + 8])
        at += size if size >= 8 else len(data)
    return kinds


def test_master_from_wav_is_aac_at_the_source_rate(tmp_path: Path) -> None:
    out = encode_master_audio(make_wav(tmp_path / "n.wav", 2.0, RATE), tmp_path / "n.m4a")
    assert out == str(tmp_path / "n.m4a")
    with av.open(out) as container:
        stream = container.streams.audio[0].codec_context
        assert (stream.name, stream.sample_rate, stream.channels) == ("aac", RATE, 1)
    samples, _ = count_audio_samples(out)
    assert 2 * RATE <= samples <= 2 * RATE + 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.m4a", "n.wav"]  # no temp left


def _onset_s(path: str | Path) -> float:
    """Time of the first loud sample after decoding the first audio stream."""
    with av.open(str(path)) as container:
        decoded = np.concatenate([f.to_ndarray()[0] for f in container.decode(audio=0)])
        rate = container.streams.audio[0].sample_rate
    return int(np.argmax(np.abs(decoded) > 0.1)) / rate


def test_master_and_final_video_keep_the_narration_in_sync(tmp_path: Path) -> None:
    onset = 0.5  # silence, then a tone: encoder priming must not delay it
    samples = np.zeros(round(2.0 * RATE), np.float32)
    samples[round(onset * RATE) :] = 0.4 * np.sign(np.sin(np.arange(round(1.5 * RATE)) / 3))
    wav = write_audio(tmp_path / "n.wav", samples, RATE, "wav")
    master = encode_master_audio(wav, tmp_path / "n.m4a")
    assert _onset_s(master) == pytest.approx(onset, abs=0.002)
    chunks = [make_video(tmp_path / "c.mp4", 32)]
    assert _onset_s(concat_row(chunks, [32], master, tmp_path / "row.mp4")) == pytest.approx(
        onset, abs=0.002
    )


def test_master_from_mp3_keeps_rate_and_channels(tmp_path: Path) -> None:
    stereo = np.sin(np.arange(round(1.5 * 44100)) / 7)[:, None] * [0.2, 0.1]
    mp3 = write_audio(tmp_path / "n.mp3", stereo, 44100, "mp3")
    out = encode_master_audio(mp3, tmp_path / "n.m4a")
    with av.open(out) as container:
        stream = container.streams.audio[0].codec_context
        assert (stream.name, stream.sample_rate, stream.channels) == ("aac", 44100, 2)
    samples, _ = count_audio_samples(out)
    assert abs(samples - 1.5 * 44100) <= 2 * 1152 + 1024  # mp3 and aac frame padding


def test_master_from_m4a_copies_the_aac_packets_untouched(tmp_path: Path) -> None:
    source = write_audio(tmp_path / "in.m4a", np.sin(np.arange(22050) / 7) * 0.2, 22050, "m4a")
    out = encode_master_audio(source, tmp_path / "master.m4a")
    assert _packets(out) == _packets(source)
    assert count_audio_samples(out) == count_audio_samples(source)


def test_check_uniform_names_each_mismatch_with_its_chunk(tmp_path: Path) -> None:
    probes = [
        probe_video(make_video(tmp_path / "a.mp4", 4)),
        probe_video(make_video(tmp_path / "b.mp4", 4)),
        probe_video(make_video(tmp_path / "c.mp4", 4, size=(96, 64))),
        probe_video(make_video(tmp_path / "d.mp4", 4, fps=25)),
    ]
    problems = check_uniform(probes)
    assert any(p.startswith("chunk 2: width 96") for p in problems), problems
    assert any(p.startswith("chunk 3: fps 25") for p in problems), problems
    assert not any(p.startswith("chunk 1") for p in problems)


@pytest.fixture
def master(tmp_path: Path) -> str:
    """A 2.5 s narration, pre-encoded to AAC as the flow does early on."""
    return encode_master_audio(make_wav(tmp_path / "n.wav", 2.5, RATE), tmp_path / "n.m4a")


# Spans [0, 1.2), [1.2, 2.0), [2.0, 2.5) at 16 fps: round(end*fps) - round(start*fps) frames each.
SPANS_FRAMES = [19, 13, 8]


def test_copy_join_keeps_exactly_the_first_frames_of_each_chunk(
    tmp_path: Path, master: str
) -> None:
    chunks = [make_video(tmp_path / f"c{i}.mp4", 24, chunk=i) for i in range(3)]
    out = concat_row(chunks, SPANS_FRAMES, master, tmp_path / "out" / "row.mp4")
    expected = [(k, i) for k, n in enumerate(SPANS_FRAMES) for i in range(n)]
    assert read_frame_ids(Path(out)) == expected
    probe = probe_video(out)
    assert probe.extradata_sha256 == probe_video(chunks[0]).extradata_sha256  # stream copy
    assert probe.duration_s == pytest.approx(2.5)
    assert (probe.audio_codec, probe.audio_sample_rate_hz) == ("aac", RATE)
    assert verify_final(out, 2.5, RATE).passed
    assert _atoms(out).index(b"moov") < _atoms(out).index(b"mdat")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["row.mp4"]


def test_audio_is_the_master_track_cut_at_the_video_end(tmp_path: Path) -> None:
    narration = encode_master_audio(make_wav(tmp_path / "n.wav", 3.0, RATE), tmp_path / "n.m4a")
    chunks = [make_video(tmp_path / f"c{i}.mp4", 24, chunk=i) for i in range(2)]
    out = concat_row(chunks, [16, 16], narration, tmp_path / "row.mp4")  # 2 s of 3 s
    assert _packets(out) == _packets(narration)[: len(_packets(out))]
    samples, _ = count_audio_samples(out)
    assert 2 * RATE <= samples <= 2 * RATE + 1024


def test_mismatched_chunks_are_reencoded_to_one_uniform_stream(tmp_path: Path, master: str) -> None:
    chunks = [
        make_video(tmp_path / "c0.mp4", 24, chunk=0),
        make_video(tmp_path / "c1.mp4", 24, chunk=1, size=(128, 128)),
        make_video(tmp_path / "c2.mp4", 20, chunk=2, fps=25),
    ]
    out = concat_row(chunks, SPANS_FRAMES, master, tmp_path / "row.mp4")
    probe = probe_video(out)
    assert (probe.width, probe.height, probe.fps, probe.frames) == (64, 64, 16, 40)
    assert verify_final(out, 2.5, RATE).passed
    ids = read_frame_ids(Path(out))
    assert ids[:32] == [(0, i) for i in range(19)] + [(1, i) for i in range(13)]
    # The 25 fps chunk is resampled by time: output frame i shows what is on screen at i/16 s.
    assert ids[32:] == [(2, i * 25 // 16) for i in range(8)]


def test_cut_inside_b_frames_is_reencoded_and_still_exact(tmp_path: Path, master: str) -> None:
    chunks = [make_video(tmp_path / f"c{i}.mp4", 24, chunk=i, b_frames=True) for i in range(3)]
    assert probe_video(chunks[0]).has_b_frames
    out = concat_row(chunks, SPANS_FRAMES, master, tmp_path / "row.mp4")
    assert read_frame_ids(Path(out)) == [
        (k, i) for k, n in enumerate(SPANS_FRAMES) for i in range(n)
    ]
    assert probe_video(out).extradata_sha256 != probe_video(chunks[0]).extradata_sha256
    assert verify_final(out, 2.5, RATE).passed


def test_too_short_chunk_is_refused_and_nothing_is_written(tmp_path: Path, master: str) -> None:
    chunks = [make_video(tmp_path / "c0.mp4", 24), make_video(tmp_path / "c1.mp4", 10, chunk=1)]
    out_dir = tmp_path / "out"
    with pytest.raises(ValueError, match="chunk 1 has 10 frames, need 21"):
        concat_row(chunks, [19, 21], master, out_dir / "row.mp4")
    assert list(out_dir.iterdir()) == []


def test_whole_b_frame_chunks_are_still_joined_by_copy(tmp_path: Path, master: str) -> None:
    chunks = [
        make_video(tmp_path / f"c{i}.mp4", n, chunk=i, b_frames=True) for i, n in [(0, 24), (1, 16)]
    ]
    out = concat_row(chunks, [24, 16], master, tmp_path / "row.mp4")
    assert read_frame_ids(Path(out)) == [(0, i) for i in range(24)] + [(1, i) for i in range(16)]
    assert probe_video(out).extradata_sha256 == probe_video(chunks[0]).extradata_sha256
    assert verify_final(out, 2.5, RATE).passed
