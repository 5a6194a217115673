"""Captions through the whole flow: on the tiny local checkpoint (its Whisper has random weights:
its words mean nothing, but every stage runs for real) files beside each MP4, the MP4's own
subtitle track read back with PyAV, results, sidecar and report, and reruns; on the loopback fal
service (whose whisper says what a test registered for an audio) the wrong-narration gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from avatarflow.flows.produce import run_batch
from avatarflow.tasks import speech
from avatarflow.tasks.captions import read_track, resolve_mode, to_srt, to_vtt
from avatarflow.tasks.config import BatchConfig, LocalSettings
from avatarflow.tasks.manifest import load_rows
from avatarflow.tasks.plan import prepare_row
from avatarflow.tasks.records import RowResult
from tests.factories import write_manifest, write_narrations
from tests.fakes.fal_server import WHISPER_APP, FakeFal

pytestmark = pytest.mark.usefixtures("prefect_server")

SCRIPT = (
    "Welcome to the course. Today we look at captions, which follow the speech of every "
    "narration, line by line."
)
RECIPE = (
    "The recipe needs four eggs, a cup of flour and some butter. Whisk the eggs until they are "
    "pale, then fold in the flour."
)


@pytest.fixture
def recognitions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The audio paths local Whisper recognised, in order (the real recogniser runs)."""
    calls: list[str] = []
    real = speech._recognise_local

    def counted(audio_path: str, config: BatchConfig) -> Any:
        calls.append(audio_path)
        return real(audio_path, config)

    monkeypatch.setattr(speech, "_recognise_local", counted)
    return calls


def _by_id(results: tuple[RowResult, ...]) -> dict[str, RowResult]:
    return {r.id: r for r in results}


def test_local_rows_with_and_without_a_transcript_publish_captions_and_resume(
    tmp_path: Path, tiny_checkpoint: Path, recognitions: list[str]
) -> None:
    rows = write_narrations(tmp_path, {"scripted": 4.0, "spoken": 3.0})
    rows[0]["transcript"], rows[1]["transcript"] = SCRIPT, None
    target = tmp_path / "out"
    config = BatchConfig(
        manifest=write_manifest(tmp_path / "manifest.parquet", rows),
        target=str(target),
        work_dir=str(tmp_path / "work"),
        local=LocalSettings(model_dir=str(tiny_checkpoint)),
        captions="off",
    )

    # 1. Published without captions (off): no caption files, nothing recognised.
    first = run_batch(config)
    assert first.exit_code == 0, first.results
    assert not list(target.glob("*.vtt"))
    assert recognitions == []

    # 2. Captions on for the same rows: made now, from the ledger's chunks (nothing rendered).
    second = run_batch(config.model_copy(update={"captions": "auto"}))
    assert second.exit_code == 0, second.results
    results = _by_id(second.results)
    assert {r.run_action for r in results.values()} == {"reused"}
    assert len(recognitions) == 2
    for row_id, result in results.items():
        vtt, srt = (target / f"{row_id}.{kind}" for kind in ("vtt", "srt"))
        track = read_track(target / f"{row_id}.mp4")  # the MP4's mov_text track, through PyAV
        assert vtt.read_text() == to_vtt(track)
        assert srt.read_text() == to_srt(track)
        assert result.captions == " ".join(cue.text for cue in track)
        assert result.video_url is not None
        assert result.captions_vtt_url == result.video_url.removesuffix(".mp4") + ".vtt"
        assert result.captions_srt_url == result.video_url.removesuffix(".mp4") + ".srt"
        assert result.qc["qc_captions_status"] == "passed"
        assert all(cue.end_s <= result.duration_s + 0.001 for cue in track)  # type: ignore[operator]
    # the scripted row carries its script's exact words; the other the recognised ones
    assert results["scripted"].captions == " ".join(SCRIPT.split())
    sidecar = json.loads((target / "scripted.json").read_text())
    assert sidecar["captions"]["source"] == "transcript"
    assert sidecar["captions"]["outputs"] == ["vtt", "srt", "track"]
    assert json.loads((target / "spoken.json").read_text())["captions"]["source"] == "speech"
    # random weights: the script is not held against their words, and the gate says so
    assert results["scripted"].qc["qc_captions_wer"] is None
    table = pq.read_table(target / "results.parquet").to_pylist()
    assert {r["id"]: r["captions"] for r in table} == {k: v.captions for k, v in results.items()}
    report = (target / "report.html").read_text()
    assert report.count('<track kind="captions"') == 2

    # 3. A rerun: every row is finished, captions included; nothing is recognised again.
    third = run_batch(config.model_copy(update={"captions": "auto"}))
    assert third.exit_code == 0
    assert {r.run_action for r in third.results} == {"skipped"}
    assert len(recognitions) == 2


