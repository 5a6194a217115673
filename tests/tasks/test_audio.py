"""Tests for tasks/audio.py: fetch and decode every common format, error kinds, pause-aware cuts."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import imageio_ffmpeg
import numpy as np
import pytest

from avatarflow.tasks.audio import (
    AudioError,
    find_cut_points,
    load_pcm,
    probe_audio,
    write_chunk_wav,
)
from avatarflow.tasks.records import V1_GRID, FrameGrid
from avatarflow.tasks.workdir import WorkDir
from tests.media_factory import (
    speechlike,
    write_audio,
    write_corrupt_audio,
    write_empty_file,
    write_not_audio,
)

# Lossless formats decode to exactly the samples written. Lossy codecs frame the audio and add
# encoder delay/padding, which the decoder strips using the LAME gapless header, the mp4 edit list
# and Ogg pre-skip/granule positions; the bound is one codec frame of the decoded rate (in practice
# all are exact except LAME at 8 kHz, which is 15 samples long).
TOLERANCE_SAMPLES = {"wav": 0, "flac": 0, "mp3": 1152, "m4a": 1024, "ogg": 960}


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a", "flac", "ogg"])
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
@pytest.mark.parametrize("channels", [1, 2])
def test_decodes_every_common_format_with_exact_duration(
    tmp_path: Path, fmt: str, rate: int, channels: int
) -> None:
    mono = speechlike(1.3, rate, seed=rate)
    samples = mono if channels == 1 else np.stack([mono, mono[::-1]], axis=1)
    source = write_audio(tmp_path / f"n.{fmt}", samples, rate, fmt)
    info = probe_audio(str(source), WorkDir(tmp_path / "work").audio)
    # opus always decodes at 48 kHz; everything else keeps the source rate
    expected_rate = 48000 if fmt == "ogg" else rate
    assert info.sample_rate_hz == expected_rate
    assert info.channels == channels
    error_samples = abs(info.duration_s - 1.3) * expected_rate
    assert error_samples <= TOLERANCE_SAMPLES[fmt] + 1e-6
    with wave.open(info.pcm_path) as pcm:
        assert (pcm.getframerate(), pcm.getnchannels(), pcm.getsampwidth()) == (
            expected_rate,
            channels,
            2,
        )
        assert pcm.getnframes() == round(info.duration_s * expected_rate)


def test_ffmpeg_made_m4a_is_trimmed_to_its_exact_duration(tmp_path: Path) -> None:
    wav = write_audio(tmp_path / "n.wav", speechlike(2.0, 44100), 44100, "wav")
    m4a = tmp_path / "n.m4a"
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    cmd = [ffmpeg, "-loglevel", "error", "-i", str(wav), "-c:a", "aac", str(m4a)]
    subprocess.run(cmd, check=True)
    assert probe_audio(str(m4a), WorkDir(tmp_path / "work").audio).duration_s == 2.0


def test_probe_reuses_the_content_addressed_copy(tmp_path: Path) -> None:
    source = write_audio(tmp_path / "n.wav", speechlike(1.0), 16000, "wav")
    first = probe_audio(str(source), WorkDir(tmp_path / "work").audio)
    pcm_mtime = Path(first.pcm_path).stat().st_mtime_ns
    copy = tmp_path / "renamed.wav"
    copy.write_bytes(source.read_bytes())
    second = probe_audio(f"file://{copy}", WorkDir(tmp_path / "work").audio)
    assert second.sha256 == first.sha256
    assert second.pcm_path == first.pcm_path
    assert second.source == f"file://{copy}"
    assert Path(second.pcm_path).stat().st_mtime_ns == pcm_mtime


def test_concurrent_probes_of_one_file_agree(tmp_path: Path) -> None:
    source = write_audio(tmp_path / "n.mp3", speechlike(2.0), 16000, "mp3")
    with ThreadPoolExecutor(4) as pool:
        infos = list(
            pool.map(lambda _: probe_audio(str(source), WorkDir(tmp_path / "work").audio), range(4))
        )
    assert len(set(infos)) == 1
    assert load_pcm(infos[0].pcm_path)[0].shape == (32000,)


def test_probe_reads_memory_urls(tmp_path: Path) -> None:
    local = write_audio(tmp_path / "n.flac", speechlike(1.0), 16000, "flac")
    with fsspec.open("memory://narration/n.flac", "wb") as f:
        f.write(local.read_bytes())
    assert (
        probe_audio("memory://narration/n.flac", WorkDir(tmp_path / "work").audio).duration_s == 1.0
    )


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """Serve a folder over HTTP on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        """Serve files, but answer 503 for anything under /down/."""
        if self.path.startswith("/down/"):
            self.send_error(503)
        else:
            super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""


