"""A loopback fake of fal's queue, storage and CDN for tests and benchmarks (127.0.0.1 only).

FakeFal serves submit/status/result/cancel for fal-ai/longcat-single-avatar and fal-ai/whisper, both
storage upload flows and downloads, renders real H.264+AAC MP4s with the model's frame counts, and
scripts faults. Its whisper says the words a test registered for an audio (FakeFal.speak) across the
audio's voiced bursts, or one placeholder word per burst.
Its renders are a photographed face (scikit-image's astronaut) whose mouth follows the request's
audio on a backdrop that is the same for every request, so every QC gate can judge them, chunk
joins included; Faults(faceless=True) renders stripes instead.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import heapq
import io
import itertools
import json
import math
import random
import re
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import av
import cv2
import numpy as np
import skimage.data
from PIL import Image

from tests.qc_factory import _HEAD_CROP, _MOUTH_HALF_WIDTH, _MOUTH_RGB, _MOUTH_XY

if TYPE_CHECKING:
    from avatarflow.tasks.config import FalSettings

APP = "fal-ai/longcat-single-avatar"
WHISPER_APP = "fal-ai/whisper"
# What the fake whisper bills: compute seconds (fal's unit for it) per second of audio.
WHISPER_UNITS_PER_AUDIO_S = 0.05
PLACEHOLDER_WORD = "word"  # what the fake whisper says for a burst of unregistered audio
_VOICED_FRAME_S = 0.02  # loudness is judged per 20 ms
_BURST_GAP_S = 0.1  # quieter stretches shorter than this do not end a burst
AI2V = "image-audio-to-video"
FPS = 16
UNITS_PER_VIDEO_S = {"480p": 1.0, "720p": 4.0}  # the model's API page: billing per 16 frames
# (width, height) buckets per resolution: AT2V uses the first, AI2V the nearest to the portrait.
BUCKETS = {
    "480p": ((832, 480), (480, 832), (640, 640)),
    "720p": ((1280, 768), (768, 1280), (960, 960)),
}
DEFAULT_KEY = "fake-key-id:fake-key-secret-5f1c"
_AUDIO_RATE_HZ = 16_000
_SWAY = (0, 1, 2, 1, 0, -1, -2, -1)  # a face render's sway in whole pixels, one step at a time
_SWAY_PX = max(_SWAY)
_CANCELLED = (499, {"detail": "Request cancelled by the client", "error_type": "client_cancelled"})


@dataclass
class Faults:
    """Scripted faults: each count fires on that many next occurrences; rates fire at random."""

    submit_429: int = 0
    submit_5xx: int = 0  # 503 on submit: nothing queued
    submit_hang: int = 0  # queued, but the answer never comes (an ambiguous submit)
    status_5xx: int = 0
    completed_error: int = 0  # ends COMPLETED with an error; the result answers with the real one
    completed_error_status: int = 503  # 503 runner_disconnected, or 422 with a detail list
    result_504: int = 0  # transient gateway timeout on a completed request's result
    result_expired: int = 0  # a completed request is forgotten: its status and result answer 404
    download_cut: int = 0  # the connection closes halfway through a file body
    stream_cut: int = 0  # a status stream closes after its first event, before COMPLETED
    stream_missing: bool = False  # the status stream route answers 404 (a host without it)
    cdn_v3_unavailable: bool = False  # the storage token endpoint answers 404
    omit_billable_units: bool = False
    faceless: bool = False  # renders moving stripes with no face, which QC's face gate rejects
    hang_s: float = 30.0
    rates: dict[str, float] = field(default_factory=dict)  # e.g. {"submit_429": 0.1}
    seed: int = 0


@dataclass
class _Job:
    id: str
    endpoint: str
    payload: dict[str, Any]
    submitted_at: float
    latency_s: float
    frames: int
    units: float
    seed: int
    failure: tuple[int, dict[str, Any]] | None  # what the result answers when the request failed
    video: Future[bytes] | None = None
    output: dict[str, Any] | None = None  # a whisper request's result
    state: str = "IN_QUEUE"
    started_at: float | None = None
    completed_at: float | None = None


def encode_video(frames: int, width: int, height: int) -> bytes:
    """Return an H.264 (yuv420p) + AAC MP4 of moving stripes and silence at 16 fps: no face."""
    ramp = np.arange(width, dtype=np.int32)[None, :] + np.arange(height, dtype=np.int32)[:, None]
    chroma = np.full((height // 2, width), 128, np.uint8)
    pictures = (
        # shifts every frame: not a frozen video
        av.VideoFrame.from_ndarray(
            np.concatenate([((ramp + 6 * i) % 256).astype(np.uint8), chroma]), format="yuv420p"
        )
        for i in range(frames)
    )
    return _mux(pictures, width, height, np.zeros(_samples_for(frames), np.float32))


def encode_face(frames: int, width: int, height: int, audio: bytes | None) -> bytes:
    """Return an H.264 + AAC MP4 at 16 fps of the astronaut's face talking the request's audio.

    The mouth opens with the audio's loudness frame by frame (closed past its end, or when it
    cannot be decoded), the picture sways a little, and the face sits at the same place on the
    same backdrop for every request of a size, so chunks rendered separately join without a seam.
    The sound track is the request's audio, cut or padded with silence to the video's length.
    """
    sound = _decode_audio(audio)
    openness = _openness(sound, frames)
    portrait = _portrait(width, height)
    track = np.zeros(_samples_for(frames), np.float32)
    track[: min(len(track), len(sound))] = sound[: len(track)]

    def pictures() -> Iterator[av.VideoFrame]:
        for i, amount in enumerate(openness):
            # a slow sway by whole pixels that starts at rest: the picture moves every 4 frames,
            # so even a silent stretch is not frozen, and the encoder predicts it cheaply
            dx, dy = _SWAY[i // 4 % len(_SWAY)], _SWAY[i // 6 % len(_SWAY)]
            image = portrait.padded[_SWAY_PX - dy :, _SWAY_PX - dx :][:height, :width].copy()
            half_height = max(1, round((1 + 8 * amount) * portrait.scale * 1.2))
            mouth = (portrait.mouth[0] + dx, portrait.mouth[1] + dy)
            cv2.ellipse(image, mouth, (portrait.half_width, half_height), 0, 0, 360, _MOUTH_RGB, -1)
            # OpenCV's I420 is BT.601 limited range, what decoders assume for an untagged stream
            yuv = cv2.cvtColor(image, cv2.COLOR_RGB2YUV_I420)
            yield av.VideoFrame.from_ndarray(yuv, format="yuv420p")

    return _mux(pictures(), width, height, track)


@dataclass(frozen=True)
class _Portrait:
    """The still picture of one output size (mouth closed) and where its mouth is."""

    padded: np.ndarray  # RGB, _SWAY_PX larger than the output on every side (edges reflected)
    mouth: tuple[int, int]  # centre (x, y)
    half_width: int
    scale: float  # canvas pixels per pixel of the photo's head crop


@functools.cache
def _portrait(width: int, height: int) -> _Portrait:
    """The astronaut's head and shoulders, as large as the shorter side allows, centred on the
    bottom edge of a backdrop of the photo's own colour (computed once per size)."""
    photo = skimage.data.astronaut()[_HEAD_CROP]
    side = min(width, height)
    scale = side / photo.shape[0]
    head = cv2.resize(photo, (round(photo.shape[1] * scale), side), interpolation=cv2.INTER_AREA)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = photo[5, 5]
    x0, y0 = (width - head.shape[1]) // 2, height - side
    canvas[y0:, x0 : x0 + head.shape[1]] = head
    mouth = (round(x0 + _MOUTH_XY[0] * scale), round(y0 + _MOUTH_XY[1] * scale))
    padded = cv2.copyMakeBorder(canvas, *[_SWAY_PX] * 4, cv2.BORDER_REFLECT)
    return _Portrait(padded, mouth, max(2, round(_MOUTH_HALF_WIDTH * scale)), scale)


