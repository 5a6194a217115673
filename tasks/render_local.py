"""Local render backend: LongCat-Video-Avatar on this machine's GPU (or CPU for the tiny model).

A row's chunks render as one continuous video, segment by segment, continuing in latent space
across chunk boundaries; each finished segment's frames and continuation state are saved under
job.out_dir, so an interrupted row resumes at its last finished segment. Each chunk then becomes
one H.264 MP4 of its span of the narration (video only: the concat stage muxes the audio).
Frame size: a checkpoint's avatarflow.json `sample_size` wins (the tiny one renders 32x32 on CPU),
otherwise the row's resolution bucket (480x832 / 768x1280, or the portrait's aspect bucket).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import ClassVar

import av
import numpy as np
import torch
from PIL import Image
from scipy.signal import resample_poly

from flows.settings import BatchConfig, LocalSettings
from model.loading import load_pipeline
from model.pipeline_longcat_avatar import LongCatAvatarSegmentState, LongCatVideoAvatarPipeline
from model.tiny import write_tiny_checkpoint
from tasks.audio import load_pcm
from tasks.records import ChunkVideo
from tasks.render import RenderJob

SAMPLE_RATE_HZ = 16_000
TINY_DIR = "tiny-checkpoint"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(settings: LocalSettings) -> torch.device:
    """Return the configured device; "auto" is cuda when available, else cpu."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


