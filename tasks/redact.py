"""Keep secrets out of what we print and record: URL credentials, signatures and known keys.

The one home of masking: error messages, logs, sidecars, results and the report all pass through
public_url / redact, so every place hides the same things the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"
# Environment variables whose values must never appear anywhere we write.
SECRET_ENV = ("FAL_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET_OPTION = re.compile(r"(key|secret|token|password|credential|sas|signature)", re.IGNORECASE)
# "s3://", "https://", "javascript:", "simplecache::s3://": a scheme of two or more letters (one
# letter is a Windows drive).
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")
_USERINFO_IN_TEXT = re.compile(r"(\w+://)[^/@\s]+@")
_MIN_SECRET_CHARS = 4  # shorter values would blank out ordinary words


def public_url(location: Any) -> Any:
    """A location safe to print or record: user info and every query value masked.

    Plain paths (and anything that is not a string) come back unchanged.
    """
    if not isinstance(location, str) or not _SCHEME.match(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc  # user info may be a password or a bare token: mask all of it
    if "@" in netloc:
        netloc = f"{MASK}@" + netloc.rpartition("@")[2]
    query = "&".join(f"{k}={MASK}" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def url_secrets(url: str) -> list[str]:
    """The credential-like parts of a URL: its user, password and query values."""
    parts = urlsplit(url)
    found = [v for _, v in parse_qsl(parts.query)]
    return found + [parts.username or "", parts.password or ""]


def option_secrets(options: Mapping[str, Any]) -> list[str]:
    """String values under credential-like keys of storage options, nested dicts included."""
    found: list[str] = []
    for key, value in options.items():
        if isinstance(value, Mapping):
            found += option_secrets(value)
        elif isinstance(value, str) and SECRET_OPTION.search(str(key)):
            found.append(value)
    return found


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Replace every known secret (the environment's and `secrets`) and URL user info in text."""
    known = [os.environ.get(name, "") for name in SECRET_ENV] + list(secrets)
    for secret in sorted((s for s in known if len(s) >= _MIN_SECRET_CHARS), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return _USERINFO_IN_TEXT.sub(rf"\1{MASK}@", text)