def _decode_audio(data: bytes | None) -> np.ndarray:
    """The audio as mono float samples at the output's rate; empty when it does not decode."""
    if not data:
        return np.zeros(0, np.float32)
    resampler = av.AudioResampler("flt", "mono", _AUDIO_RATE_HZ)
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return np.zeros(0, np.float32)
            decoded = [
                f.to_ndarray().ravel()
                for frame in container.decode(container.streams.audio[0])
                for f in resampler.resample(frame)
            ]
            decoded += [f.to_ndarray().ravel() for f in resampler.resample(None)]
    except (av.FFmpegError, OSError, ValueError):
        return np.zeros(0, np.float32)
    return np.concatenate(decoded) if decoded else np.zeros(0, np.float32)


def _openness(sound: np.ndarray, frames: int) -> np.ndarray:
    """Mouth opening 0..1 per video frame: the frame's RMS loudness against the loud frames'."""
    padded = np.zeros(max(len(sound), _samples_for(frames)), np.float32)
    padded[: len(sound)] = sound
    edges = np.round(np.arange(frames + 1) * _AUDIO_RATE_HZ / FPS).astype(int)
    squares = np.concatenate([[0.0], np.cumsum(padded.astype(np.float64) ** 2)])
    rms = np.sqrt((squares[edges[1:]] - squares[edges[:-1]]) / np.diff(edges))
    return np.clip(rms / (np.percentile(rms, 95) + 1e-9), 0.0, 1.0)


