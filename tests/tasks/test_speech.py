"""Speech recognition (tasks/speech.py): the tiny local Whisper, fal-ai/whisper on the fake fal
with its ledger and never-pay-twice rules, and reruns that take the words from the ledger."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avatarflow.tasks import speech
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.ledger import SPEECH, Ledger
from avatarflow.tasks.publish import paid_per_row
from avatarflow.tasks.records import Recognised, RowPlan, Word
from tests.factories import make_plan, make_row
from tests.fakes.fal_server import (
    PLACEHOLDER_WORD,
    WHISPER_APP,
    WHISPER_UNITS_PER_AUDIO_S,
    FakeFal,
    _decode_audio,
    voiced_bursts,
)
from tests.media_factory import write_narration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "the quick brown fox jumps over the lazy dog while the avatar keeps talking"


def _plan(row_id: str = "row-1", input_hash: str = "a" * 64) -> RowPlan:
    return make_plan(make_row(row_id), input_hash=input_hash)


def _in_order_within(words: list[Word], duration_s: float) -> None:
    assert words
    for word in words:
        assert word.text.strip() == word.text
        assert word.text
        assert 0.0 <= word.start_s <= word.end_s <= duration_s + 1e-6
    for before, after in zip(words, words[1:], strict=False):
        assert before.end_s <= after.start_s


def test_words_from_chunks_drops_empty_words_and_orders_times() -> None:
    chunks: list[dict[str, Any]] = [
        {"text": " hello", "timestamp": (0.5, 1.0)},
        {"text": "  ", "timestamp": (1.0, 1.2)},  # nothing said
        {"text": " world", "timestamp": (0.9, 1.4)},  # starts inside the previous word
        {"text": " again", "timestamp": (2.0, None)},  # the last word has no end
        {"text": " late", "timestamp": (9.0, 9.5)},  # past the audio
    ]
    words = speech.words_from_chunks(chunks, duration_s=3.0)
    assert words == [
        Word("hello", 0.5, 1.0),
        Word("world", 1.0, 1.4),
        Word("again", 2.0, 3.0),
        Word("late", 3.0, 3.0),
    ]


# --- local --------------------------------------------------------------------------------------


@pytest.fixture
def local_config(tmp_path: Path, tiny_checkpoint: Path) -> BatchConfig:
    return BatchConfig(
        manifest=str(tmp_path / "m.jsonl"),
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        local={"model_dir": str(tiny_checkpoint), "device": "cpu"},
    )


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Whisper folders transformers loads from now on (an empty per-process cache first)."""
    import transformers

    monkeypatch.setattr(speech, "_LOADED", {})
    calls: list[str] = []
    real = transformers.pipeline

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(kwargs["model"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers, "pipeline", counting)
    return calls


@pytest.mark.usefixtures("one_torch_thread")
def test_local_tiny_whisper_gives_in_order_words_and_loads_once(
    tmp_path: Path, local_config: BatchConfig, loads: list[str]
) -> None:
    assert speech.recogniser_configured(local_config)
    first = write_narration(tmp_path / "one.wav", 5.0, seed=1)
    second = write_narration(tmp_path / "two.wav", 3.0, seed=2)

    words = speech.recognise(_plan("one"), str(first), local_config)
    other = speech.recognise(_plan("two"), str(second), local_config)

    _in_order_within(words, 5.0)
    _in_order_within(other, 3.0)
    # the tiny model says only its own few words, and the model was loaded once for both rows
    from avatarflow.model.tiny import TINY_WHISPER_WORDS

    assert {w.text for w in words + other} <= set(TINY_WHISPER_WORDS)
    assert loads == [str(speech.whisper_folder(local_config))]
    kept = Ledger.for_run(local_config).recognised("one", "a" * 64)
    assert kept is not None
    assert list(kept.words) == words
    assert kept.cost_usd == 0.0


def test_local_rerun_takes_the_words_from_the_ledger(
    tmp_path: Path, local_config: BatchConfig, loads: list[str]
) -> None:
    wav = write_narration(tmp_path / "one.wav", 2.0)
    Ledger.for_run(local_config).record_recognised(
        "one",
        "a" * 64,
        Recognised((Word("kept", 0.1, 0.4),), "local", "w", "0" * 64),
    )
    assert speech.recognise(_plan("one"), str(wav), local_config) == [Word("kept", 0.1, 0.4)]
    assert loads == []  # nothing was loaded, so nothing was recognised


def test_recogniser_configured_per_backend(tmp_path: Path, tiny_checkpoint: Path) -> None:
    base = {"manifest": "m.jsonl", "work_dir": str(tmp_path)}
    assert speech.recogniser_configured(BatchConfig(**base, local={"model_dir": "tiny"}))
    empty = tmp_path / "no-whisper"
    empty.mkdir()
    assert not speech.recogniser_configured(BatchConfig(**base, local={"model_dir": str(empty)}))
    named = BatchConfig(**base, local={"model_dir": str(empty), "whisper_dir": str(empty)})
    assert speech.recogniser_configured(named)
    assert not speech.recogniser_configured(BatchConfig(**base, backend="fal"))
    on = BatchConfig(**base, backend="fal", fal={"speech_recognition": True})
    assert speech.recogniser_configured(on)


def test_no_whisper_is_a_clear_error(tmp_path: Path) -> None:
    config = BatchConfig(manifest="m.jsonl", work_dir=str(tmp_path), target=str(tmp_path / "o"))
    wav = write_narration(tmp_path / "a.wav", 1.0)
    with pytest.raises(speech.SpeechError, match="AVATARFLOW_LOCAL_WHISPER_DIR"):
        speech.recognise(_plan(), str(wav), config)


# --- fal ----------------------------------------------------------------------------------------


def _fal_config(fake: FakeFal, tmp_path: Path, **fal: Any) -> BatchConfig:
    return BatchConfig(
        manifest=str(tmp_path / "m.jsonl"),
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        backend="fal",
        fal=fake.settings(speech_recognition=True, concurrency_limit=None, **fal),
    )


def _status_polls(fake: FakeFal) -> int:
    return fake.counts["status"]


def test_fal_whisper_words_billed_once_kept_and_counted_in_the_rows_cost(
    fake: FakeFal, tmp_path: Path
) -> None:
    config = _fal_config(fake, tmp_path)
    wav = write_narration(tmp_path / "n.wav", 8.0)
    fake.speak(wav.read_bytes(), SCRIPT)

    words = speech.recognise(_plan(), str(wav), config)

    assert [w.text for w in words] == SCRIPT.split()
    _in_order_within(words, 8.0)
    bursts = voiced_bursts(_decode_audio(wav.read_bytes()))
    assert all(any(a <= w.start_s and w.end_s <= b for a, b in bursts) for w in words)
    assert fake.counts[WHISPER_APP] == 1
    assert fake.submissions == 1
    assert fake.payloads[0]["chunk_level"] == "word"
    units = 8.0 * WHISPER_UNITS_PER_AUDIO_S
    assert fake.billed_units == pytest.approx(units)
    ledger = Ledger.for_run(config)
    kept = ledger.recognised("row-1", "a" * 64)
    assert kept is not None
    assert kept.request_id == fake.request_ids[0]
    assert kept.cost_usd == pytest.approx(units * config.fal.whisper_price_per_unit)
    assert paid_per_row(ledger)["row-1"] == pytest.approx((units, kept.cost_usd))

    polls = _status_polls(fake)
    assert speech.recognise(_plan(), str(wav), config) == words  # the rerun: from the ledger
    assert fake.submissions == 1
    assert _status_polls(fake) == polls
    assert fake.billed_units == pytest.approx(units)


def test_fal_whisper_unregistered_audio_gives_a_placeholder_per_burst(
    fake: FakeFal, tmp_path: Path
) -> None:
    wav = write_narration(tmp_path / "n.wav", 8.0, pause_every_s=2.5)
    words = speech.recognise(_plan(), str(wav), _fal_config(fake, tmp_path))
    assert len(words) == len(voiced_bursts(_decode_audio(wav.read_bytes()))) >= 3
    assert {w.text for w in words} == {PLACEHOLDER_WORD}
    _in_order_within(words, 8.0)


def test_fal_whisper_failed_request_is_resubmitted_and_billed_once(
    fake: FakeFal, tmp_path: Path
) -> None:
    from tests.fakes.fal_server import Faults

    fake.reset(Faults(completed_error=1, status_5xx=1))
    wav = write_narration(tmp_path / "n.wav", 3.0)
    fake.speak(hashlib.sha256(wav.read_bytes()).hexdigest(), "hello there")
    config = _fal_config(fake, tmp_path)

    words = speech.recognise(_plan(), str(wav), config)

    assert [w.text for w in words] == ["hello", "there"]
    assert fake.counts[WHISPER_APP] == 2  # the 503 failure is not billed; its resubmit is
    assert fake.billed_units == pytest.approx(3.0 * WHISPER_UNITS_PER_AUDIO_S)
    request = Ledger.for_run(config).request("row-1", "a" * 64, SPEECH)
    assert request is not None
    assert request.request_id == fake.request_ids[1]
    assert request.replaced == (fake.request_ids[0],)


HARNESS = """
import sys
from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.speech import recognise
from tests.factories import make_plan, make_row
config = BatchConfig.model_validate_json(sys.argv[1])
plan = make_plan(make_row(sys.argv[2]), input_hash=sys.argv[3])
print(recognise(plan, sys.argv[4], config))
"""


def test_fal_whisper_killed_during_the_wait_then_rerun_polls_the_known_request(
    fake: FakeFal, tmp_path: Path
) -> None:
    fake.latency_s = 3.0
    config = _fal_config(fake, tmp_path)
    wav = write_narration(tmp_path / "n.wav", 4.0)
    fake.speak(wav.read_bytes(), "one two three")
    env = {**os.environ, **fake.env(), "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", HARNESS, config.model_dump_json(), "row-1", "a" * 64, str(wav)]
    log = tmp_path / "harness.log"
    state = Path(config.state_url)
    deadline = time.monotonic() + 120
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=out)
        try:
            while not list(state.glob(f"rows/*/*/{SPEECH}.request.json")):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert fake.state(fake.request_ids[0]) != "COMPLETED"  # killed during the wait
        finally:
            proc.kill()
            proc.wait()

    words = speech.recognise(_plan(), str(wav), config)

    assert [w.text for w in words] == ["one", "two", "three"]
    assert fake.submissions == 1
    assert fake.counts[WHISPER_APP] == 1
    assert fake.billed_units == pytest.approx(4.0 * WHISPER_UNITS_PER_AUDIO_S)
    kept = Ledger.for_run(config).recognised("row-1", "a" * 64)
    assert kept is not None
    assert kept.request_id == fake.request_ids[0]


