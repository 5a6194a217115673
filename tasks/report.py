"""Report stage: one self-contained report.html for a batch (summary, cost, rows, failures).

The last stage of the flow, after publishing: every user-supplied string is escaped, thumbnails are
inlined as data URIs, each published video plays from its relative `<id>.mp4` beside the page and
each rejected one from `_rejected/<id>.mp4`, with its captions (`<id>.vtt` beside it) as a default
track. One card per row shows its QC values against their thresholds; a status filter (inline
script, nothing fetched) narrows the cards.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import io
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote
from uuid import UUID

import av
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.utilities.slugify import slugify

from avatarflow.tasks import progress
from avatarflow.tasks.backends import renderer_class
from avatarflow.tasks.config import CAPTIONS_GATE, BatchConfig
from avatarflow.tasks.publish import REJECTED_DIR, publish_file
from avatarflow.tasks.qc import GATES
from avatarflow.tasks.records import (
    BatchOutcome,
    ProgressEvent,
    RowFinished,
    RowPlan,
    RowPlanTotals,
    RowResult,
    RowsPlanned,
    to_json,
)
from avatarflow.tasks.route import split_outcome
from avatarflow.tasks.storage import temp_path, write_local
from avatarflow.tasks.workdir import WorkDir

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d232a;background:#fafbfc}
h1{font-size:1.5rem;margin:0 0 1rem}h2{font-size:1.15rem;margin:2rem 0 .6rem}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 2px #0002}
th,td{padding:.35rem .7rem;border-bottom:1px solid #e4e7eb;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.published,.passed{color:#137333}.failed{color:#b3261e}.rejected{color:#b35c00}
.skipped{color:#6b7280}
video,img.thumb{max-width:240px;border-radius:4px;background:#000}
.error{white-space:pre-wrap;font-family:ui-monospace,monospace;color:#b3261e}
.warning{background:#fff4ce;border-left:4px solid #b38600;padding:.6rem 1rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{background:#fff;padding:.7rem 1rem;
border-radius:6px;box-shadow:0 1px 2px #0002}.card b{display:block;font-size:1.3rem}
.rows{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:1rem}
.row{background:#fff;border-radius:6px;box-shadow:0 1px 2px #0002;padding:.8rem 1rem;
border-top:4px solid #9aa0a6}.row.published{border-top-color:#137333}
.row.rejected{border-top-color:#e37400}.row.failed{border-top-color:#b3261e}
.row h3{margin:.2rem 0 .4rem;font-size:1rem;color:#1d232a;word-break:break-all}
.row table{box-shadow:none;width:100%;font-size:12px}.row td,.row th{padding:.15rem .4rem}
.filter{margin:0 0 1rem}.filter select{font:inherit;padding:.2rem .4rem}
"""
# The status filter: show only the cards of the chosen status (and say how many); the page's
# #fragment picks it on load (report.html#rejected), so a filtered view can be shared as a link.
_SCRIPT = """
(function(){var s=document.getElementById('status-filter'),n=document.getElementById('shown');
function apply(){var c=0;document.querySelectorAll('.row').forEach(function(r){
var on=!s.value||r.dataset.status===s.value;r.hidden=!on;if(on)c++;});n.textContent=c;}
var h=decodeURIComponent(location.hash.slice(1));
if([].some.call(s.options,function(o){return o.value===h;}))s.value=h;
s.addEventListener('change',function(){history.replaceState(null,'','#'+s.value);apply();});
apply();})();
"""
STATUSES = ("published", "rejected", "failed")


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _usd(value: float | None) -> str:
    return "–" if value is None else f"${value:,.2f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f} s"


def render_report(
    results: Sequence[RowResult],
    summary: Mapping[str, Any],
    thumbnails: Mapping[str, bytes | Path],
    title: str,
    warning: str | None = None,
) -> str:
    """Return the batch report as one self-contained HTML page (warning: a banner on top)."""
    return "\n".join(report_parts(results, summary, thumbnails, title, warning))


def report_parts(
    results: Sequence[RowResult],
    summary: Mapping[str, Any],
    thumbnails: Mapping[str, bytes | Path],
    title: str,
    warning: str | None = None,
) -> Iterator[str]:
    """The report page, line by line: a card at a time, so a 10,000-row page (64 MB with its
    inlined thumbnails) is never held whole. thumbnails: each row's JPEG, or the file holding it
    (read when its card is made; a missing file means no thumbnail)."""
    yield from (
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="warning">{_e(warning)}</p>' if warning else "",
        _summary_section(results, summary),
    )
    yield from _rows_section(results, thumbnails)
    yield from (_failures_section(results), f"<script>{_SCRIPT}</script>", "</body></html>")