def _samples_for(frames: int) -> int:
    return round(frames / FPS * _AUDIO_RATE_HZ)


def _mux(pictures: Iterable[av.VideoFrame], width: int, height: int, sound: np.ndarray) -> bytes:
    """Encode the frames (H.264, yuv420p, 16 fps) and mono sound (AAC) into MP4 bytes."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        # the fastest settings; crf 30 still shows the face plainly, in half the bytes of 23
        options = {"preset": "ultrafast", "tune": "zerolatency", "crf": "30"}
        video = container.add_stream("libx264", rate=FPS, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = container.add_stream(
            "aac", rate=_AUDIO_RATE_HZ, layout="mono", options={"aac_coder": "fast"}
        )
        for i, frame in enumerate(pictures):
            frame.pts = i
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for start in range(0, len(sound), 1024):
            chunk = av.AudioFrame.from_ndarray(
                sound[None, start : start + 1024], format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts = _AUDIO_RATE_HZ, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode())
    return buf.getvalue()


# One encoder thread per process, results kept by what they depend on (the faceless stripes by
# size and length only): identical requests share one encode, and it starts at submit so it is
# ready when the request completes. The last _VIDEOS_KEPT are kept.
_VIDEOS: OrderedDict[tuple[Any, ...], Future[bytes]] = OrderedDict()
_VIDEOS_KEPT = 64
_VIDEOS_LOCK = threading.Lock()
_ENCODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fakefal-encode")


def _video_future(
    frames: int, size: tuple[int, int], audio: bytes | None, face: bool
) -> Future[bytes]:
    key: tuple[Any, ...] = (frames, *size)
    if face:
        key += (hashlib.sha256(audio or b"").hexdigest(),)
    with _VIDEOS_LOCK:
        if key in _VIDEOS:
            _VIDEOS.move_to_end(key)
        else:
            work = (encode_face, *key[:3], audio) if face else (encode_video, *key)
            _VIDEOS[key] = _ENCODER.submit(*work)
            if len(_VIDEOS) > _VIDEOS_KEPT:
                _VIDEOS.popitem(last=False)
        return _VIDEOS[key]


def voiced_bursts(sound: np.ndarray, rate_hz: int = _AUDIO_RATE_HZ) -> list[tuple[float, float]]:
    """(start s, end s) of each stretch of sound louder than a tenth of its loud frames' level,
    quieter gaps under _BURST_GAP_S bridged."""
    step = round(_VOICED_FRAME_S * rate_hz)
    frames = len(sound) // step
    if frames == 0:
        return []
    rms = np.sqrt((sound[: frames * step].reshape(frames, step).astype(np.float64) ** 2).mean(1))
    voiced = rms > max(1e-3, 0.1 * float(np.percentile(rms, 95)))
    bursts: list[tuple[float, float]] = []
    for i in np.flatnonzero(voiced):
        start, end = i * _VOICED_FRAME_S, (i + 1) * _VOICED_FRAME_S
        if bursts and start - bursts[-1][1] < _BURST_GAP_S:
            bursts[-1] = (bursts[-1][0], end)
        else:
            bursts.append((start, end))
    return [(round(a, 3), round(b, 3)) for a, b in bursts]


def transcribe(
    sound: np.ndarray, script: list[str] | None, chunk_level: str = "word"
) -> dict[str, Any]:
    """fal-ai/whisper's output for the audio: the script's words spread over the voiced bursts
    (by length, a word never crossing a burst's end), else one placeholder word per burst."""
    bursts = voiced_bursts(sound)
    timed: list[tuple[str, float, float, int]] = []  # (word, start, end, burst)
    if script is None:
        timed = [(PLACEHOLDER_WORD, a, b, i) for i, (a, b) in enumerate(bursts)]
    elif bursts and script:
        # voiced time laid end to end, each word a share of it proportional to its length + 1
        edges = np.cumsum([0.0] + [b - a for a, b in bursts])
        weights = np.cumsum([0] + [len(w) + 1 for w in script])
        cuts = weights / weights[-1] * edges[-1]
        for word, lo, hi in zip(script, cuts, cuts[1:], strict=False):
            k = min(int(np.searchsorted(edges, lo, side="right")) - 1, len(bursts) - 1)
            start = bursts[k][0] + lo - edges[k]
            end = min(bursts[k][1], bursts[k][0] + hi - edges[k])
            timed.append((word, round(start, 3), round(end, 3), k))
    if chunk_level == "word":
        chunks = [{"timestamp": [a, b], "text": f" {w}"} for w, a, b, _ in timed]
    else:  # one segment per burst
        chunks = [
            {
                "timestamp": [bursts[k][0], bursts[k][1]],
                "text": "".join(f" {w}" for w, _, _, burst in timed if burst == k),
            }
            for k in sorted({burst for *_, burst in timed})
        ]
    text = " ".join(w for w, *_ in timed)
    return {"text": text, "chunks": chunks, "inferred_languages": ["en"]}


def _visible_state(job: _Job) -> str:
    """The status fal would answer: a request whose simulated run succeeded stays IN_PROGRESS
    until its video is encoded, as fal's does until its output is stored (no result call waits)."""
    if job.state == "COMPLETED" and job.failure is None and job.video and not job.video.done():
        return "IN_PROGRESS"
    return job.state


def _nearest_bucket(resolution: str, width: int, height: int) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(BUCKETS[resolution], key=lambda wh: abs(math.log(wh[0] / wh[1]) - aspect))


def _reply(
    h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None
) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    headers = {"Content-Type": "application/json", **(headers or {})}
    for name, value in headers.items():
        h.send_header(name, value)
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like fal's hosts
    timeout = 30  # idle keep-alive connections release their thread
    fake: FakeFal

    def _route(self) -> None:
        self.fake._dispatch(self, self.command)

    do_GET = do_POST = do_PUT = _route

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a hung submit must not block shutdown
    request_queue_size = 512  # accept bursts of well over 100 concurrent connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


_APPS = f"(?:{APP}|{WHISPER_APP})"
_ROUTES = [
    ("POST", re.compile(rf"/queue/{APP}/(audio-to-video|image-audio-to-video)"), "submit"),
    ("POST", re.compile(rf"/queue/({WHISPER_APP})"), "submit"),
    ("GET", re.compile(rf"/queue/{_APPS}/requests/([\w-]+)/status"), "status"),
    ("GET", re.compile(rf"/queue/{_APPS}/requests/([\w-]+)/status/stream"), "stream"),
    ("GET", re.compile(rf"/queue/{_APPS}/requests/([\w-]+)"), "result"),
    ("PUT", re.compile(rf"/queue/{_APPS}/requests/([\w-]+)/cancel"), "cancel"),
    ("POST", re.compile(r"/rest/storage/auth/token"), "token"),
    ("POST", re.compile(r"/rest/storage/upload/initiate"), "initiate"),
    ("POST", re.compile(r"/cdn/files/upload"), "upload"),
    ("PUT", re.compile(r"/cdn/uploads/([\w-]+)"), "put"),
    ("GET", re.compile(r"/cdn/files/(.+)"), "file"),
]


class FakeFal:
    """A fal look-alike on 127.0.0.1; use as a context manager. Counters and payloads are public.

    Like fal's queue, it accepts any JSON body: invalid input ends COMPLETED with an error, and the
    result then answers 422 with a detail list naming the fields.
    """

    def __init__(
        self,
        *,
        latency_s: float | Callable[[dict[str, Any]], float] = 0.2,
        concurrency: int | None = None,
        faults: Faults | None = None,
        key: str = DEFAULT_KEY,
        keepalive_s: float = 15.0,
    ) -> None:
        self.latency_s = latency_s  # processing time per request, or a function of the payload
        self.keepalive_s = keepalive_s  # a status stream's comment interval while nothing changes
        self.concurrency = concurrency  # requests IN_PROGRESS at once (None: unlimited)
        self.key = key
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._seq = itertools.count()
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._running: list[tuple[float, int, _Job]] = []  # heap of (end time, seq, job)
        self._files: dict[str, tuple[bytes, str]] = {}  # path under /cdn/files/ → (bytes, type)
        self._pending: dict[str, tuple[str, str]] = {}  # initiated uploads: id → (path, type)
        self._tokens: set[str] = set()
        self._scripts: dict[str, list[str]] = {}  # audio sha256 → the words its whisper says
        self.reset(faults)

    def reset(self, faults: Faults | None = None) -> None:
        """Zero the counters and payloads and install new faults (none by default)."""
        with self._lock:
            self._advance(time.monotonic())  # settle what finished before, so it counts before
            self.faults = faults or Faults()
            self._rng = random.Random(self.faults.seed)
            # Hits per route, plus "submitted" and "completed" jobs and submissions per endpoint.
            self.counts: Counter[str] = Counter()
            self.payloads: list[dict[str, Any]] = []
            self.request_ids: list[str] = []  # parallel to payloads
            self.billed_units = 0.0
            self.max_in_progress = len(self._running)
            self._scripts.clear()

    @property
    def submissions(self) -> int:
        """Requests that were queued (each one would be billed on success)."""
        return self.counts["submitted"]

    def __enter__(self) -> FakeFal:
        handler = type("BoundHandler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.queue_url, self.rest_url, self.cdn_url = f"{base}/queue", f"{base}/rest", f"{base}/cdn"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def env(self) -> dict[str, str]:
        """The FAL_* variables that point a client at this fake."""
        return {
            "FAL_KEY": self.key,
            "FAL_QUEUE_URL": self.queue_url,
            "FAL_REST_URL": self.rest_url,
            "FAL_CDN_URL": self.cdn_url,
        }

    def settings(self, **overrides: Any) -> FalSettings:
        """FalSettings pointing at this fake, with the real protocol but millisecond backoff and
        fast polls (the retry logic is real, only its waits are short). The key is not in them:
        FalSettings.api_key() reads FAL_KEY, which the `fake` fixture sets (or see env())."""
        from avatarflow.tasks.config import FalSettings

        fast: dict[str, Any] = {
            "queue_url": self.queue_url,
            "rest_url": self.rest_url,
            "cdn_url": self.cdn_url,
            "backoff_base_s": 0.005,
            "backoff_max_s": 0.02,
            "poll_initial_s": 0.05,
            "poll_max_s": 0.2,
            "http_timeout_s": 5.0,
        }
        return FalSettings(**{**fast, **overrides})

    def speak(self, audio: bytes | str, script: str) -> None:
        """Register what is said in an audio (its bytes, or their sha256): fal-ai/whisper then
        answers those words for it, timed across its voiced bursts (until reset())."""
        sha = hashlib.sha256(audio).hexdigest() if isinstance(audio, bytes) else audio
        with self._lock:
            self._scripts[sha] = script.split()

    def state(self, request_id: str) -> str:
        """The request's status right now (IN_QUEUE, IN_PROGRESS or COMPLETED)."""
        with self._lock:
            self._advance(time.monotonic())
            return _visible_state(self._jobs[request_id])

    def expire(self, request_id: str) -> None:
        """Forget a request and its output file, as fal does once their retention ends."""
        with self._lock:
            self._advance(time.monotonic())
            self._jobs.pop(request_id, None)
            self._files.pop(f"{request_id}/output.mp4", None)

    def file_bytes(self, url: str) -> bytes | None:
        """What a file URL (on this fake's CDN, or a data: URI) holds, or None."""
        if url.startswith("data:"):
            try:
                return base64.b64decode(url.split(",", 1)[1], validate=True)
            except (IndexError, ValueError, binascii.Error):
                return None
        prefix = f"{self.cdn_url}/files/"
        entry = self._files.get(url[len(prefix) :]) if url.startswith(prefix) else None
        return entry[0] if entry else None

    # --- scheduling in simulated time (callers hold the lock) -------------------------------------

    def _take(self, fault: str) -> bool:
        """Whether this fault fires now (counted in counts["fault:<name>"])."""
        with self._lock:
            scripted = getattr(self.faults, fault) > 0
            if scripted:
                setattr(self.faults, fault, getattr(self.faults, fault) - 1)
            fired = scripted or self._rng.random() < self.faults.rates.get(fault, 0.0)
            self.counts[f"fault:{fault}"] += fired
            return fired

    def _fill(self, now: float) -> None:
        while self._queue and (self.concurrency is None or len(self._running) < self.concurrency):
            job = self._queue.popleft()
            job.state, job.started_at = "IN_PROGRESS", max(job.submitted_at, now)
            heapq.heappush(self._running, (job.started_at + job.latency_s, next(self._seq), job))
        self.max_in_progress = max(self.max_in_progress, len(self._running))

    def _advance(self, now: float) -> None:
        # Finish jobs in end order; each freed slot starts the next queued job at that instant.
        while self._running and self._running[0][0] <= now:
            end, _, job = heapq.heappop(self._running)
            self._finish(job, end)
            self._fill(end)

    def _finish(self, job: _Job, at: float) -> None:
        job.state, job.completed_at = "COMPLETED", at
        if job.failure is None:
            self.billed_units += job.units
            self.counts["completed"] += 1

    # --- HTTP -------------------------------------------------------------------------------------

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = urlsplit(h.path).path
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        for route_method, pattern, name in _ROUTES:
            match = pattern.fullmatch(path)
            if route_method != method or not match:
                continue
            with self._lock:
                self.counts[name] += 1
            keyed = path.startswith(("/queue/", "/rest/"))
            if keyed and h.headers.get("Authorization") != f"Key {self.key}":
                return _reply(h, 401, {"detail": "Invalid or missing API key"})
            return getattr(self, f"_{name}")(h, body, *match.groups())
        _reply(h, 404, {"detail": f"no route for {method} {path}"})

    def _urls(self, job: _Job) -> dict[str, str]:
        app = WHISPER_APP if job.endpoint == WHISPER_APP else APP
        base = f"{self.queue_url}/{app}/requests/{job.id}"
        return {
            "status_url": f"{base}/status",
            "response_url": base,
            "cancel_url": f"{base}/cancel",
        }

    def _submit(self, h: BaseHTTPRequestHandler, body: bytes, endpoint: str) -> None:
        if self._take("submit_429"):
            err = {"detail": "Concurrent request limit reached", "error_type": "rate_limited"}
            return _reply(h, 429, err, {"x-fal-needs-retry": "1"})
        if self._take("submit_5xx"):
            err = {"detail": "Service temporarily unavailable", "error_type": "internal_error"}
            return _reply(h, 503, err)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            err = [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict"}]
            return _reply(h, 422, {"detail": err})
        job = self._enqueue(endpoint, payload)
        if self._take("submit_hang"):
            self._stop.wait(self.faults.hang_s)
            h.close_connection = True
            return None
        with self._lock:
            position = self._queue.index(job) if job.state == "IN_QUEUE" else 0
        answer = {"request_id": job.id, **self._urls(job), "queue_position": position}
        _reply(h, 200, {**answer, "status": "IN_QUEUE"}, {"x-fal-request-id": job.id})

    def _enqueue(self, endpoint: str, payload: dict[str, Any]) -> _Job:
        whisper = endpoint == WHISPER_APP
        errors, size = (
            self._validate_whisper(payload) if whisper else self._validate(endpoint, payload)
        )
        failure = (422, {"detail": errors}) if errors else None
        if failure is None and self._take("completed_error"):
            failure = self._scripted_failure()
        segments = payload.get("num_segments", 1) if not errors and not whisper else 1
        frames = 93 + 80 * (segments - 1)
        units = frames / FPS * UNITS_PER_VIDEO_S.get(payload.get("resolution", "480p"), 1)
        output = None
        if whisper and not errors:
            audio = self.file_bytes(str(payload["audio_url"])) or b""
            sound = _decode_audio(audio)
            with self._lock:
                script = self._scripts.get(hashlib.sha256(audio).hexdigest())
            output = transcribe(sound, script, str(payload.get("chunk_level", "segment")))
            units = len(sound) / _AUDIO_RATE_HZ * WHISPER_UNITS_PER_AUDIO_S
        latency = self.latency_s(payload) if callable(self.latency_s) else self.latency_s
        now = time.monotonic()
        with self._lock:
            self._advance(now)
            seed = payload.get("seed")
            job = _Job(
                id=str(uuid.uuid4()),
                endpoint=endpoint,
                payload=payload,
                submitted_at=now,
                latency_s=0.0 if errors else latency,  # bad input fails as soon as it starts
                frames=frames,
                units=units,
                seed=seed if isinstance(seed, int) else self._rng.randrange(2**32),
                failure=failure,
                output=output,
            )
            self._jobs[job.id] = job
            self._queue.append(job)
            self.payloads.append(payload)
            self.request_ids.append(job.id)
            self.counts["submitted"] += 1
            self.counts[endpoint] += 1
            self._fill(now)
        if failure is None and not whisper:
            audio = self.file_bytes(str(payload["audio_url"]))
            job.video = _video_future(frames, size, audio, face=not self.faults.faceless)
        return job

    def _scripted_failure(self) -> tuple[int, dict[str, Any]]:
        if self.faults.completed_error_status == 422:
            err = {
                "loc": ["body", "audio_url"],
                "msg": "Audio has no speech",
                "type": "value_error",
            }
            return 422, {"detail": [err]}
        err = {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
        return self.faults.completed_error_status, err

    def _validate(
        self, endpoint: str, p: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """Check a payload the way the app's input model would; return errors and the video size."""
        errors: list[dict[str, Any]] = []

        def bad(name: str, msg: str, kind: str) -> None:
            errors.append({"loc": ["body", name], "msg": msg, "type": kind})

        resolution = p.get("resolution", "480p")
        if resolution not in BUCKETS:
            bad("resolution", "Input should be '480p' or '720p'", "enum")
            resolution = "480p"
        segments = p.get("num_segments", 1)
        if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
            bad("num_segments", "Input should be greater than or equal to 1", "greater_than_equal")
        if "seed" in p and not isinstance(p["seed"], int):
            bad("seed", "Input should be a valid integer", "int_type")
        if "audio_url" not in p:
            bad("audio_url", "Field required", "missing")
        elif self.file_bytes(str(p["audio_url"])) is None:
            bad("audio_url", "Failed to download the file", "file_download_error")
        size = BUCKETS[resolution][0]
        if endpoint == AI2V:
            if not p.get("prompt"):
                bad("prompt", "Field required", "missing")
            image = self.file_bytes(str(p["image_url"])) if "image_url" in p else None
            if "image_url" not in p:
                bad("image_url", "Field required", "missing")
            elif image is None:
                bad("image_url", "Failed to download the file", "file_download_error")
            else:
                try:
                    size = _nearest_bucket(resolution, *Image.open(io.BytesIO(image)).size)
                except OSError:
                    bad("image_url", "Could not decode the image", "image_load_error")
        return errors, size

    def _validate_whisper(self, p: dict[str, Any]) -> tuple[list[dict[str, Any]], tuple[int, int]]:
        """Check a fal-ai/whisper payload: a decodable audio_url, a known chunk_level and task."""
        errors: list[dict[str, Any]] = []
        if "audio_url" not in p:
            errors.append(
                {"loc": ["body", "audio_url"], "msg": "Field required", "type": "missing"}
            )
        elif not len(_decode_audio(self.file_bytes(str(p["audio_url"])))):
            msg = "Failed to download or decode the audio"
            errors.append({"loc": ["body", "audio_url"], "msg": msg, "type": "file_download_error"})
        for name, allowed in (
            ("chunk_level", ("segment", "word")),
            ("task", ("transcribe", "translate")),
        ):
            if name in p and p[name] not in allowed:
                msg = f"Input should be {' or '.join(repr(a) for a in allowed)}"
                errors.append({"loc": ["body", name], "msg": msg, "type": "enum"})
        return errors, (0, 0)

    def _job(self, h: BaseHTTPRequestHandler, request_id: str) -> _Job | None:
        with self._lock:
            self._advance(time.monotonic())
            job = self._jobs.get(request_id)
        if job is None:
            _reply(h, 404, {"detail": "Request not found"})
        return job

    def _status(self, h: BaseHTTPRequestHandler, body: bytes, request_id: str) -> None:
        if (job := self._job(h, request_id)) is None:
            return
        if self._take("status_5xx"):
            return _reply(h, 503, {"detail": "Service unavailable", "error_type": "internal_error"})
        with self._lock:
            answer = self._status_answer(job)
        _reply(h, 200 if answer["status"] == "COMPLETED" else 202, answer)

    def _stream(self, h: BaseHTTPRequestHandler, body: bytes, request_id: str) -> None:
        """fal's SSE status stream: one `data:` event per status change, a comment every
        keepalive_s while nothing changes, closed after COMPLETED."""
        if self.faults.stream_missing:
            return _reply(h, 404, {"detail": "Not Found"})
        if (job := self._job(h, request_id)) is None:
            return
        cut = self._take("stream_cut")
        h.send_response(200)
        for name, value in (("Content-Type", "text/event-stream"), ("Connection", "close")):
            h.send_header(name, value)
        h.end_headers()
        h.close_connection = True  # the body ends when the connection does
        sent, quiet_since = None, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                self._advance(now)
                answer = self._status_answer(job)
                # a running job changes at its end, one whose video is encoding soon; a queued
                # one when another ends: looked at again shortly
                wake = 0.25
                if job.state == "IN_PROGRESS":
                    wake = (job.started_at or now) + job.latency_s - now
                elif answer["status"] == "IN_PROGRESS":
                    wake = 0.02
            if answer["status"] != sent:
                h.wfile.write(f"data: {json.dumps(answer)}\n\n".encode())
                h.wfile.flush()
                sent, quiet_since = answer["status"], now
                if sent == "COMPLETED" or cut:
                    return
            elif now - quiet_since >= self.keepalive_s:
                h.wfile.write(b": keep-alive\n\n")
                h.wfile.flush()
                quiet_since = now
            until_ping = quiet_since + self.keepalive_s - now
            self._stop.wait(max(0.005, min(0.25, wake, until_ping)))

    def _status_answer(self, job: _Job) -> dict[str, Any]:
        """The status object fal answers for job now (callers hold the lock)."""
        state = _visible_state(job)
        answer = {"status": state, "request_id": job.id, **self._urls(job), "logs": None}
        if state == "IN_QUEUE":
            answer["queue_position"] = self._queue.index(job)
        if state == "COMPLETED":
            run_s = (job.completed_at or 0.0) - (job.started_at or 0.0)
            answer["metrics"] = {"inference_time": run_s}
            if job.failure is not None:
                answer["error"] = str(job.failure[1]["detail"])[:200]
                answer["error_type"] = job.failure[1].get("error_type", "validation_error")
        return answer

    def _result(self, h: BaseHTTPRequestHandler, body: bytes, request_id: str) -> None:
        if (job := self._job(h, request_id)) is None:
            return
        if _visible_state(job) != "COMPLETED":
            return _reply(h, 400, {"detail": "Request is still in progress"})
        if self._take("result_expired"):
            self.expire(job.id)
            return _reply(h, 404, {"detail": "Request not found"})
        if job.failure is not None:
            status, err = job.failure
            return _reply(h, status, err, {"x-fal-error-type": err.get("error_type", "validation")})
        if self._take("result_504"):
            return _reply(
                h, 504, b"<html>504 Gateway Time-out (nginx)</html>", {"Content-Type": "text/html"}
            )
        headers = {"x-fal-request-id": job.id}
        if not self.faults.omit_billable_units:
            headers["x-fal-billable-units"] = str(job.units)
        if job.output is not None:
            return _reply(h, 200, job.output, headers)
        assert job.video is not None
        data = job.video.result()
        path = f"{job.id}/output.mp4"
        with self._lock:
            self._files[path] = (data, "video/mp4")
        video = {"url": f"{self.cdn_url}/files/{path}", "content_type": "video/mp4"}
        video |= {"file_name": "output.mp4", "file_size": len(data)}
        _reply(h, 200, {"video": video, "seed": job.seed}, headers)

    def _cancel(self, h: BaseHTTPRequestHandler, body: bytes, request_id: str) -> None:
        if (job := self._job(h, request_id)) is None:
            return
        with self._lock:
            done = job.state == "COMPLETED"
            if job.state == "IN_QUEUE":
                self._queue.remove(job)
            elif job.state == "IN_PROGRESS":
                self._running = [entry for entry in self._running if entry[2] is not job]
                heapq.heapify(self._running)
            if not done:
                now = time.monotonic()
                job.failure = _CANCELLED
                job.started_at = job.started_at or now
                self._finish(job, now)
                self._fill(now)
        if done:
            return _reply(h, 400, {"status": "ALREADY_COMPLETED"})
        _reply(h, 202, {"status": "CANCELLATION_REQUESTED"})

    # --- storage ----------------------------------------------------------------------------------

    def _token(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        if self.faults.cdn_v3_unavailable:
            return _reply(h, 404, {"detail": "Not Found"})
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens.add(token)
        expires = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        answer = {"token": token, "token_type": "Bearer", "base_url": self.cdn_url}
        _reply(h, 200, {**answer, "expires_at": expires})

    def _upload(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        scheme, _, token = h.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or token not in self._tokens:
            return _reply(h, 401, {"detail": "Invalid storage token"})
        name = quote(h.headers.get("X-Fal-File-Name") or "file", safe="._-")
        content_type = h.headers.get("Content-Type", "application/octet-stream")
        path = f"{uuid.uuid4().hex}/{name}"
        with self._lock:
            self._files[path] = (body, content_type)
        answer = {"access_url": f"{self.cdn_url}/files/{path}", "content_type": content_type}
        _reply(h, 200, {**answer, "file_name": name})

    def _initiate(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        meta = json.loads(body or b"{}")
        upload_id, name = uuid.uuid4().hex, quote(str(meta.get("file_name", "file")), safe="._-")
        with self._lock:
            content_type = str(meta.get("content_type", "application/octet-stream"))
            self._pending[upload_id] = (f"{upload_id}/{name}", content_type)
        upload_url = f"{self.cdn_url}/uploads/{upload_id}"
        _reply(
            h,
            200,
            {"upload_url": upload_url, "file_url": f"{self.cdn_url}/files/{upload_id}/{name}"},
        )

    def _put(self, h: BaseHTTPRequestHandler, body: bytes, upload_id: str) -> None:
        with self._lock:
            entry = self._pending.pop(upload_id, None)
            if entry is not None:
                self._files[entry[0]] = (body, entry[1])
        _reply(h, 404 if entry is None else 200, {})

    def _file(self, h: BaseHTTPRequestHandler, body: bytes, path: str) -> None:
        entry = self._files.get(path)
        if entry is None:
            return _reply(h, 404, {"detail": "File not found"})
        data, content_type = entry
        headers, status = {"Content-Type": content_type, "Accept-Ranges": "bytes"}, 200
        if match := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", "")):
            start = int(match[1])
            if start >= len(data):
                return _reply(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
            with self._lock:
                self.counts["file_range"] += 1
        if self._take("download_cut"):
            h.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(data[: len(data) // 2])
            h.close_connection = True  # the client sees the body end short of Content-Length
            return None
        _reply(h, status, data, headers)