def test_whisper_estimate_prices_narration_seconds(tmp_path: Path) -> None:
    fal = BatchConfig(manifest="m.jsonl", backend="fal", fal={"whisper_price_per_unit": 0.002})
    units, usd = speech.estimate_recognition(fal, 60.0)
    assert units == pytest.approx(60.0 * fal.fal.whisper_units_per_audio_s)
    assert usd == pytest.approx(units * 0.002)
    assert speech.estimate_recognition(BatchConfig(manifest="m.jsonl"), 60.0) == (0.0, 0.0)


@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_checkpoint_without_a_whisper_gets_one_on_first_use(
    tmp_path: Path, loads: list[str]
) -> None:
    from avatarflow.model.loading import DEFAULTS_FILE
    from avatarflow.tasks.workdir import WorkDir

    config = BatchConfig(
        manifest="m.jsonl",
        target=str(tmp_path / "out"),
        work_dir=str(tmp_path / "work"),
        local={"model_dir": "tiny", "device": "cpu"},
    )
    old = WorkDir(config.work_path).tiny_checkpoint  # as written before it had a Whisper
    old.mkdir(parents=True)
    (old / DEFAULTS_FILE).write_text("{}")
    assert speech.whisper_folder(config) is None
    assert speech.recogniser_configured(config)  # the tiny checkpoint always has one to give

    wav = write_narration(tmp_path / "n.wav", 2.0)
    words = speech.recognise(_plan(), str(wav), config)

    _in_order_within(words, 2.0)
    assert speech.whisper_folder(config) == old / "LongCat-Video-Avatar" / speech.WHISPER_DIR
    assert loads == [str(speech.whisper_folder(config))]


