"""Notification: POST a batch summary to a URL when a run ends (JSON, or a Slack message).

Best effort: three tries with backoff, then a warning in the log. A notification never fails the
run, and its URL (a webhook's path is its secret) is logged by host only.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import httpx

from avatarflow.tasks.config import BatchConfig
from avatarflow.tasks.records import BatchOutcome
from avatarflow.tasks.redact import public_url

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT_S = 10.0
FAILED_ROWS_LISTED = 20  # a summary, not the results table


def summary(outcome: BatchOutcome, config: BatchConfig) -> dict[str, Any]:
    """The batch in numbers: rows per status and run action, cost, where the tables are."""
    statuses = Counter(r.status for r in outcome.results)
    actions = Counter(r.run_action for r in outcome.results)
    not_published = outcome.failed
    return {
        "manifest": public_url(config.manifest),
        "target": public_url(config.target),
        "rows": len(outcome.results),
        "published": statuses["published"],
        "failed": statuses["failed"],
        "rejected": statuses["rejected"],
        "run_actions": {a: actions[a] for a in ("rendered", "reused", "skipped", "failed")},
        "cost_usd": round(sum(r.cost_usd for r in outcome.results), 6),
        "estimated_usd": round(outcome.estimated_usd, 6),
        "results_url": public_url(outcome.results_url),
        "report_url": public_url(outcome.report_url),
        "exit_code": outcome.exit_code,
        "not_published": [
            {"id": r.id, "status": r.status, "error": r.error}
            for r in not_published[:FAILED_ROWS_LISTED]
        ],
    }


def slack_text(doc: dict[str, Any]) -> str:
    """The summary as one Slack message (mrkdwn)."""
    ok = doc["exit_code"] == 0
    lines = [
        f"{'✅' if ok else '⚠️'} *avatarflow* {doc['manifest']} → {doc['target']}",
        f"{doc['rows']} rows: {doc['published']} published, {doc['rejected']} rejected, "
        f"{doc['failed']} failed · paid ${doc['cost_usd']:.2f} "
        f"(estimated ${doc['estimated_usd']:.2f})",
        f"results: {doc['results_url']} · report: {doc['report_url']}",
    ]
    lines += [f"• {r['id']} {r['status']}: {r['error'] or ''}" for r in doc["not_published"]]
    return "\n".join(lines)


def notify_batch(outcome: BatchOutcome, config: BatchConfig, backoff_s: float = 1.0) -> bool:
    """POST the run's summary to config.notify_url (if any); True when it was accepted."""
    url = config.notify_url
    if not url:
        return False
    doc = summary(outcome, config)
    body = {"text": slack_text(doc)} if config.notify_format == "slack" else doc
    where = urlsplit(url).netloc.rpartition("@")[2] or "?"
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with httpx.Client(timeout=TIMEOUT_S, follow_redirects=False) as client:
                client.post(url, json=body).raise_for_status()
            return True
        except Exception as exc:  # never fails the run: a bad URL, refused, timeout, 4xx/5xx
            reason = (
                f"HTTP {exc.response.status_code}"
                if isinstance(exc, httpx.HTTPStatusError)
                else type(exc).__name__
            )
            log.warning(
                "notification to %s failed (try %d of %d): %s", where, attempt, ATTEMPTS, reason
            )
        if attempt < ATTEMPTS:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    return False