def test_probe_fetches_http_and_reports_404_and_503(
    tmp_path: Path, http_root: tuple[Path, str]
) -> None:
    root, base = http_root
    write_audio(root / "n.mp3", speechlike(1.5), 16000, "mp3")
    assert probe_audio(
        f"{base}/n.mp3", WorkDir(tmp_path / "work").audio
    ).duration_s == pytest.approx(1.5)
    with pytest.raises(AudioError) as info:
        probe_audio(f"{base}/absent.mp3", WorkDir(tmp_path / "work").audio)
    assert info.value.kind == "missing"
    with pytest.raises(AudioError) as info:
        probe_audio(f"{base}/down/n.mp3", WorkDir(tmp_path / "work").audio)
    assert info.value.kind == "fetch_failed"


@pytest.mark.parametrize(
    ("name", "make", "kind"),
    [
        ("absent.wav", None, "missing"),
        ("empty.wav", write_empty_file, "empty"),
        ("face.png", write_not_audio, "not_audio"),
        ("notes.txt", write_not_audio, "not_audio"),
        ("noise.mp3", write_corrupt_audio, "corrupt"),
    ],
)
def test_unusable_files_raise_their_kind(
    tmp_path: Path, name: str, make: object, kind: str
) -> None:
    path = tmp_path / name
    if callable(make):
        make(path)
    with pytest.raises(AudioError) as info:
        probe_audio(str(path), WorkDir(tmp_path / "work").audio)
    assert info.value.kind == kind
    assert name in info.value.reason


def test_flac_with_garbage_frames_is_corrupt(tmp_path: Path) -> None:
    good = write_audio(tmp_path / "good.flac", speechlike(1.0), 16000, "flac").read_bytes()
    noise = np.random.default_rng(1).bytes(len(good) - 200)
    (tmp_path / "bad.flac").write_bytes(good[:200] + noise)
    with pytest.raises(AudioError) as info:
        probe_audio(str(tmp_path / "bad.flac"), WorkDir(tmp_path / "work").audio)
    assert info.value.kind == "corrupt"


def test_too_short_and_silent_audio_are_rejected(tmp_path: Path) -> None:
    short = write_audio(tmp_path / "short.wav", speechlike(0.4), 16000, "wav")
    silent = write_audio(tmp_path / "silent.wav", np.zeros(32000, np.float32), 16000, "wav")
    hum = write_audio(tmp_path / "hum.wav", np.full(32000, 0.0005, np.float32), 16000, "wav")
    for path, kind in ((short, "too_short"), (silent, "silent"), (hum, "silent")):
        with pytest.raises(AudioError) as info:
            probe_audio(str(path), WorkDir(tmp_path / "work").audio)
        assert info.value.kind == kind


def test_load_pcm_gives_float_mono_at_the_source_rate(tmp_path: Path) -> None:
    stereo = np.stack([np.full(8000, 0.5), np.full(8000, -0.25)], axis=1)
    source = write_audio(tmp_path / "s.wav", stereo, 8000, "wav")
    samples, rate = load_pcm(probe_audio(str(source), WorkDir(tmp_path / "work").audio).pcm_path)
    assert rate == 8000
    assert samples.dtype == np.float32
    assert samples.shape == (8000,)
    assert samples.mean() == pytest.approx(0.125, abs=1e-3)


# 47 s of narration with a 0.4 s pause every 3.7 s, so every ≥ 4 s search window holds one
PAUSES = [(3.3 + 3.7 * i, 3.7 + 3.7 * i) for i in range(12)]