def _summary_section(results: Sequence[RowResult], summary: Mapping[str, Any]) -> str:
    """Cards for counts per status and run action and costs, then every summary figure."""
    counts: Counter[str] = Counter(r.status for r in results)
    actions: Counter[str] = Counter(r.run_action for r in results)
    paid = sum(r.cost_usd for r in results)
    video_s = sum(r.duration_s or 0.0 for r in results if r.status == "published")
    cards = [
        ("rows", len(results)),
        *((status, counts[status]) for status in STATUSES),
        *((f"{action} this run", actions[action]) for action in ("rendered", "reused", "skipped")),
        ("estimated cost", _usd(summary.get("estimated_cost_usd"))),
        ("paid (all runs)", _usd(paid)),
        ("published video", _seconds(video_s)),
    ]
    card_html = "".join(
        f'<div class="card" data-card="{_e(label)}"><b>{_e(value)}</b>{_e(label)}</div>'
        for label, value in cards
    )
    details = "".join(
        f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>" for key, value in summary.items()
    )
    return (
        f'<h2>Summary</h2><div class="cards">{card_html}</div>'
        f"<h2>Details</h2><table>{details}</table>"
    )


def _rows_section(
    results: Sequence[RowResult], thumbnails: Mapping[str, bytes | Path]
) -> Iterator[str]:
    """One card per manifest row (preview, status, numbers, QC gates, passthrough columns), with
    a filter by status."""
    options = "".join(f'<option value="{s}">{s}</option>' for s in STATUSES)
    filter_html = (
        '<p class="filter"><label>status <select id="status-filter"><option value="">all</option>'
        f'{options}</select></label> <span id="shown">{len(results)}</span> shown</p>'
    )
    yield from ("<h2>Rows</h2>", filter_html, '<div class="rows">')
    for n, r in enumerate(results):
        yield _row_card(n, r, _thumbnail_bytes(thumbnails.get(r.id)))
    yield "</div>"


def _thumbnail_bytes(thumbnail: bytes | Path | None) -> bytes | None:
    if isinstance(thumbnail, Path):
        try:
            return thumbnail.read_bytes()
        except OSError:  # rows that did not finish this run have none
            return None
    return thumbnail


def _row_card(n: int, r: RowResult, thumbnail: bytes | None) -> str:
    """A row's card: preview, status and what this run did, numbers, link, QC table, error."""
    link = f'<a href="{_e(r.video_url)}">{_e(r.video_url)}</a>' if r.video_url else "–"
    facts = [
        ("status", f'<span class="{_e(r.status)}">{_e(r.status)}</span>'),
        ("this run", _e(r.run_action)),
        ("duration", _seconds(r.duration_s)),
        ("segments", _e(r.segments if r.segments is not None else "–")),
        ("paid", _usd(r.cost_usd)),
        ("first published", _e(r.first_published_at or "–")),
        ("video", link),
        *((_e(name), _e(value)) for name, value in r.extra.items()),
    ]
    rows = "".join(f"<tr><th>{label}</th><td>{value}</td></tr>" for label, value in facts)
    error = f'<p class="error">{_e(r.error)}</p>' if r.error else ""
    return (
        f'<article class="row {_e(r.status)}" id="row-{n}" data-status="{_e(r.status)}" '
        f'data-id="{_e(r.id)}"><h3>{_e(r.id)}</h3>{_preview(r, thumbnail)}'
        f"<table>{rows}</table>{_qc_table(r)}{error}</article>"
    )


def _qc_table(r: RowResult) -> str:
    """The row's QC gates: value against threshold and the outcome (nothing when none ran)."""
    if not r.qc:
        return ""
    lines = []
    for gate in (*GATES, CAPTIONS_GATE):
        if gate == CAPTIONS_GATE and f"qc_{gate}_status" not in r.qc:
            continue  # a row without captions
        status = r.qc.get(f"qc_{gate}_status") or "–"
        value, threshold = (r.qc.get(f"qc_{gate}_{k}") for k in ("value", "threshold"))
        lines.append(
            f'<tr class="gate"><td>{gate}</td><td class="num">{_number(value)}</td>'
            f'<td class="num">{_number(threshold)}</td>'
            f'<td class="{_e(status)}">{_e(status)}</td></tr>'
        )
    head = "<tr><th>QC gate</th><th>value</th><th>threshold</th><th></th></tr>"
    return f'<table class="qc">{head}{"".join(lines)}</table>'


