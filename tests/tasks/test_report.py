"""Tests for tasks.report: a self-contained, escaped HTML page and middle-frame thumbnails."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.records import RowResult
from tasks.report import render_report, thumbnail_jpeg
from tests.media_factory import write_mp4

EVIL_ID = '<script>alert("id")</script>'
EVIL_ERROR = "fal said: <img src=x onerror=alert(1)> & gave up"


def _results() -> list[RowResult]:
    return [
        RowResult(
            "intro", "published", "s3://out/intro.mp4", None, 4.2, 1, 0.87, None, {"course": "c1"}
        ),
        RowResult(EVIL_ID, "failed", error=EVIL_ERROR, extra={"course": "<b>c2</b>"}),
        RowResult("outro", "skipped", error="budget: $1.00 reached", extra={"course": "c1"}),
    ]


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
    assert "<script>" not in page
    assert "<img src=x" not in page
    assert "<b>c2</b>" not in page
    assert "&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; gave up" in page
    assert "<title>Batch &lt;1&gt;</title>" in page
    assert {tag for tag, _ in _tags(page)} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "div", "b", "table",
        "tr", "th", "td", "span", "video", "a", "p",
    }  # fmt: skip


def test_report_has_a_player_per_published_row_and_every_row() -> None:
    thumb = b"\xff\xd8fakejpeg"
    summary = {"estimated_cost_usd": 2.5, "wall_s": 12.0}
    page = render_report(_results(), summary, {"intro": thumb}, title="Batch")
    videos = [attrs for tag, attrs in _tags(page) if tag == "video"]
    assert [v["src"] for v in videos] == ["intro.mp4"]
    assert videos[0]["poster"] == "data:image/jpeg;base64," + base64.b64encode(thumb).decode()
    for text in ("intro", "outro", "s3://out/intro.mp4", "budget: $1.00 reached", "$2.50", "$0.87"):
        assert text in page
    assert re.search(r"<b>1</b>published", page)
    assert re.search(r"<b>1</b>failed", page)
    assert re.search(r"<b>1</b>skipped", page)
    assert "http" not in page.replace("s3://out/intro.mp4", "")  # nothing fetched from outside


def test_report_without_failures_says_so() -> None:
    page = render_report(_results()[:1], {}, {}, title="ok")
    assert "every row was published" in page


def test_thumbnail_is_a_scaled_jpeg_of_the_middle_frame(tmp_path: Path) -> None:
    video = write_mp4(tmp_path / "v.mp4", seconds=2.0, size=(64, 48))
    data = thumbnail_jpeg(video, width=32)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert image.size == (32, 24)
    # frames brighten linearly from black to white, so the middle frame is mid-grey
    level = float(np.asarray(image.convert("L"), dtype=np.float64).mean())
    assert 90 < level < 170