@pytest.mark.parametrize("noise_floor_db", [None, -45.0])
@pytest.mark.parametrize(("target_s", "window_s"), [(12.0, 5.0), (20.0, 4.0)])
def test_cuts_land_in_pauses_on_the_segment_grid(
    noise_floor_db: float | None, target_s: float, window_s: float
) -> None:
    samples = speechlike(47.0, 16000, PAUSES, seed=3, noise_floor_db=noise_floor_db)
    cuts = find_cut_points(samples, 16000, target_s, window_s, min_s=3.0)
    assert cuts, "47 s must be cut at these targets"
    for cut in cuts:
        assert any(start < cut < end for start, end in PAUSES), cut
    bounds = [0.0, *cuts, 47.0]
    lengths = np.diff(bounds)
    span = V1_GRID.longest_span_s(target_s)
    assert span <= target_s
    assert all(3.0 <= length <= span + 1e-9 for length in lengths), lengths


def test_cuts_follow_the_grid_they_are_given() -> None:
    samples = speechlike(47.0, 16000, PAUSES, seed=3)
    grid = FrameGrid(25)
    cuts = find_cut_points(samples, 16000, 12.0, 5.0, min_s=3.0, grid=grid)
    assert cuts
    lengths = np.diff([0.0, *cuts, 47.0])
    assert all(3.0 <= length <= grid.longest_span_s(12.0) + 1e-9 for length in lengths), lengths


def test_cut_prefers_the_middle_of_the_longest_pause_in_the_window() -> None:
    pauses = [(7.0, 7.2), (8.0, 8.8), (10.2, 10.4)]
    samples = speechlike(20.0, 16000, pauses, seed=5)
    # target 12 s → 2 segments = 10.8125 s; the window is [5.8125, 10.8125]
    cuts = find_cut_points(samples, 16000, 12.0, 5.0, 3.0)
    assert cuts[0] == pytest.approx(8.4, abs=0.011)


def test_without_a_pause_the_cut_takes_the_quietest_point_in_the_window() -> None:
    rng = np.random.default_rng(0)
    samples = (rng.normal(0, 0.3, 16000 * 20)).astype(np.float32)
    samples[16000 * 9 + 4000 : 16000 * 9 + 4800] *= 0.3  # a dip, not a pause
    cuts = find_cut_points(samples, 16000, 12.0, 5.0, 3.0)
    assert 9.25 <= cuts[0] <= 9.3


def test_short_audio_is_not_cut_and_tail_keeps_min_length() -> None:
    assert find_cut_points(speechlike(10.0), 16000, 12.0, 5.0, 3.0) == []
    # 12 s with target 12: one 10.8125 s chunk would leave a 1.19 s tail; min_s moves the cut
    samples = speechlike(12.0, 16000, seed=9)
    cuts = find_cut_points(samples, 16000, 12.0, 5.0, 3.0)
    assert len(cuts) == 1
    assert 12.0 - cuts[0] >= 3.0


def test_min_length_larger_than_half_a_chunk_is_refused() -> None:
    with pytest.raises(ValueError, match="min_s"):
        find_cut_points(speechlike(30.0), 16000, 6.0, 1.0, 3.0)


def test_chunk_wavs_are_sample_exact_and_tile_the_narration(tmp_path: Path) -> None:
    rate = 44100
    source = write_audio(tmp_path / "n.wav", speechlike(9.0, rate, [(4.0, 4.5)]), rate, "wav")
    info = probe_audio(str(source), WorkDir(tmp_path / "work").audio)
    samples, _ = load_pcm(info.pcm_path)
    bounds = [0.0, 4.25, 7.123456, info.duration_s]
    pieces = []
    for i, (start, end) in enumerate(zip(bounds, bounds[1:], strict=False)):
        path = write_chunk_wav(info, start, end, tmp_path / f"chunk{i}.wav")
        piece, piece_rate = load_pcm(path)
        assert piece_rate == rate
        assert len(piece) == round(end * rate) - round(start * rate)
        pieces.append(piece)
    np.testing.assert_array_equal(np.concatenate(pieces), samples)