def _number(value: Any) -> str:
    return "–" if value is None else _e(f"{value:g}")


def _preview(result: RowResult, thumbnail: bytes | None) -> str:
    """A player for published and rejected rows (poster = thumbnail), else the thumbnail alone."""
    poster = "data:image/jpeg;base64," + base64.b64encode(thumbnail).decode() if thumbnail else None
    if result.status in ("published", "rejected"):
        poster_attr = f' poster="{poster}"' if poster else ""
        folder = f"{REJECTED_DIR}/" if result.status == "rejected" else ""
        src = _e(folder + quote(f"{result.id}.mp4"))
        track = ""
        if result.captions_vtt_url:  # the captions beside the video, shown by default
            vtt = _e(folder + quote(f"{result.id}.vtt"))
            track = f'<track kind="captions" label="Captions" src="{vtt}" default>'
        return f'<video controls preload="none" src="{src}"{poster_attr}>{track}</video>'
    if poster:
        return f'<img class="thumb" alt="{_e(result.id)}" src="{poster}">'
    return ""


def _failures_section(results: Sequence[RowResult]) -> str:
    """Every failed or rejected row with its full error text."""
    bad = [r for r in results if r.status != "published"]
    if not bad:
        return "<h2>Failures</h2><p>None: every row was published.</p>"
    items = "".join(
        f'<tr><td>{_e(r.id)}</td><td class="{_e(r.status)}">{_e(r.status)}</td>'
        f'<td class="error">{_e(r.error or "")}</td></tr>'
        for r in bad
    )
    return (
        f"<h2>Failures</h2><table><tr><th>id</th><th>status</th><th>error</th></tr>{items}</table>"
    )


