"""Captions: alignment of a script to recognised words, cue limits, WebVTT/SRT, the mov_text track
and the captions gate, on synthetic word timings."""

from __future__ import annotations

import random
from pathlib import Path

import av
import pytest

from avatarflow.tasks.captions import (
    Cue,
    align,
    build_cues,
    captions_gate,
    coverage,
    edit_path,
    mux_track,
    normalise,
    read_track,
    to_srt,
    to_vtt,
    with_gate,
    word_error_rate,
)
from avatarflow.tasks.config import CaptionSettings
from avatarflow.tasks.records import QCReport, Word
from tests.media_factory import write_mp4

SCRIPT = (
    "Welcome to the quarterly update. Revenue grew in every region, and the new product line, "
    "launched in March, now makes up a third of sales. Our support team answered more tickets "
    "than ever; response times fell by half. Next quarter we open two offices: one in Lisbon "
    "and one in Osaka. Questions? Send them to the usual address, and thank you for listening."
)
OTHER_SCRIPT = (
    "The recipe needs four eggs, a cup of flour and some butter. Whisk the eggs until they are "
    "pale, fold in the flour, and bake for twenty minutes at a moderate heat."
)
SETTINGS = CaptionSettings()


def speak(script: str, rate_wps: float = 2.6, pause_after: int | None = None) -> list[Word]:
    """Recognised words for a script read evenly (lower case, no punctuation, as Whisper might),
    with a 2.5 s pause after word pause_after."""
    words, at = [], 0.3
    for k, token in enumerate(script.split()):
        length = 0.8 / rate_wps + 0.04 * len(token)
        words.append(Word(normalise(token), round(at, 3), round(at + length, 3)))
        at += length + 0.2 / rate_wps
        if k == pause_after:
            at += 2.5
    return words


def mishear(words: list[Word], seed: int = 0) -> list[Word]:
    """A recogniser's mistakes: every 7th word missed, every 5th misheard, an extra word after
    every 11th."""
    rng = random.Random(seed)
    out = []
    for k, word in enumerate(words):
        if k % 7 == 3:
            continue
        if k % 5 == 1:
            word = Word("".join(rng.sample("qxzvwk", 4)), word.start_s, word.end_s)
        out.append(word)
        if k % 11 == 6:
            out.append(Word("um", word.end_s, word.end_s + 0.05))
    return out


def duration_of(words: list[Word]) -> float:
    return words[-1].end_s + 1.0


def check_cues(cues: list[Cue], settings: CaptionSettings, duration_s: float) -> None:
    """Every limit the cues must keep."""
    for cue in cues:
        assert 1 <= len(cue.lines) <= settings.max_lines
        assert all(len(line) <= settings.max_line_chars for line in cue.lines), cue
        assert 0 <= cue.start_s < cue.end_s <= duration_s
        assert cue.end_s - cue.start_s <= settings.max_cue_s + 1e-9
    for a, b in zip(cues, cues[1:], strict=False):
        assert b.start_s >= a.end_s + settings.min_gap_s - 1e-9, (a, b)


def test_align_keeps_the_script_words_through_missed_misheard_and_extra_words() -> None:
    heard = mishear(speak(SCRIPT))
    aligned = align(SCRIPT, heard, duration_of(heard))
    assert [w.text for w in aligned] == SCRIPT.split()
    starts = [w.start_s for w in aligned]
    assert starts == sorted(starts)
    assert all(w.start_s <= w.end_s for w in aligned)
    # a matched word keeps its recognised time
    exact = {w.text: w for w in speak(SCRIPT)}
    assert aligned[0].start_s == exact["welcome"].start_s
    # a missed word (index 3) sits between its neighbours
    assert aligned[2].end_s <= aligned[3].start_s <= aligned[4].start_s


