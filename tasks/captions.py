"""Captions: the narration's words timed to its speech, cut into cues, written as WebVTT and SRT,
muxed into the MP4 as a mov_text track, and judged by the captions gate.

With a transcript, the cues carry the script's own words: `align` times each of them from the
recognised words (a word-level edit path on normalised tokens: a misheard word takes the time of
the word it was heard as, a missed run is spread over the gap its neighbours leave). Without one,
the recognised words are the captions.
"""

from __future__ import annotations

import fractions
import hashlib
import json
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import numpy as np

from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.config import CAPTIONS_GATE, BatchConfig, CaptionSettings
from avatarflow.tasks.records import (
    GateResult,
    QCReport,
    Row,
    RowPlan,
    SidecarCaptions,
    Word,
)
from avatarflow.tasks.speech import recognise, recogniser_configured
from avatarflow.tasks.workdir import WorkDir

_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*$")
_CLAUSE_END = re.compile(r"[,;:–—][\"'”’)\]]*$")
# Words a line or cue should not end on: they belong with the word after them.
_WEAK = frozenset(
    {"a", "an", "the", "and", "or", "but", "nor", "of", "to", "in", "on", "at", "by", "for"}
    | {"from", "with", "as", "into", "onto", "than", "that", "my", "your", "his", "her", "its"}
    | {"our", "their", "this", "these", "those"}
)
_END_TOLERANCE_S = 0.001  # cue times are written in whole milliseconds
_MIN_SHOWN_S = 0.25  # a cue shown for less is a flash nobody reads (crowded, misheard words)
# mov_text needs an ASS header to open its encoder (it keeps the style, not the text).
_ASS_HEADER = (
    b"[Script Info]\nScriptType: v4.00+\nPlayResX: 384\nPlayResY: 288\n\n[V4+ Styles]\n"
    b"Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour, BackColour,"
    b" Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle, BorderStyle, Outline,"
    b" Shadow, Alignment, MarginL, MarginR, MarginV, Encoding\n"
    b"Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0\n\n"
    b"[Events]\nFormat: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text\n"
)


@dataclass(frozen=True)
class Cue:
    """One caption: its lines, shown from start_s to end_s."""

    start_s: float
    end_s: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)


def normalise(token: str) -> str:
    """A word as speech recognition would give it: lower case, letters and digits only."""
    return "".join(c for c in token.casefold() if c.isalnum())


def script_words(script: str) -> list[str]:
    """The script's words as written (punctuation attached), in order."""
    return script.split()


# --- alignment ------------------------------------------------------------------------------------


def align(script: str, recognised: Sequence[Word], duration_s: float) -> list[Word]:
    """Every word of the script, in order and as written, with a time taken from the recognised
    words: a matched or misheard word keeps the time of the recognised word it lines up with; a
    run the recogniser missed is spread over the gap between its neighbours (0 and duration_s at
    the ends). Recognised words the script lacks are dropped."""
    words = script_words(script)
    times: list[tuple[float, float] | None] = [None] * len(words)
    ours, theirs = [normalise(w) for w in words], [normalise(w.text) for w in recognised]
    for i, j in edit_path(ours, theirs)[1]:
        if i is not None and j is not None:
            times[i] = (recognised[j].start_s, recognised[j].end_s)
    _fill_missed(words, times, duration_s)
    return [Word(w, *t) for w, t in zip(words, times, strict=True) if t is not None]


# Back pointers of edit_path: from the cell up-left (match or substitution), up (a script word
# with no recognised one) or left (a recognised word with no script one).
_DIAG, _UP, _LEFT = 0, 1, 2
_FAR = 1 << 40  # the cost of a cell outside the band