def test_auto_captions_are_on_for_transcripts_or_a_configured_recogniser(tmp_path: Path) -> None:
    local = BatchConfig(manifest="m.parquet", local=LocalSettings(model_dir="tiny"))
    assert resolve_mode(local, transcript_column=False).captions == "all"  # tiny has a Whisper
    fal = BatchConfig(manifest="m.parquet", backend="fal")
    assert resolve_mode(fal, transcript_column=False).captions == "off"  # would pay: asked only
    assert resolve_mode(fal, transcript_column=True).captions == "all"
    assert resolve_mode(fal.model_copy(update={"captions": "vtt"}), False).captions == "vtt"
    no_whisper = BatchConfig(manifest="m", local=LocalSettings(model_dir=str(tmp_path)))
    assert resolve_mode(no_whisper, transcript_column=False).captions == "off"
    # a checkpoint without Whisper cannot time a script: auto leaves captions off
    assert resolve_mode(no_whisper, transcript_column=True).captions == "off"


def test_fal_row_whose_transcript_belongs_to_another_rows_audio_is_rejected_by_the_gate(
    fake: FakeFal, tmp_path: Path
) -> None:
    rows = write_narrations(tmp_path, {"intro": 6.0, "recipe": 6.0})
    rows[0]["transcript"] = SCRIPT
    rows[1]["transcript"] = SCRIPT  # pasted from the row above: the audio says the recipe
    target = tmp_path / "out"
    config = BatchConfig(
        manifest=write_manifest(tmp_path / "manifest.parquet", rows),
        target=str(target),
        backend="fal",
        work_dir=str(tmp_path / "work"),
        fal=fake.settings(),
    )
    # What each narration says, for the fake whisper: keyed by the WAV that recognition uploads.
    said = {"intro": SCRIPT, "recipe": RECIPE}
    for row in load_rows.fn(config).rows:
        pcm = Path(prepare_row.fn(row, config).audio.pcm_path)
        fake.speak(pcm.read_bytes(), said[row.id])

    outcome = run_batch(config)

    results = _by_id(outcome.results)
    assert results["intro"].status == "published", results["intro"].error
    assert results["intro"].qc["qc_captions_status"] == "passed"
    assert results["intro"].qc["qc_captions_wer"] == 0.0
    assert (target / "intro.vtt").exists()
    recipe = results["recipe"]
    assert recipe.status == "rejected"
    assert recipe.error is not None
    assert recipe.error.startswith("QC: qc captions: ")
    assert "the transcript disagrees with the recognised speech (word error rate" in recipe.error
    assert "is this row's narration the right file?" in recipe.error
    assert recipe.qc["qc_captions_wer"] > recipe.qc["qc_captions_max_wer"]
    rejected = target / "_rejected"
    assert {p.name for p in rejected.iterdir()} >= {"recipe.mp4", "recipe.vtt", "recipe.srt"}
    assert not (target / "recipe.mp4").exists()
    assert not (target / "recipe.vtt").exists()
    assert read_track(rejected / "recipe.mp4")  # kept with its captions, for a person to judge
    assert fake.counts[WHISPER_APP] == 2  # one recognition per row, each billed once

    # A rerun re-checks the rejected row from the ledger: nothing submitted, nothing billed.
    submitted, billed = fake.submissions, fake.billed_units
    again = run_batch(config)
    assert _by_id(again.results)["recipe"].status == "rejected"
    assert (fake.submissions, fake.billed_units) == (submitted, billed)