def load_local_pipeline(settings: LocalSettings, work_path: Path) -> LongCatVideoAvatarPipeline:
    """Load the configured checkpoint (or the tiny one, written once under work_path)."""
    device = resolve_device(settings)
    model_dir = settings.model_dir
    if model_dir is None:
        model_dir = work_path / TINY_DIR
        if not (model_dir / "avatarflow.json").exists():  # written last: the folder is complete
            write_tiny_checkpoint(model_dir)
    # bf16 on GPU halves memory; CPU stays fp32 (the DiT's fp32 modulation needs it there).
    dtype = _DTYPES.get(settings.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(model_dir, dtype=dtype)
    if settings.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_wav(path: str | Path) -> np.ndarray:
    """Read a chunk's 16-bit WAV as mono float32 at the model's 16 kHz."""
    samples, rate = load_pcm(path)
    if rate == SAMPLE_RATE_HZ:
        return samples
    divisor = math.gcd(rate, SAMPLE_RATE_HZ)
    resampled = resample_poly(samples, SAMPLE_RATE_HZ // divisor, rate // divisor)
    return resampled.astype(np.float32)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode (F, H, W, 3) uint8 frames as H.264 MP4 at fps, written atomically."""
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        # mbtree off: libx264's macroblock-tree pass reads uninitialised memory on some frame
        # sizes (e.g. 32x32, 96x96), so the same frames could encode to different bytes.
        stream.options = {"crf": "18", "x264-params": "mbtree=0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    tmp.replace(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LocalRenderer:
    """Renderer on LongCatVideoAvatarPipeline; one model per process, reused for every row."""

    name: ClassVar[str] = "local"
    continuous: ClassVar[bool] = True
    _instances: ClassVar[dict[tuple, LocalRenderer]] = {}
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        pipe: LongCatVideoAvatarPipeline,
        settings: LocalSettings | None = None,
        on_segment: Callable[[str, int], None] | None = None,
    ) -> None:
        self.pipe = pipe
        self.settings = settings or LocalSettings()
        self.on_segment = on_segment  # called with (row id, segment index) after each save
        self._lock = threading.Lock()  # one render at a time on the one model

    @classmethod
    def shared(cls, config: BatchConfig) -> LocalRenderer:
        """Return this process's renderer for config.local, loading the model once under a lock."""
        model_dir = config.local.model_dir or str(config.work_path / TINY_DIR)
        key = (model_dir, config.local)
        with cls._instances_lock:
            if key not in cls._instances:
                pipe = load_local_pipeline(config.local, config.work_path)
                cls._instances[key] = cls(pipe, config.local)
            return cls._instances[key]

    def render(self, job: RenderJob) -> list[ChunkVideo]:
        """Render all of job's chunks as one continuous video; return one MP4 per chunk."""
        started = time.monotonic()
        segments_dir = Path(job.out_dir) / f"{job.plan.row.id}.segments"
        segments_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            num_segments = self._render_segments(job, segments_dir)
        rendered = time.monotonic()
        segments = [
            np.load(segments_dir / f"{k:04d}.npy", mmap_mode="r") for k in range(num_segments)
        ]
        videos = self._write_chunks(job, segments, {"render_s": rendered - started})
        del segments  # release the memory maps before removing their files
        shutil.rmtree(segments_dir)
        return videos

    def _row_audio(self, job: RenderJob) -> np.ndarray:
        """Place each chunk's WAV at its start in one 16 kHz buffer covering the row."""
        end_s = max(chunk.end_s for chunk in job.chunks)
        audio = np.zeros(int(np.ceil(end_s * SAMPLE_RATE_HZ)), dtype=np.float32)
        for chunk, path in zip(job.chunks, job.chunk_audio_paths, strict=True):
            samples = read_wav(path)
            start = int(round(chunk.start_s * SAMPLE_RATE_HZ))
            samples = samples[: max(0, audio.size - start)]
            audio[start : start + samples.size] = samples
        return audio

    def _render_segments(self, job: RenderJob, segments_dir: Path) -> int:
        """Render the row's missing segments, saving frames + state after each; return the total."""
        row, pipe = job.plan.row, self.pipe
        audio = self._row_audio(job)
        # The chunks' own segment counts, or more when their sum falls short of the whole row.
        needed = pipe.num_segments_for(audio.size / SAMPLE_RATE_HZ)
        num_segments = max(sum(c.num_segments for c in job.chunks), needed)
        state = _latest_state(segments_dir, num_segments)
        if state is not None and state.segments_done == num_segments:
            return num_segments

        image = Image.open(job.image_path).convert("RGB") if job.image_path else None
        generator = torch.Generator(device=pipe._execution_device).manual_seed(job.plan.seed)
        pipe(
            prompt=row.prompt,
            negative_prompt=row.negative_prompt,
            audio=audio,
            image=image,
            num_segments=num_segments,
            resolution=row.resolution,
            num_inference_steps=row.num_inference_steps or self.settings.num_inference_steps,
            text_guidance_scale=row.text_guidance_scale,
            audio_guidance_scale=row.audio_guidance_scale,
            generator=generator,
            output_type="latent",
            resume_state=state,
            segment_callback=partial(self._save_segment, segments_dir, row.id),
        )
        return num_segments

    def _save_segment(
        self,
        segments_dir: Path,
        row_id: str,
        _pipe: LongCatVideoAvatarPipeline,
        index: int,
        state: LongCatAvatarSegmentState,
        video: torch.Tensor,
    ) -> None:
        """Persist one finished segment: its frames (uint8 .npy), then its continuation state."""
        pixels = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255)
        frames_tmp = segments_dir / f"{index:04d}.npy.part"
        with frames_tmp.open("wb") as handle:
            np.save(handle, pixels.to(torch.uint8).numpy())
        frames_tmp.replace(segments_dir / f"{index:04d}.npy")
        # The state file is written last: its presence marks the segment finished.
        state_tmp = segments_dir / f"{index:04d}.state.part"
        state.save(state_tmp)
        state_tmp.replace(segments_dir / f"{index:04d}.safetensors")
        if self.on_segment is not None:
            self.on_segment(row_id, index)

    def _write_chunks(
        self, job: RenderJob, segments: list[np.ndarray], timings: dict[str, float]
    ) -> list[ChunkVideo]:
        """Cut the row's frames at the chunk boundaries and encode one MP4 per chunk."""
        fps, videos = self.pipe.fps, []
        for position, chunk in enumerate(job.chunks):
            first, last = chunk.frame_span(position == len(job.chunks) - 1, fps)
            path = Path(job.out_dir) / f"{chunk.row_id}-{chunk.index:03d}.mp4"
            encode_started = time.monotonic()
            write_mp4(path, _frame_span(segments, first, last), fps)
            videos.append(
                ChunkVideo(
                    row_id=chunk.row_id,
                    chunk_index=chunk.index,
                    path=str(path),
                    sha256=_sha256(path),
                    backend=self.name,
                    seed=job.plan.seed,
                    timings_s=timings | {"encode_s": time.monotonic() - encode_started},
                )
            )
        return videos


def _latest_state(segments_dir: Path, num_segments: int) -> LongCatAvatarSegmentState | None:
    """The state after the last finished segment saved in segments_dir, if any."""
    for index in range(num_segments - 1, -1, -1):
        path = segments_dir / f"{index:04d}.safetensors"
        if path.exists() and (segments_dir / f"{index:04d}.npy").exists():
            return LongCatAvatarSegmentState.load(path)
    return None


def _frame_span(segments: list[np.ndarray], first: int, last: int) -> np.ndarray:
    """Frames [first, last) of the row, gathered from the per-segment arrays without joining all."""
    parts, offset = [], 0
    for frames in segments:
        lo, hi = max(first - offset, 0), min(last - offset, len(frames))
        if lo < hi:
            parts.append(frames[lo:hi])
        offset += len(frames)
    return np.ascontiguousarray(np.concatenate(parts))