def test_new_inputs_with_the_same_narration_reuse_the_words_unpaid(
    fake: FakeFal, tmp_path: Path
) -> None:
    config = _fal_config(fake, tmp_path)
    wav = write_narration(tmp_path / "n.wav", 3.0)
    fake.speak(wav.read_bytes(), "same words")
    words = speech.recognise(_plan(input_hash="a" * 64), str(wav), config)
    # a re-render with a derived seed: a new input hash, the same narration
    assert speech.recognise(_plan(input_hash="b" * 64), str(wav), config) == words
    assert fake.submissions == 1
    ledger = Ledger.for_run(config)
    assert paid_per_row(ledger)["row-1"][1] == pytest.approx(
        3.0 * WHISPER_UNITS_PER_AUDIO_S * config.fal.whisper_price_per_unit
    )
    # another narration is recognised (and paid) anew
    other = write_narration(tmp_path / "m.wav", 2.0, seed=5)
    speech.recognise(_plan(input_hash="c" * 64), str(other), config)
    assert fake.submissions == 2


def test_fake_whisper_keeps_words_inside_bursts_and_groups_segments() -> None:
    from tests.fakes.fal_server import transcribe
    from tests.media_factory import speechlike

    sound = speechlike(6.0, pauses=[(1.8, 2.4), (4.0, 4.6)], seed=3)
    bursts = voiced_bursts(sound)
    assert len(bursts) == 3
    script = [
        "a",
        "rather",
        "long",
        "sentence",
        "that",
        "spans",
        "every",
        "burst",
        "of",
        "this",
        "narration",
    ]
    out = transcribe(sound, script, "word")
    assert out["text"] == " ".join(script)
    assert [c["text"].strip() for c in out["chunks"]] == script
    for chunk in out["chunks"]:
        start, end = chunk["timestamp"]
        assert any(a <= start <= end <= b for a, b in bursts)
    segments = transcribe(sound, script, "segment")["chunks"]
    assert [tuple(c["timestamp"]) for c in segments] == bursts
    assert " ".join(c["text"].strip() for c in segments) == " ".join(script)
    assert transcribe(np.zeros(16_000, np.float32), script)["chunks"] == []


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from avatarflow.tasks.config import FalSettings, LocalSettings

    monkeypatch.setenv("FAL_SPEECH_RECOGNITION", "1")
    monkeypatch.setenv("FAL_WHISPER_PRICE_PER_UNIT", "0.004")
    monkeypatch.setenv("AVATARFLOW_LOCAL_WHISPER_DIR", str(tmp_path))
    assert FalSettings().speech_recognition
    assert FalSettings().whisper_price_per_unit == 0.004
    assert LocalSettings().whisper_dir == str(tmp_path)
    config = BatchConfig(manifest="m.jsonl", work_dir=str(tmp_path))
    assert speech.whisper_folder(config) == tmp_path
