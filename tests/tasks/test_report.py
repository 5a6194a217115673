"""Tests for tasks/report.py: a self-contained, escaped HTML page and middle-frame thumbnails."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from avatarflow.tasks.qc import GATES
from avatarflow.tasks.records import GateResult, QCReport, RowResult
from avatarflow.tasks.report import render_report, thumbnail_jpeg
from tests.media_factory import write_mp4

EVIL_ID = '<script>alert("id")</script>'
EVIL_ERROR = "fal said: <img src=x onerror=alert(1)> & gave up"


def qc_columns(failed: str | None = None) -> dict[str, object]:
    """The QC columns of a report where every gate measured 0.5 against 1.0 (failed: one failed)."""
    gates = tuple(
        GateResult(n, "failed" if n == failed else "passed", 0.5, 1.0)
        if n != "lipsync"
        else GateResult(n, "skipped")
        for n in GATES
    )
    return QCReport(failed is None, gates=gates, frames=40, fps=16.0).to_columns()


def report_results() -> list[RowResult]:
    """A published, a rejected, a failed and a budget-held row."""
    return [
        RowResult(
            "intro",
            "published",
            "s3://out/intro.mp4",
            None,
            4.2,
            1,
            0.87,
            None,
            {"course": "c1"},
            "rendered",
            qc=qc_columns(),
        ),  # fmt: skip
        RowResult(
            "recap",
            "rejected",
            "s3://out/_rejected/recap.mp4",
            None,
            6.0,
            2,
            1.5,
            "QC: qc face: a face in 0 of 6 sampled frames",
            {"course": "c2"},
            "reused",
            qc=qc_columns("face"),
        ),  # fmt: skip
        RowResult(EVIL_ID, "failed", error=EVIL_ERROR, extra={"course": "<b>c2</b>"}),
        RowResult(
            "outro",
            "failed",
            error="budget: $1.00 reached",
            extra={"course": "c1"},
            run_action="skipped",
        ),  # fmt: skip
    ]


_results = report_results


class _Tags(HTMLParser):
    """Collect every tag and its attributes, to check structure rather than substrings."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def test_report_escapes_every_user_string() -> None:
    page = render_report(_results(), {"note": "<i>x</i>"}, {}, title="Batch <1>")
    assert page.count("<script>") == 1  # the page's own filter, nothing from a row
    assert "<script>alert" not in page
    assert "<img src=x" not in page
    assert "<b>c2</b>" not in page
    assert "&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; gave up" in page
    assert "<title>Batch &lt;1&gt;</title>" in page
    assert {tag for tag, _ in _tags(page)} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "div", "b", "table",
        "tr", "th", "td", "span", "video", "a", "p", "article", "label", "select", "option",
        "script",
    }  # fmt: skip
    [script] = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert "src" not in script  # inline, loads nothing
    assert "//" not in script


def test_report_has_a_card_per_row_and_players_for_published_and_rejected_videos() -> None:
    thumb = b"\xff\xd8fakejpeg"
    summary = {"estimated_cost_usd": 2.5, "wall_s": 12.0}
    page = render_report(_results(), summary, {"intro": thumb}, title="Batch")
    cards = [attrs for tag, attrs in _tags(page) if tag == "article"]
    assert [(c["data-id"], c["data-status"]) for c in cards] == [
        ("intro", "published"),
        ("recap", "rejected"),
        (EVIL_ID, "failed"),
        ("outro", "failed"),
    ]
    videos = [attrs for tag, attrs in _tags(page) if tag == "video"]
    assert [v["src"] for v in videos] == ["intro.mp4", "_rejected/recap.mp4"]
    assert videos[0]["poster"] == "data:image/jpeg;base64," + base64.b64encode(thumb).decode()
    links = [attrs["href"] for tag, attrs in _tags(page) if tag == "a"]
    assert links == ["s3://out/intro.mp4", "s3://out/_rejected/recap.mp4"]
    for text in ("budget: $1.00 reached", "$2.50", "$0.87", "a face in 0 of 6 sampled frames"):
        assert text in page
    for count, label in [(4, "rows"), (1, "published"), (1, "rejected"), (2, "failed")]:
        assert f"<b>{count}</b>{label}</div>" in page
    assert "<b>1</b>skipped this run" in page
    assert "<b>1</b>reused this run" in page
    assert "$2.37</b>paid (all runs)" in page
    assert "http" not in page.replace("s3://out/", "")  # nothing fetched from outside


def test_thumbnails_given_as_files_are_read_with_their_cards(tmp_path: Path) -> None:
    thumb = b"\xff\xd8fakejpeg"
    (tmp_path / "intro.jpg").write_bytes(thumb)
    files = {"intro": tmp_path / "intro.jpg", "recap": tmp_path / "gone.jpg"}  # recap: none left
    page = render_report(_results(), {}, files, title="Batch")
    assert page == render_report(_results(), {}, {"intro": thumb}, title="Batch")


def test_each_card_shows_its_qc_values_against_thresholds() -> None:
    page = render_report(_results(), {}, {}, title="Batch")
    recap = page[page.index('data-id="recap"') :].split("</article>")[0]
    gates = re.findall(
        r'<tr class="gate"><td>(\w+)</td><td class="num">([^<]*)</td>'
        r'<td class="num">([^<]*)</td><td class="(\w+)">',
        recap,
    )
    assert [g[0] for g in gates] == list(GATES)
    assert ("face", "0.5", "1", "failed") in gates
    assert ("lipsync", "–", "–", "skipped") in gates
    assert ("sync", "0.5", "1", "passed") in gates
    outro = page[page.index('data-id="outro"') :]
    assert '<table class="qc">' not in outro.split("</article>")[0]  # no verdict, no QC table


def test_report_without_failures_says_so() -> None:
    page = render_report(_results()[:1], {}, {}, title="ok")
    assert "every row was published" in page


def test_an_empty_batch_has_a_report_too() -> None:
    page = render_report([], {}, {}, title="empty")
    assert "<b>0</b>rows</div>" in page
    assert '<span id="shown">0</span>' in page


def test_thumbnail_is_a_scaled_jpeg_of_the_middle_frame(tmp_path: Path) -> None:
    video = write_mp4(tmp_path / "v.mp4", seconds=2.0, size=(64, 48))
    data = thumbnail_jpeg(video, width=32)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert image.size == (32, 24)
    # frames brighten linearly from black to white, so the middle frame is mid-grey
    level = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
    assert 90 < level < 170


def test_players_get_a_captions_track_only_where_the_row_has_captions() -> None:
    intro, recap, *_ = report_results()
    captioned = [
        dataclasses.replace(intro, captions_vtt_url="s3://out/intro.vtt"),
        dataclasses.replace(recap, captions_vtt_url="s3://out/_rejected/recap.vtt"),
    ]
    page = render_report(captioned, {}, {}, title="t")
    assert '<track kind="captions" label="Captions" src="intro.vtt" default>' in page
    assert 'src="_rejected/recap.vtt" default>' in page
    assert "<track" not in render_report(report_results(), {}, {}, title="t")
