"""A small typed client for fal's queue and storage HTTP APIs, used by the fal renderer.

Submit is never replayed once its body may have reached fal (no double spend); status, result,
cancel, uploads and downloads retry 429/5xx/network errors with exponential backoff and full jitter.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx

from avatarflow.tasks.config import FalSettings
from avatarflow.tasks.redact import redact

log = logging.getLogger(__name__)

INLINE_MAX_BYTES = 16 * 1024  # files up to this size travel as data: URIs, saving two round trips
# Poll every max(poll_initial_s, 5 % of the time waited so far), capped at poll_max_s: a 2 s job is
# noticed within ~0.1 s of finishing, a 10 min one within 5 s, with few polls either way.
POLL_FRACTION = 0.05
# fal's status stream sends a comment every 15 s: this much silence means the stream is lost.
STREAM_SILENCE_S = 45.0
_TOKEN_MARGIN_S = 60.0  # refresh a storage token this long before it expires
# fal's answer when the request's own X-Fal-Request-Timeout (time-to-start) ran out: final, since
# another try would only hit the same deadline (fal_client does not retry it either).
TIMEOUT_TYPE_HEADER = "x-fal-request-timeout-type"
# Errors raised before any byte of the request left this machine: nothing can have been queued.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


class FalError(Exception):
    """Base class of every error the fal client raises."""


class FalAuthError(FalError):
    """fal rejected the credentials (401/403), or no key is configured."""


class FalTimeoutError(FalError):
    """A request did not finish within the caller's deadline (it may still be running at fal)."""


class AmbiguousSubmitError(FalError):
    """A submit whose body was sent but whose answer never came: it may be queued (and billed)."""

    def __init__(self, endpoint: str, cause: str) -> None:
        super().__init__(
            f"submit to {endpoint} may or may not have been queued ({cause}); not resubmitting "
            "automatically to avoid paying twice"
        )
        self.endpoint = endpoint


class FalValidationError(FalError):
    """fal refused the input (422); fields names each offending input field."""

    def __init__(self, message: str, fields: tuple[str, ...]) -> None:
        super().__init__(message)
        self.fields = fields

    @classmethod
    def from_detail(cls, detail: Any) -> FalValidationError:
        """Build from a 422 body's detail: a list of {loc, msg, type} or a plain string."""
        if not isinstance(detail, list):
            return cls(f"fal rejected the input: {detail}", ())
        fields, parts = [], []
        for item in detail:
            loc = item.get("loc", []) if isinstance(item, dict) else []
            name = ".".join(str(p) for p in loc if p != "body") or "input"
            fields.append(name)
            parts.append(f"{name}: {item.get('msg', item) if isinstance(item, dict) else item}")
        return cls("fal rejected the input: " + "; ".join(parts), tuple(fields))