def edit_path(
    ours: Sequence[str], theirs: Sequence[str]
) -> tuple[int, list[tuple[int | None, int | None]]]:
    """The word edit distance between two token lists and the pairing that reaches it, in
    order: (i, j) matched or substituted, (i, None) deleted, (None, j) inserted.

    Levenshtein over a band around the proportional diagonal (a tenth of the longer list, at
    least 64 and twice the length difference wide on each side): both lists follow one speech
    in time, so the best path stays near it, and a long narration needs neither quadratic
    memory nor time. Each row is computed with numpy (insertions by a running minimum)."""
    n, m = len(ours), len(theirs)
    vocabulary: dict[str, int] = {}
    a = np.array([vocabulary.setdefault(t, len(vocabulary)) for t in ours], dtype=np.int64)
    b = np.array([vocabulary.setdefault(t, len(vocabulary)) for t in theirs], dtype=np.int64)
    width = max(64, 2 * abs(n - m), max(n, m) // 10)
    bands: list[tuple[int, np.ndarray]] = []
    previous = np.full(m + 1, _FAR, dtype=np.int64)
    for i in range(n + 1):
        centre = round(i * m / n) if n else m
        lo, hi = max(0, centre - width), min(m, centre + width)
        js = np.arange(lo, hi + 1)
        if i == 0:
            cost, pointer = js.copy(), np.full(len(js), _LEFT, dtype=np.int8)
        else:
            up = previous[js] + 1
            diag = np.full(len(js), _FAR, dtype=np.int64)
            inner = js >= 1
            diag[inner] = previous[js[inner] - 1] + (b[js[inner] - 1] != a[i - 1])
            cost = np.minimum(diag, up)
            pointer = np.where(diag <= up, _DIAG, _UP).astype(np.int8)
            # an insertion from the left: cost[j] = min over k <= j of cost[k] + (j - k)
            reach = js + np.minimum.accumulate(cost - js)
            left = reach < cost
            cost, pointer[left] = np.where(left, reach, cost), _LEFT
        bands.append((lo, pointer))
        previous = np.full(m + 1, _FAR, dtype=np.int64)
        previous[lo : hi + 1] = cost
    distance = int(previous[m])
    pairs: list[tuple[int | None, int | None]] = []
    i, j = n, m
    while i > 0 or j > 0:
        lo, pointer = bands[i]
        step = pointer[j - lo]
        if step == _DIAG:
            i, j = i - 1, j - 1
            pairs.append((i, j))
        elif step == _UP:
            i -= 1
            pairs.append((i, None))
        else:
            j -= 1
            pairs.append((None, j))
    return distance, pairs[::-1]


def _spread(words: Sequence[str], start_s: float, end_s: float) -> list[tuple[float, float] | None]:
    """Times for words said one after another between start_s and end_s, by their length."""
    weights = [len(w) + 1 for w in words]  # +1: the gap a word boundary takes
    total, at, spans = sum(weights), start_s, list[tuple[float, float] | None]()
    for weight in weights:
        step = (end_s - start_s) * weight / total
        spans.append((at, at + step))
        at += step
    return spans


def _fill_missed(words: list[str], times: list[tuple[float, float] | None], end: float) -> None:
    """Time every run of untimed words within the gap its timed neighbours leave."""
    k = 0
    while k < len(times):
        if times[k] is not None:
            k += 1
            continue
        stop = k
        while stop < len(times) and times[stop] is None:
            stop += 1
        before = times[k - 1][1] if k else 0.0  # type: ignore[index]  # timed by the loop
        after = times[stop][0] if stop < len(times) else end  # type: ignore[index]
        times[k:stop] = _spread(words[k:stop], before, max(before, after))
        k = stop


# --- cues -----------------------------------------------------------------------------------------


def build_cues(words: Sequence[Word], settings: CaptionSettings, duration_s: float) -> list[Cue]:
    """Cut timed words into cues within the settings' limits: sentence ends close a cue, a long
    pause splits one, a full cue breaks at its last clause boundary (else before a weak word);
    each cue then stays up long enough to read, where the gap before the next allows."""
    groups: list[list[Word]] = []
    current: list[Word] = []
    for word in words:
        if current and word.start_s - current[-1].end_s > settings.pause_s:
            groups.append(current)
            current = []
        too_long = bool(current) and word.end_s - current[0].start_s > settings.max_cue_s
        if current and (too_long or _lines([w.text for w in (*current, word)], settings) is None):
            keep = _break_point(current)
            groups.append(current[:keep])
            current = current[keep:]
        current.append(word)
        if _SENTENCE_END.search(word.text):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return _timed(groups, settings, duration_s)


def _break_point(words: Sequence[Word]) -> int:
    """Where to end a cue that is full: after its last clause or sentence end in its second half,
    else before any trailing weak words (never leaving it empty)."""
    texts = [w.text for w in words]
    for k in range(len(texts) - 1, len(texts) // 2 - 1, -1):
        if k > 0 and (_CLAUSE_END.search(texts[k - 1]) or _SENTENCE_END.search(texts[k - 1])):
            return k
    keep = len(texts)
    while keep > 1 and normalise(texts[keep - 1]) in _WEAK:
        keep -= 1
    return keep


def _lines(texts: Sequence[str], settings: CaptionSettings) -> tuple[str, ...] | None:
    """The words as at most max_lines lines of at most max_line_chars, or None if they do not fit.

    A line break goes where the lines are best balanced, preferring clause ends and never after a
    weak word when another break fits; one over-long word is a line of its own."""
    text = " ".join(texts)
    if len(text) <= settings.max_line_chars or len(texts) == 1:
        return (text,)
    if settings.max_lines < 2:
        return None
    below = settings.model_copy(update={"max_lines": settings.max_lines - 1})
    best: tuple[float, tuple[str, ...]] | None = None
    for k in range(1, len(texts)):
        top = " ".join(texts[:k])
        if len(top) > settings.max_line_chars:
            break
        tail = _lines(texts[k:], below)
        if tail is None:
            continue
        score = abs(len(top) - len(tail[0])) / settings.max_line_chars
        if _CLAUSE_END.search(texts[k - 1]) or _SENTENCE_END.search(texts[k - 1]):
            score -= 1.0
        if normalise(texts[k - 1]) in _WEAK:
            score += 1.0
        if best is None or score < best[0]:
            best = (score, (top, *tail))
    return None if best is None else best[1]


def _timed(groups: list[list[Word]], settings: CaptionSettings, duration_s: float) -> list[Cue]:
    """Cues for word groups: each from its first word to its last, held longer (up to the next
    cue minus min_gap_s, and the end) to meet min_cue_s and max_cps, and shown at least
    _MIN_SHOWN_S even where that delays the next cue; never overlapping."""
    cues: list[Cue] = []
    for k, group in enumerate(groups):
        lines = _lines([w.text for w in group], settings) or (" ".join(w.text for w in group),)
        start = group[0].start_s
        if cues:
            start = max(start, cues[-1].end_s + settings.min_gap_s)
        start = min(start, duration_s)
        chars = sum(len(line) for line in lines)
        wanted = max(group[-1].end_s, start + settings.min_cue_s, start + chars / settings.max_cps)
        limit = duration_s
        if k + 1 < len(groups):
            limit = min(limit, groups[k + 1][0].start_s - settings.min_gap_s)
        end = max(min(wanted, limit), group[-1].end_s, start + _MIN_SHOWN_S)
        end = min(end, duration_s)
        cues.append(Cue(round(start, 3), round(max(end, start), 3), lines))
    return cues


# --- files ----------------------------------------------------------------------------------------


def _clock(seconds: float, decimal: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def to_vtt(cues: Sequence[Cue]) -> str:
    """The cues as a WebVTT file (text escaped: &, < and > are markup there)."""
    blocks = ["WEBVTT"]
    for cue in cues:
        text = "\n".join(_vtt_escape(line) for line in cue.lines)
        blocks.append(f"{_clock(cue.start_s, '.')} --> {_clock(cue.end_s, '.')}\n{text}")
    return "\n\n".join(blocks) + "\n"


def _vtt_escape(line: str) -> str:
    return line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_srt(cues: Sequence[Cue]) -> str:
    """The cues as a numbered SubRip file."""
    blocks = [
        f"{n}\n{_clock(c.start_s, ',')} --> {_clock(c.end_s, ',')}\n" + "\n".join(c.lines)
        for n, c in enumerate(cues, 1)
    ]
    return "\n\n".join(blocks) + "\n"


def mux_track(video_path: str | Path, cues: Sequence[Cue], dest: str | Path) -> str:
    """Copy the MP4's streams untouched into dest with the cues as a mov_text subtitle track
    (faststart kept); dest's path."""
    with (
        av.open(str(video_path)) as src,
        av.open(str(dest), "w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        streams = {
            s.index: out.add_stream_from_template(s) for s in src.streams if s.type != "subtitle"
        }
        track = out.add_stream("mov_text")
        track.time_base = fractions.Fraction(1, 1000)
        track.codec_context.subtitle_header = _ASS_HEADER
        track.metadata["handler_name"] = "Captions"
        for packet in src.demux():
            if packet.dts is None or packet.stream.index not in streams:
                continue  # the demuxer's flush packets; an earlier subtitle track
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
        for cue in cues:
            data = "\n".join(cue.lines).encode()
            packet = av.Packet(struct.pack(">H", len(data)) + data)  # tx3g: length, UTF-8 text
            start = round(cue.start_s * 1000)
            packet.stream, packet.time_base = track, track.time_base
            packet.pts = packet.dts = start
            packet.duration = round(cue.end_s * 1000) - start
            out.mux(packet)
    return str(dest)


def read_track(video_path: str | Path) -> list[Cue]:
    """The cues of an MP4's first subtitle track, read back through PyAV's decoder."""
    cues = []
    with av.open(str(video_path)) as container:
        stream = container.streams.subtitles[0]
        for packet in container.demux(stream):
            base = stream.time_base
            if packet.size == 0 or packet.pts is None or packet.duration is None or base is None:
                continue
            start = float(packet.pts * base)
            end = float((packet.pts + packet.duration) * base)
            for subtitle in packet.decode():
                text = subtitle.dialogue.decode()  # type: ignore[union-attr]
                cues.append(Cue(start, end, tuple(text.split("\n"))))
    return cues


# --- the captions gate ----------------------------------------------------------------------------


def word_error_rate(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """(substitutions + deletions + insertions) / reference words, on normalised tokens."""
    ref = [t for t in map(normalise, reference) if t]
    hyp = [t for t in map(normalise, hypothesis) if t]
    if not ref:
        return 0.0 if not hyp else 1.0
    return edit_path(ref, hyp)[0] / len(ref)


def _union(spans: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        elif end > start:
            merged.append((start, end))
    return merged


def coverage(cues: Sequence[Cue], recognised: Sequence[Word]) -> float | None:
    """The share of the recognised speech's time that some cue is on screen for (None: no
    speech was recognised)."""
    speech = _union([(w.start_s, w.end_s) for w in recognised])
    total = sum(end - start for start, end in speech)
    if total <= 0:
        return None
    shown = _union([(c.start_s, c.end_s) for c in cues])
    covered, k = 0.0, 0
    for start, end in speech:  # both lists are sorted and disjoint: one sweep
        while k < len(shown) and shown[k][1] <= start:
            k += 1
        for s2, e2 in shown[k:]:
            if s2 >= end:
                break
            covered += min(end, e2) - max(start, s2)
    return covered / total


def captions_gate(
    cues: Sequence[Cue],
    recognised: Sequence[Word],
    script: str | None,
    duration_s: float,
    settings: CaptionSettings,
    judge_words: bool = True,
) -> GateResult:
    """The captions gate: the cues cover the recognised speech (value: coverage, threshold:
    min_coverage), none overlaps another or runs past the end, and with a script its words agree
    with the recognised ones (measured wer against max_wer). judge_words=False (a recogniser
    whose words mean nothing, e.g. random weights) measures no agreement and says so."""
    problems, notes = [], []
    covered = coverage(cues, recognised)
    if covered is None:
        notes.append("no speech recognised")
    elif covered < settings.min_coverage:
        problems.append(f"cues cover {covered:.0%} of the speech (< {settings.min_coverage:.0%})")
    overlaps = sum(1 for a, b in zip(cues, cues[1:], strict=False) if b.start_s < a.end_s)
    if overlaps:
        problems.append(f"{overlaps} cue(s) overlap the next")
    past = sum(1 for c in cues if c.end_s > duration_s + _END_TOLERANCE_S)
    if past:
        problems.append(f"{past} cue(s) run past the end ({duration_s:.3f} s)")
    wer = None
    if script is not None and not judge_words:
        notes.append("script agreement not judged: the recogniser's words are meaningless")
    elif script is not None:
        wer = word_error_rate(script_words(script), [w.text for w in recognised])
        if wer > settings.max_wer:
            problems.append(
                f"the transcript disagrees with the recognised speech (word error rate {wer:.2f} "
                f"> {settings.max_wer:g}): is this row's narration the right file?"
            )
    detail = "; ".join(problems) or "; ".join(notes) or "ok"
    return GateResult(
        CAPTIONS_GATE,
        "failed" if problems else "passed",
        None if covered is None else round(covered, 4),
        settings.min_coverage,
        detail,
        {
            "cues": len(cues),
            "recognised_words": len(recognised),
            "overlaps": overlaps,
            "past_end": past,
            "wer": None if wer is None else round(wer, 4),
            "max_wer": settings.max_wer if script is not None and judge_words else None,
        },
    )


def with_gate(report: QCReport, gate: GateResult) -> QCReport:
    """The report with one more gate (and its reason when it failed)."""
    reasons = (*report.reasons, f"qc {gate.name}: {gate.detail}") if gate.status == "failed" else ()
    return QCReport(
        report.passed and gate.status != "failed",
        reasons or report.reasons,
        report.measured,
        (*report.gates, gate),
        report.frames,
        report.fps,
        report.elapsed_s,
    )


# --- a row's captions (finish_row's stage) --------------------------------------------------------

# What each mode publishes: files beside the MP4 and "track", the MP4's own subtitle track.
OUTPUTS: dict[str, tuple[str, ...]] = {"off": (), "vtt": ("vtt",), "all": ("vtt", "srt", "track")}
_WRITERS: dict[str, Callable[[Sequence[Cue]], str]] = {"vtt": to_vtt, "srt": to_srt}


@dataclass(frozen=True)
class RowCaptions:
    """A row's captions, made: the cues, the gate's verdict, the files written in the work dir
    (by extension) and what the sidecar records."""

    cues: tuple[Cue, ...]
    gate: GateResult
    files: dict[str, str]
    record: SidecarCaptions

    @property
    def text(self) -> str:
        return " ".join(cue.text for cue in self.cues)


def resolve_mode(config: BatchConfig, transcript_column: bool) -> BatchConfig:
    """config with `auto` captions decided for the run: all when the backend has a recogniser
    configured, or the manifest has a transcript column and the backend can recognise (fal's
    paid whisper is then used for the rows' timing); else off."""
    if config.captions != "auto":
        return config
    # local recognises only with a Whisper folder; fal always can, but is paid: only when asked
    on = recogniser_configured(config) or (transcript_column and config.backend == "fal")
    return config.model_copy(update={"captions": "all" if on else "off"})


def captions_problem(config: BatchConfig) -> str | None:
    """Why the run cannot make the captions it asks for (vtt or all where nothing recognises),
    said before anything is rendered; None when it can."""
    if config.captions in ("off", "auto") or config.backend == "fal":
        return None
    if recogniser_configured(config):
        return None
    return (
        f"--captions {config.captions} needs speech recognition, and the {config.backend} "
        "backend has none configured (local: a checkpoint with a Whisper folder, or "
        "AVATARFLOW_LOCAL_WHISPER_DIR); use --captions off"
    )


def outputs(row: Row, config: BatchConfig) -> tuple[str, ...]:
    """What the row's captions publish under config (nothing: no captions)."""
    mode = config.captions
    if mode == "auto":  # a caller that did not resolve the run's mode: decide per row
        mode = resolve_mode(config, row.transcript is not None).captions
    return OUTPUTS[mode]


def captions_key(row: Row, config: BatchConfig) -> str | None:
    """A hash of what the row's captions are made from (None: it gets none): a published row
    whose captions have another key gets them made again, without rendering again. The backend
    is no part of it: a routed run decides a row's backend after this is asked, and a rerun on
    another backend keeps captions that still fit the script and settings."""
    wanted = outputs(row, config)
    if not wanted:
        return None
    doc = json.dumps([row.transcript, config.caption_settings.model_dump(), wanted], sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def make_captions(plan: RowPlan, config: BatchConfig) -> RowCaptions | None:
    """Recognise the row's narration, time the transcript (or the recognised words) to it, cut
    cues, judge them and write the caption files into the row's work dir; None when the row gets
    no captions."""
    row, wanted, key = plan.row, outputs(plan.row, config), captions_key(plan.row, config)
    if not wanted or key is None:
        return None
    settings, duration = config.caption_settings, plan.audio.duration_s
    recognised = recognise(plan, plan.audio.pcm_path, config)
    timed = align(row.transcript, recognised, duration) if row.transcript else recognised
    cues = tuple(build_cues(timed, settings, duration))
    # A random-weight recogniser's words agree with no script; its backend says so.
    judge = CAPTIONS_GATE not in renderer_class(config.backend).qc_not_applicable(config)
    gate = captions_gate(cues, recognised, row.transcript, duration, settings, judge)
    folder = WorkDir(config.work_path).row(row.id, plan.input_hash)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind in wanted:
        if kind in _WRITERS:
            path = folder / f"{row.id}.{kind}"
            path.write_text(_WRITERS[kind](cues), encoding="utf-8")
            files[kind] = str(path)
    source: Literal["transcript", "speech"] = "transcript" if row.transcript else "speech"
    record = SidecarCaptions(wanted, source, len(cues), len(recognised), settings, key)
    return RowCaptions(cues, gate, files, record)