def test_align_without_any_recognised_word_spreads_the_script_over_the_audio() -> None:
    aligned = align("one two three", [], 6.0)
    assert [w.text for w in aligned] == ["one", "two", "three"]
    assert aligned[0].start_s == 0.0
    assert aligned[-1].end_s == pytest.approx(6.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cues_carry_the_script_exactly_within_the_limits(seed: int) -> None:
    heard = mishear(speak(SCRIPT, pause_after=20), seed)
    duration = duration_of(heard)
    cues = build_cues(align(SCRIPT, heard, duration), SETTINGS, duration)
    assert " ".join(c.text for c in cues) == " ".join(SCRIPT.split())
    check_cues(cues, SETTINGS, duration)
    assert len(cues) > 5


def test_cues_break_at_sentences_and_never_span_a_long_pause() -> None:
    words = speak(SCRIPT, pause_after=20)
    cues = build_cues(align(SCRIPT, words, duration_of(words)), SETTINGS, duration_of(words))
    pause_start, pause_end = words[20].end_s, words[21].start_s
    assert not any(c.start_s < pause_start and c.end_s > pause_end for c in cues)
    sentence_ends = [k for k, c in enumerate(cues) if c.text.endswith((".", "?"))]
    # every sentence end closes its cue: no cue continues past a full stop
    assert all("." not in c.text[:-1].replace("?", ".") for c in cues)
    assert len(sentence_ends) >= 5


def test_cue_lines_avoid_ending_on_a_weak_word_and_prefer_clause_ends() -> None:
    script = "We met the team from the northern office, and the partners from the south"
    words = speak(script)
    cues = build_cues(words_as(script, words), SETTINGS, duration_of(words))
    lines = [line for c in cues for line in c.lines]
    assert all(normalise(line.split()[-1]) not in {"the", "from", "and"} for line in lines[:-1])
    assert any(line.endswith("office,") for line in lines)


def words_as(script: str, words: list[Word]) -> list[Word]:
    return align(script, words, duration_of(words))


def test_reading_speed_is_met_where_the_pauses_allow() -> None:
    # fast speech with room after each sentence: cues are held until 17 cps is met
    script = "Short fast sentence one here. Another quick one follows now. And a third."
    words, out, at = speak(script, rate_wps=6.0), [], 0.0
    for w in words:  # 1.5 s of silence after every sentence
        out.append(Word(w.text, w.start_s + at, w.end_s + at))
        at += 1.5 if w.text in ("here", "now") else 0
    duration = out[-1].end_s + 3.0
    cues = build_cues(align(script, out, duration), SETTINGS, duration)
    check_cues(cues, SETTINGS, duration)
    for cue in cues:
        assert len(cue.text) / (cue.end_s - cue.start_s) <= SETTINGS.max_cps + 0.05


def test_crowded_speech_never_overlaps_and_stays_within_the_audio() -> None:
    # words with overlapping, zero-length and out-of-range times, as a poor alignment can give
    words = [Word(f"w{k}.", 1.0 + 0.01 * k, 1.0 + 0.01 * k) for k in range(30)]
    cues = build_cues(words, SETTINGS, 2.0)
    assert " ".join(c.text for c in cues) == " ".join(w.text for w in words)
    for a, b in zip(cues, cues[1:], strict=False):
        assert b.start_s >= a.end_s
    assert all(c.end_s <= 2.0 for c in cues)


def test_vtt_and_srt_formats() -> None:
    cues = [Cue(0.5, 2.25, ("Fish & chips", "<cheap> today")), Cue(3661.001, 3662.0, ("Bye.",))]
    assert to_vtt(cues) == (
        "WEBVTT\n\n"
        "00:00:00.500 --> 00:00:02.250\nFish &amp; chips\n&lt;cheap&gt; today\n\n"
        "01:01:01.001 --> 01:01:02.000\nBye.\n"
    )
    assert to_srt(cues) == (
        "1\n00:00:00,500 --> 00:00:02,250\nFish & chips\n<cheap> today\n\n"
        "2\n01:01:01,001 --> 01:01:02,000\nBye.\n"
    )


def levenshtein(a: list[str], b: list[str]) -> int:
    """The textbook full-table edit distance, to check the banded one against."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row = row, [i]
        for j, y in enumerate(b, 1):
            row.append(min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (x != y)))
    return row[-1]


@pytest.mark.parametrize("seed", range(20))
def test_edit_path_gives_the_edit_distance_and_a_path_that_spends_it(seed: int) -> None:
    rng = random.Random(seed)
    a = [rng.choice("abcde") for _ in range(rng.randrange(0, 40))]
    b = [rng.choice("abcde") for _ in range(rng.randrange(0, 40))]
    distance, pairs = edit_path(a, b)
    assert distance == levenshtein(a, b)
    assert [i for i, _ in pairs if i is not None] == list(range(len(a)))
    assert [j for _, j in pairs if j is not None] == list(range(len(b)))
    spent = sum(1 for i, j in pairs if i is None or j is None or a[i] != b[j])
    assert spent == distance


def test_a_long_script_that_repeats_itself_still_aligns_in_order() -> None:
    # repeated passages give a longest-common-block matcher anchors in the wrong repeat
    script = " ".join([SCRIPT] * 12)
    heard = mishear(speak(script, pause_after=300))
    duration = duration_of(heard)
    aligned = align(script, heard, duration)
    assert [w.text for w in aligned] == script.split()
    cues = build_cues(aligned, SETTINGS, duration)
    check_cues(cues, SETTINGS, duration)
    covered = coverage(cues, heard)
    assert covered is not None
    assert covered > 0.97


def test_word_error_rate() -> None:
    assert word_error_rate(["Hello,", "World!"], ["hello", "world"]) == 0.0
    assert word_error_rate(["a", "b", "c", "d"], ["a", "x", "c", "d"]) == 0.25
    assert word_error_rate(["a", "b", "c", "d"], ["a", "c", "d"]) == 0.25
    assert word_error_rate(["a", "b"], ["a", "b", "c", "d"]) == 1.0
    assert word_error_rate([], []) == 0.0


def test_gate_passes_the_right_narration_and_fails_another_rows() -> None:
    heard = mishear(speak(SCRIPT))
    duration = duration_of(heard)
    cues = build_cues(align(SCRIPT, heard, duration), SETTINGS, duration)
    good = captions_gate(cues, heard, SCRIPT, duration, SETTINGS)
    assert good.status == "passed", good.detail
    assert good.value is not None
    assert good.value >= SETTINGS.min_coverage
    assert good.measured["wer"] is not None
    assert good.measured["wer"] < SETTINGS.max_wer

    other = speak(OTHER_SCRIPT)  # the audio of another row
    duration = duration_of(other)
    cues = build_cues(align(SCRIPT, other, duration), SETTINGS, duration)
    bad = captions_gate(cues, other, SCRIPT, duration, SETTINGS)
    assert bad.status == "failed"
    assert "transcript disagrees with the recognised speech" in bad.detail
    assert "right file" in bad.detail
    assert bad.measured["wer"] is not None
    assert bad.measured["wer"] > 0.8


def test_gate_without_judging_words_notes_it_and_checks_the_rest() -> None:
    other = speak(OTHER_SCRIPT)
    duration = duration_of(other)
    cues = build_cues(align(SCRIPT, other, duration), SETTINGS, duration)
    gate = captions_gate(cues, other, SCRIPT, duration, SETTINGS, judge_words=False)
    assert gate.status == "passed"
    assert "not judged" in gate.detail
    assert gate.measured["wer"] is None


def test_gate_fails_overlaps_cues_past_the_end_and_uncovered_speech() -> None:
    words = speak("one two three four five six")
    overlapping = [Cue(0.0, 2.0, ("one two three",)), Cue(1.5, 4.0, ("four five six",))]
    gate = captions_gate(overlapping, words, None, 3.0, SETTINGS)
    assert gate.status == "failed"
    assert "overlap" in gate.detail
    assert "past the end" in gate.detail
    short = [Cue(0.0, 0.5, ("one",))]
    gate = captions_gate(short, words, None, 10.0, SETTINGS)
    assert gate.status == "failed"
    assert "cover" in gate.detail


def test_with_gate_fails_the_report_with_the_gates_reason() -> None:
    gate = captions_gate([Cue(0, 1, ("a",)), Cue(0.5, 2, ("b",))], [], None, 5.0, SETTINGS)
    report = with_gate(QCReport(True), gate)
    assert not report.passed
    assert report.reasons == (f"qc captions: {gate.detail}",)
    assert report.to_columns()["qc_captions_status"] == "failed"
    assert with_gate(QCReport(True), captions_gate([], [], None, 5.0, SETTINGS)).passed


def test_mux_track_adds_a_mov_text_track_and_copies_the_rest(tmp_path: Path) -> None:
    video = write_mp4(tmp_path / "in.mp4", seconds=3.0)
    cues = [Cue(0.2, 1.4, ("Hello there,", "world.")), Cue(1.6, 2.9, ("Ünïcode — fine.",))]
    out = mux_track(video, cues, tmp_path / "out.mp4")
    with av.open(str(video)) as a, av.open(out) as b:
        assert [s.type for s in b.streams] == ["video", "subtitle"]
        assert b.streams.subtitles[0].codec_context.name == "mov_text"
        original = [bytes(p) for p in a.demux(a.streams.video[0]) if p.size]
        copied = [bytes(p) for p in b.demux(b.streams.video[0]) if p.size]
        assert copied == original  # stream copy: not re-encoded
    assert read_track(out) == cues
    head = Path(out).read_bytes()[:4096]
    assert head.find(b"moov") < head.find(b"mdat") or b"mdat" not in head  # faststart
