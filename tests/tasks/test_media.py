"""Tests for avatarflow.tasks.media, plus the small real media files the media-stage tests share."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from avatarflow.tasks.media import (
    _is_pcm_wav,
    count_audio_samples,
    decode_first_frame,
    open_media,
    probe_video,
)
from tests.media_factory import write_audio, write_mp4


def make_video(
    path: Path,
    frames: int,
    *,
    chunk: int = 0,
    size: tuple[int, int] = (64, 64),
    fps: int = 16,
    codec: str = "libx264",
    b_frames: bool = False,
    faststart: bool = False,
) -> Path:
    """Encode a small real video whose frames can be identified after decoding (read_frame_ids)."""
    width, height = size
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", format="mp4", options=options) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":  # b-adapt=0 puts B-frames everywhere, so cuts split reordered runs
            bframes = "bframes=3:b-adapt=0" if b_frames else "bframes=0"
            stream.options = {"preset": "ultrafast", "x264-params": bframes}
        for index in range(frames):
            frame = av.VideoFrame.from_ndarray(_id_image(chunk, index, size), format="rgb24")
            frame.pts = index
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _id_image(chunk: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """An image whose first block row spells index and second block row spells chunk, in bits.

    Blocks are width/8 pixels square, black or white: they survive lossy coding and scaling.
    """
    width, height = size
    block = width // 8
    image = np.full((height, width, 3), 128, np.uint8)
    for row, value in enumerate((index, chunk)):
        for bit in range(8):
            level = 255 if value >> bit & 1 else 0
            image[row * block : (row + 1) * block, bit * block : (bit + 1) * block] = level
    return image


def read_frame_ids(path: Path) -> list[tuple[int, int]]:
    """Decode a video made by make_video (or joined from such) into its (chunk, index) per frame."""
    ids = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            luma, block = frame.to_ndarray(format="gray"), frame.width // 8
            # Sample each block's centre, away from edges that coding and scaling blur.
            centres = luma[block // 2 : 2 * block : block, block // 2 :: block][:, :8]
            index, chunk = (sum(1 << b for b in range(8) if row[b] > 128) for row in centres)
            ids.append((chunk, index))
    return ids


def make_wav(path: Path, seconds: float, rate: int = 16000, channels: int = 1) -> Path:
    """Write a 440 Hz tone as 16-bit PCM WAV."""
    tone = np.sin(np.arange(round(seconds * rate)) * 2 * np.pi * 440 / rate) * 0.25
    return write_audio(path, np.tile(tone[:, None], (1, channels)), rate, "wav")


def test_probe_counts_frames_and_reads_stream_parameters(tmp_path: Path) -> None:
    probe = probe_video(make_video(tmp_path / "v.mp4", 37, size=(96, 64)))
    assert (probe.codec, probe.width, probe.height, probe.pix_fmt) == ("h264", 96, 64, "yuv420p")
    assert probe.frames == 37
    assert probe.fps == 16
    assert probe.duration_s == pytest.approx(37 / 16)
    assert not probe.has_b_frames
    assert probe.audio_codec is None


def test_probe_frame_count_comes_from_packets_at_other_rates(tmp_path: Path) -> None:
    probe = probe_video(make_video(tmp_path / "v.mp4", 30, fps=25))
    assert (probe.frames, probe.fps) == (30, 25)
    assert probe.duration_s == pytest.approx(30 / 25)


def test_probe_detects_reordered_b_frames(tmp_path: Path) -> None:
    assert probe_video(make_video(tmp_path / "b.mp4", 24, b_frames=True)).has_b_frames


def test_probe_header_only_skips_the_packet_scan_but_keeps_parameters(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", 20)
    full, quick = probe_video(path), probe_video(path, count_frames=False)
    assert (quick.codec, quick.width, quick.fps, quick.extradata_sha256) == (
        full.codec,
        full.width,
        full.fps,
        full.extradata_sha256,
    )


def test_probe_rejects_a_file_without_video(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no video stream"):
        probe_video(make_wav(tmp_path / "a.wav", 0.5))


def test_count_audio_samples_decodes_every_sample(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "a.wav", 1.2345, rate=22050, channels=2)
    assert count_audio_samples(path) == (round(1.2345 * 22050), 22050)


def test_the_first_frame_decodes_in_a_good_file(tmp_path: Path) -> None:
    assert decode_first_frame(make_video(tmp_path / "v.mp4", 40, b_frames=True))


def test_ids_survive_encoding(tmp_path: Path) -> None:
    path = make_video(tmp_path / "v.mp4", 5, chunk=3, b_frames=True)
    assert read_frame_ids(path) == [(3, i) for i in range(5)]


def _pcm_wav(path: Path, codec: str, channels: int, rate: int = 22050) -> Path:
    """A 1 s WAV in the given PCM codec (24-bit is written as WAVE_FORMAT_EXTENSIBLE)."""
    layout = "mono" if channels == 1 else "stereo"
    samples = np.random.default_rng(0).uniform(-0.5, 0.5, (channels, rate)).astype(np.float32)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _decoded(container: av.container.InputContainer) -> tuple[np.ndarray, int, str, float]:
    with container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
        seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
        return samples, stream.codec_context.sample_rate, stream.codec_context.layout.name, seconds


@pytest.mark.parametrize(
    ("codec", "channels"),
    [("pcm_s16le", 1), ("pcm_s16le", 2), ("pcm_f32le", 1), ("pcm_s24le", 2)],
)
def test_a_pcm_wav_opened_without_probing_decodes_as_a_probed_one(
    tmp_path: Path, codec: str, channels: int
) -> None:
    wav = _pcm_wav(tmp_path / "n.wav", codec, channels)
    assert _is_pcm_wav(wav)  # the unprobed open is the one under test
    fast, probed = _decoded(open_media(wav)), _decoded(av.open(str(wav)))
    np.testing.assert_array_equal(fast[0], probed[0])
    assert fast[1:] == probed[1:]
    assert fast[0].size == 22050 * channels


def test_other_files_are_probed_as_usual(tmp_path: Path) -> None:
    tone = np.zeros(16000, np.float32)
    others = [
        write_audio(tmp_path / "n.mp3", tone, 16000, "mp3"),
        write_audio(tmp_path / "n.m4a", tone, 16000, "m4a"),
        write_mp4(tmp_path / "v.mp4"),
    ]
    (tmp_path / "short.wav").write_bytes(b"RIFF")
    for path in others:
        assert not _is_pcm_wav(path)
        with open_media(path) as container:
            assert container.streams
    assert not _is_pcm_wav(tmp_path / "short.wav")
    assert not _is_pcm_wav(tmp_path / "missing.wav")