class FalRequestError(FalError):
    """A failed fal request: fal's error_type (e.g. runner_disconnected) and the HTTP status."""

    def __init__(
        self, message: str, error_type: str, status: int | None, retryable: bool = False
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.retryable = retryable  # a new submit may succeed (fal does not bill 5xx failures)


@dataclass(frozen=True)
class SubmitResult:
    """A queued request and the URLs to follow it."""

    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


@dataclass(frozen=True)
class FalStatus:
    """One status reading: IN_QUEUE, IN_PROGRESS or COMPLETED (which also covers failures)."""

    status: str
    queue_position: int | None = None
    error: str | None = None
    error_type: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class FalResult(NamedTuple):
    """A completed request's output JSON and the result response's headers."""

    data: dict[str, Any]
    headers: httpx.Headers

    @property
    def billable_units(self) -> float | None:
        """The x-fal-billable-units header as a number, or None when fal did not send it."""
        try:
            return float(self.headers["x-fal-billable-units"])
        except (KeyError, ValueError):
            return None


def _is_transient(status: int) -> bool:
    return status == 429 or status >= 500


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


class FalQueueClient:
    """Thread-safe client for one fal account: upload, submit, poll, fetch, cancel and download."""

    def __init__(
        self,
        settings: FalSettings,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        *,
        on_stop: Callable[[Callable[[], None]], AbstractContextManager[None]] | None = None,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        rng: random.Random | None = None,
        key: str | None = None,
    ) -> None:
        # key: given where it is not in this process's environment (a run's Secret block)
        key = key or settings.api_key()
        if key is None:
            raise FalAuthError("FAL_KEY is not set: export it to use the fal backend")
        self._key = key
        self.settings = settings
        self._sleep = sleep  # every wait between polls and retries (a run's stop wakes it)
        # on_stop(callback): a block during which the run's stop calls callback (from another
        # thread); it ends a status stream that a stop must not wait out.
        self._on_stop = on_stop or (lambda callback: contextlib.nullcontext())
        self._inline_max_bytes = inline_max_bytes
        self._rng = rng or random.Random()
        timeout = httpx.Timeout(settings.http_timeout_s, connect=min(settings.http_timeout_s, 10.0))
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        self._http = httpx.Client(
            transport=transport,
            timeout=timeout,
            limits=limits,
            headers={"User-Agent": "avatarflow"},
        )
        self._token_lock = threading.Lock()
        self._token: tuple[str, str, float] | None = None  # (authorization, base_url, deadline)
        self._cdn_v3 = True  # False once the token flow answered 404/405: use the initiate flow

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FalQueueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------------

    def _key_headers(self) -> dict[str, str]:
        # Sent only to the queue and REST hosts, never to the CDN or to URLs found in results.
        return {"Authorization": f"Key {self._key}"}

    def _scrub(self, text: str) -> str:
        return redact(text, [self._key])

    def _backoff(self, attempt: int, why: str, method: str, url: str) -> None:
        cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
        delay = self._rng.uniform(0, cap)  # full jitter spreads a burst of 429s over time
        log.warning(
            "fal %s %s: %s; retry %d/%d in %.2fs",
            method,
            url.split("?")[0],
            why,
            attempt,
            self.settings.max_attempts - 1,
            delay,
        )
        self._sleep(delay)

    def _send(
        self,
        method: str,
        url: str,
        *,
        submit: bool = False,
        retry_status: bool = True,
        **kwargs: Any,
    ) -> httpx.Response:
        """Send one request, retrying what is safe to retry; return the final response."""
        attempts = self.settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                resp = self._http.request(method, url, **kwargs)
            except httpx.TransportError as exc:
                if submit and not isinstance(exc, _NOT_SENT):
                    raise AmbiguousSubmitError(url, type(exc).__name__) from exc
                if attempt == attempts:
                    raise FalRequestError(
                        f"fal {method} {url} failed: {type(exc).__name__}: {exc}",
                        "network_error",
                        None,
                        retryable=True,
                    ) from exc
                self._backoff(attempt, type(exc).__name__, method, url)
                continue
            transient = _is_transient(resp.status_code) and TIMEOUT_TYPE_HEADER not in resp.headers
            if retry_status and transient and attempt < attempts:
                self._backoff(attempt, f"HTTP {resp.status_code}", method, url)
                continue
            return resp
        raise AssertionError("unreachable: the loop returns or raises")

    def _error(self, resp: httpx.Response) -> FalError:
        """Turn a failed response into the matching FalError, without leaking the key."""
        status = resp.status_code
        if status in (401, 403):
            return FalAuthError(f"fal rejected the credentials (HTTP {status}): check FAL_KEY")
        if TIMEOUT_TYPE_HEADER in resp.headers:
            return self._start_timeout_error(resp)
        body = _body(resp)
        detail = body.get("detail") if isinstance(body, dict) else None
        if status == 422:
            parsed = FalValidationError.from_detail(detail)
            return FalValidationError(self._scrub(str(parsed)), parsed.fields)
        error_type = (
            body.get("error_type") if isinstance(body, dict) else None
        ) or resp.headers.get("x-fal-error-type", f"http_{status}")
        text = detail if isinstance(detail, str) else (resp.text[:300] or resp.reason_phrase)
        hint = resp.headers.get("x-fal-retryable")
        retryable = hint.lower() == "true" if hint else _is_transient(status)
        message = self._scrub(f"fal request failed (HTTP {status}, {error_type}): {text}")
        return FalRequestError(message, error_type, status, retryable)

    def _start_timeout_error(self, resp: httpx.Response) -> FalRequestError:
        """The request did not start within its X-Fal-Request-Timeout: name the setting to raise."""
        kind = resp.headers[TIMEOUT_TYPE_HEADER]
        limit = self.settings.request_timeout_s
        sent = f"{limit:g} s" if limit is not None else "the timeout"
        message = (
            f"fal gave up on the request (HTTP {resp.status_code}, {kind} timeout): it did not "
            f"start within X-Fal-Request-Timeout={sent} (FalSettings.request_timeout_s); not "
            "retried: raise request_timeout_s or rerun when fal's queue is shorter"
        )
        return FalRequestError(message, "request_timeout", resp.status_code, retryable=False)

    def _json(self, resp: httpx.Response) -> dict[str, Any]:
        if not resp.is_success:
            raise self._error(resp)
        body = _body(resp)
        if not isinstance(body, dict):
            raise FalRequestError(f"fal answered {resp.url} with non-JSON", "bad_response", None)
        return body

    # --- storage ----------------------------------------------------------------------------------

    def upload(
        self, data: bytes | str | os.PathLike[str], content_type: str, file_name: str | None = None
    ) -> str:
        """Put a file on fal storage and return its public URL (tiny files become data: URIs)."""
        raw = data if isinstance(data, bytes) else Path(data).read_bytes()
        name = file_name or ("upload.bin" if isinstance(data, bytes) else Path(data).name)
        if len(raw) <= self._inline_max_bytes:
            return f"data:{content_type};base64,{base64.b64encode(raw).decode()}"
        if self._cdn_v3:
            try:
                return self._upload_cdn_v3(raw, content_type, name)
            except FalRequestError as exc:
                if exc.status not in (404, 405):
                    raise
                log.info(
                    "fal-cdn-v3 storage unavailable (HTTP %s): using upload/initiate", exc.status
                )
                self._cdn_v3 = False
        return self._upload_initiate(raw, content_type, name)

    def _storage_token(self) -> tuple[str, str]:
        with self._token_lock:
            if self._token is None or time.monotonic() >= self._token[2]:
                url = f"{self.settings.rest_url}/storage/auth/token?storage_type=fal-cdn-v3"
                body = self._json(self._send("POST", url, json={}, headers=self._key_headers()))
                auth = f"{body.get('token_type', 'Bearer')} {body['token']}"
                base = str(body.get("base_url") or self.settings.cdn_url).rstrip("/")
                self._token = (auth, base, _token_deadline(body.get("expires_at")))
            return self._token[0], self._token[1]

    def _upload_cdn_v3(self, raw: bytes, content_type: str, name: str) -> str:
        auth, base = self._storage_token()
        headers = {"Authorization": auth, "Content-Type": content_type, "X-Fal-File-Name": name}
        body = self._json(self._send("POST", f"{base}/files/upload", content=raw, headers=headers))
        return str(body["access_url"])

    def _upload_initiate(self, raw: bytes, content_type: str, name: str) -> str:
        url = f"{self.settings.rest_url}/storage/upload/initiate?storage_type=gcs"
        meta = {"file_name": name, "content_type": content_type}
        body = self._json(self._send("POST", url, json=meta, headers=self._key_headers()))
        put = self._send(
            "PUT", body["upload_url"], content=raw, headers={"Content-Type": content_type}
        )
        if not put.is_success:
            raise self._error(put)
        return str(body["file_url"])

    # --- queue ------------------------------------------------------------------------------------

    def handle(self, request_id: str, app: str | None = None) -> SubmitResult:
        """Rebuild the URLs of a known request id from the app id (for resuming a request);
        app: another app than settings.app (owner/name, e.g. fal-ai/whisper)."""
        base = f"{self.settings.queue_url}/{app or self.settings.app}/requests/{request_id}"
        return SubmitResult(request_id, f"{base}/status", base, f"{base}/cancel")

    def submit(self, endpoint: str, payload: Mapping[str, Any]) -> SubmitResult:
        """Queue one request; retried only where fal cannot have queued it."""
        headers = self._key_headers()
        if self.settings.request_timeout_s is not None:
            headers["X-Fal-Request-Timeout"] = f"{self.settings.request_timeout_s:g}"
        url = f"{self.settings.queue_url}/{endpoint}"
        resp = self._send("POST", url, submit=True, json=dict(payload), headers=headers)
        if not resp.is_success:
            raise self._error(resp)
        body = _body(resp)
        if not isinstance(body, dict) or not body.get("request_id"):
            raise AmbiguousSubmitError(url, f"unreadable answer (HTTP {resp.status_code})")
        # an endpoint of another app (fal-ai/whisper) is its own app id
        app = self.settings.app if endpoint.startswith(f"{self.settings.app}/") else endpoint
        built = self.handle(str(body["request_id"]), app=app)
        prefix = f"{self.settings.queue_url}/"

        def pick(key: str, default: str) -> str:
            # Follow fal's URLs, but never send the key to a host other than the queue's.
            value = body.get(key)
            return value if isinstance(value, str) and value.startswith(prefix) else default

        return SubmitResult(
            built.request_id,
            pick("status_url", built.status_url),
            pick("response_url", built.response_url),
            pick("cancel_url", built.cancel_url),
        )

    def status(self, handle: SubmitResult) -> FalStatus:
        """Read a request's status once."""
        return _status(
            self._json(self._send("GET", handle.status_url, headers=self._key_headers()))
        )

    def wait(self, handle: SubmitResult, timeout_s: float | None = None) -> FalStatus:
        """Wait until COMPLETED; a completion that carries an error raises fal's real error.

        Follows fal's status stream (one request for the whole wait, told at once) when
        settings.status_stream is on and there is no deadline; polls otherwise, and from wherever a
        stream ends early (a proxy that cuts it, a host without it).
        """
        start = time.monotonic()
        state = None
        if self.settings.status_stream and timeout_s is None:
            state = self._follow_stream(handle)
        while state is None or state.status != "COMPLETED":
            self._sleep(0)  # a run that is stopping stops here (and ended the stream above)
            state = self.status(handle)
            if state.status == "COMPLETED":
                break
            waited = time.monotonic() - start
            if timeout_s is not None and waited >= timeout_s:
                raise FalTimeoutError(f"fal request {handle.request_id} still {state.status}")
            self._sleep(
                min(
                    self.settings.poll_max_s,
                    max(self.settings.poll_initial_s, waited * POLL_FRACTION),
                )
            )
        if state.error:
            raise self._completed_error(handle, state)
        return state

    def _follow_stream(self, handle: SubmitResult) -> FalStatus | None:
        """The COMPLETED status from fal's SSE status stream, or None when the stream ended first
        or could not be read (the caller then polls: nothing is lost, nothing is resubmitted)."""
        url = f"{handle.status_url}/stream"
        timeout = httpx.Timeout(self.settings.http_timeout_s, read=STREAM_SILENCE_S)
        try:
            with (
                self._http.stream("GET", url, headers=self._key_headers(), timeout=timeout) as resp,
                self._on_stop(lambda: _shut(resp)),
            ):
                if resp.status_code != 200:
                    log.debug("fal status stream answered HTTP %d: polling", resp.status_code)
                    return None
                for event in _sse_data(resp.iter_lines()):
                    state = _status(json.loads(event))
                    if state.status == "COMPLETED":
                        return state
        except (httpx.HTTPError, httpx.StreamError, ValueError, AttributeError) as exc:
            # cut, silent too long, shut by a stop, or an event that is no status object
            log.debug("fal status stream of %s ended: %s", handle.request_id, type(exc).__name__)
        return None

    def _completed_error(self, handle: SubmitResult, state: FalStatus) -> FalError:
        # The status only says *that* it failed; the result endpoint answers with the real error.
        resp = self._send(
            "GET", handle.response_url, retry_status=False, headers=self._key_headers()
        )
        if not resp.is_success:
            return self._error(resp)
        message = self._scrub(f"fal request {handle.request_id} failed: {state.error}")
        return FalRequestError(message, state.error_type or "unknown", None, retryable=False)

    def result(self, handle: SubmitResult) -> FalResult:
        """Fetch a completed request's output (a transient 5xx right after COMPLETED is retried)."""
        resp = self._send("GET", handle.response_url, headers=self._key_headers())
        return FalResult(self._json(resp), resp.headers)

    def cancel(self, handle: SubmitResult) -> str:
        """Ask fal to cancel a request; return CANCELLATION_REQUESTED or ALREADY_COMPLETED."""
        resp = self._send("PUT", handle.cancel_url, headers=self._key_headers())
        body = _body(resp)
        if resp.status_code == 400 and isinstance(body, dict) and body.get("status"):
            return str(body["status"])
        return str(self._json(resp).get("status", "CANCELLATION_REQUESTED"))

    # --- files ------------------------------------------------------------------------------------

    def download(self, url: str, dest_path: str | os.PathLike[str]) -> Path:
        """Stream url to dest_path via a .part file, resuming an interrupted transfer with Range."""
        dest = Path(dest_path)
        part = dest.with_name(dest.name + ".part")
        part.unlink(missing_ok=True)
        try:
            return self._download(url, dest, part)
        except BaseException as exc:
            part.unlink(missing_ok=True)  # a partial file only takes space: a new call restarts
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC,
                    "work dir is full: no space left on device while downloading a rendered "
                    "chunk; the partial file was removed (free space and rerun: the request is "
                    "fetched again, not paid again)",
                    str(dest),
                ) from exc
            raise

    def _download(self, url: str, dest: Path, part: Path) -> Path:
        why = ""
        for attempt in range(1, self.settings.max_attempts + 1):
            try:
                if self._fetch_into(url, part):
                    os.replace(part, dest)
                    return dest
                why = "transient HTTP status"
            except httpx.TransportError as exc:
                why = type(exc).__name__
            if attempt < self.settings.max_attempts:
                self._backoff(attempt, why, "GET", url)
        raise FalRequestError(f"download of {url} failed: {why}", "download_failed", None, True)

    def _fetch_into(self, url: str, part: Path) -> bool:
        """Append what is missing of url to part; False on a transient HTTP status."""
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._http.stream("GET", url, headers=headers) as resp:
            if _is_transient(resp.status_code):
                return False
            if resp.status_code == 416:  # our partial copy is stale: start over
                part.unlink()
                return False
            if not resp.is_success:
                resp.read()
                raise self._error(resp)
            # A server that ignores Range answers 200 with the whole file: overwrite.
            with part.open("ab" if resp.status_code == 206 else "wb") as fh:
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
        return True


def _token_deadline(expires_at: Any) -> float:
    """Monotonic time at which to refresh a storage token (now, if its expiry is unreadable)."""
    try:
        left = datetime.fromisoformat(str(expires_at)).timestamp() - time.time()
    except ValueError:
        return time.monotonic()
    return time.monotonic() + max(0.0, left - _TOKEN_MARGIN_S)


def _status(body: dict[str, Any]) -> FalStatus:
    """A status object (a status poll's answer, or one event of the status stream)."""
    return FalStatus(
        status=str(body.get("status")),
        queue_position=body.get("queue_position"),
        error=body.get("error"),
        error_type=body.get("error_type"),
        metrics=body.get("metrics") or {},
    )


def _sse_data(lines: Iterator[str]) -> Iterator[str]:
    """The data of each server-sent event (comments and other fields skipped; multi-line data
    joined with newlines, as the SSE standard says)."""
    data: list[str] = []
    for line in lines:
        if not line:  # a blank line ends an event
            if data:
                yield "\n".join(data)
            data = []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    if data:
        yield "\n".join(data)


def _shut(resp: httpx.Response) -> None:
    """End a streamed response from another thread: shutting the socket wakes a blocked read
    (closing it would not)."""
    stream = resp.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