def thumbnail_jpeg(mp4_path: str | Path, width: int = 160) -> bytes:
    """Return a JPEG of the video's middle frame, scaled to `width` pixels wide."""
    with av.open(str(mp4_path)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # a few frames: threads cost more than they save
        time_base = stream.time_base or Fraction(1, 1_000_000)
        middle_s = float(stream.duration * time_base) / 2 if stream.duration else 0.0
        if middle_s > 0:
            container.seek(int(middle_s / time_base), stream=stream)
        chosen = None
        for frame in container.decode(stream):
            chosen = frame
            # the seek lands on the keyframe before the middle: decode forward to it
            if frame.time is None or frame.time >= middle_s:
                break
        if chosen is None:
            raise ValueError(f"{mp4_path}: no video frames")
        # Scaled and converted in one pass by FFmpeg's area scaler (a full-size RGB image first
        # cost more than decoding the frame).
        height = max(1, round(chosen.height * width / chosen.width))
        small = chosen.reformat(width=width, height=height, format="rgb24", interpolation="AREA")
        image = small.to_image()  # type: ignore[no-untyped-call]
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def _thumbnail_path(config: BatchConfig, plan: RowPlan) -> Path:
    return WorkDir(config.work_path).thumbnail(plan.row.id, plan.input_hash)


def save_thumbnail(plan: RowPlan, video_path: str, config: BatchConfig) -> None:
    """Keep the row's report thumbnail beside its video (per row, in parallel, not at the end)."""
    with contextlib.suppress(Exception):  # a missing thumbnail never fails a row
        write_local(_thumbnail_path(config, plan), thumbnail_jpeg(video_path))


def write_report(
    results: Sequence[RowResult], plans: Sequence[RowPlan], config: BatchConfig
) -> str:
    """Render report.html for the batch (thumbnails from this run's videos) and publish it."""
    backend = renderer_class(config.backend)
    summary = {"model": backend.model_name(config), **to_json(RowPlanTotals.of(plans))}
    if (split := split_outcome(results)) is not None:  # --backend auto
        summary["routing"] = "; ".join(split.lines())
    thumbnails = {plan.row.id: _thumbnail_path(config, plan) for plan in plans}
    title = f"avatarflow — {config.manifest}"
    parts = report_parts(results, summary, thumbnails, title, backend.warning(config))
    # Written to a file of this run's own (runs may share the work dir), then published.
    page = temp_path(WorkDir(config.work_path).root / config.report_name)
    page.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(page, "w", encoding="utf-8") as out:
            out.writelines(f"{part}\n" for part in parts)
        return publish_file(page, config.target, config.report_name)
    finally:
        page.unlink(missing_ok=True)


def artifact_key(config: BatchConfig, kind: str) -> str:
    """A stable Prefect artifact key per target, so the UI shows each target's history:
    `avatarflow-KIND-NAME-HASH`, NAME the target's last path part in Prefect's key alphabet
    (lowercase letters, digits, dashes) so `prefect artifact ls` tells targets apart, HASH the
    whole target's so two targets with one last part (…/a/today, …/b/today) stay apart."""
    target = config.target.rstrip("/")
    name = slugify(target.rsplit("/", 1)[-1], max_length=40, word_boundary=True) or "target"
    digest = hashlib.sha256(target.encode()).hexdigest()[:8]
    return f"avatarflow-{kind}-{name}-{digest}"


def publish_artifacts(outcome: BatchOutcome, config: BatchConfig, wall_s: float) -> None:
    """The run's results table, summary and links as Prefect artifacts (shown in the UI)."""
    rows = [
        {
            "id": r.id,
            "status": r.status,
            "run_action": r.run_action,
            "duration_s": round(r.duration_s, 3) if r.duration_s is not None else None,
            "cost_usd": round(r.cost_usd, 4),
            "video": r.video_url,
            "error": r.error,
        }
        for r in outcome.results
    ]
    create_table_artifact(rows, key=artifact_key(config, "rows"), description="Rows of this run")
    create_markdown_artifact(
        _summary_markdown(outcome, config, wall_s),
        key=artifact_key(config, "summary"),
        description="Batch summary",
    )
    for name, url in (("results", outcome.results_url), ("report", outcome.report_url)):
        if url:
            create_link_artifact(url, link_text=url, key=artifact_key(config, name))


def _summary_markdown(outcome: BatchOutcome, config: BatchConfig, wall_s: float) -> str:
    counts = Counter(r.status for r in outcome.results)
    skipped = sum(r.run_action == "skipped" for r in outcome.results)
    published_s = sum(r.duration_s or 0.0 for r in outcome.results if r.status == "published")
    paid = sum(r.cost_usd for r in outcome.results)
    warning = renderer_class(config.backend).warning(config)
    lines = [
        f"# avatarflow: {config.manifest} → {config.target}",
        *([f"> **{warning}**", ""] if warning else []),
        "| rows | published | rejected | failed | skipped this run | video min | estimated USD "
        "| paid USD (all runs) | wall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {len(outcome.results)} | {counts['published']} | {counts['rejected']} "
        f"| {counts['failed']} | {skipped} | {published_s / 60:.2f} "
        f"| {outcome.estimated_usd:.2f} | {paid:.2f} | {wall_s:.0f} s |",
    ]
    if (split := split_outcome(outcome.results)) is not None:  # --backend auto
        lines += ["", "## Routing", "", *(f"- {line}" for line in split.lines())]
    return "\n".join(lines)


class ProgressArtifact:
    """A Prefect progress artifact that follows the rows as they finish."""

    def __init__(self, config: BatchConfig) -> None:
        self.done, self.total, self.shown = 0, 0, 0
        # Rows finish on the task runner's threads: count and decide under one lock, so no
        # finish is lost and no percentage is shown twice or out of order.
        self._lock = threading.Lock()
        self.id = cast(  # a UUID, in this sync code
            UUID,
            create_progress_artifact(
                0.0, key=artifact_key(config, "progress"), description="Rows finished"
            ),
        )

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            match event:
                case RowsPlanned():
                    self.total += event.rows
                case RowFinished():
                    self.done += 1
                case _:
                    return
            percent = 100 * self.done // max(self.total, 1)
            if percent <= self.shown:  # at most 100 updates, however many rows
                return
            self.shown = percent
            update_progress_artifact(self.id, progress=float(percent))

    @classmethod
    @contextlib.contextmanager
    def tracking(cls, config: BatchConfig) -> Iterator[ProgressArtifact]:
        """Keep a progress artifact updated from the progress events inside the block."""
        artifact = cls(config)
        try:
            with progress.listening(artifact):
                yield artifact
        finally:
            update_progress_artifact(artifact.id, progress=100.0)
