"""Leaf pieces of the LongCat-Video-Avatar pipeline: constants, per-version flags, sigma schedules,
guidance, prompt cleaning and the resumable segment state.

Behaviour follows meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794:
`longcat_video/pipeline_longcat_video_avatar.py` (`LongCatVideoAvatarPipeline.get_timesteps_sigmas`,
`prompt_clean`, the guidance formula and the `enhance_hf` tail of `generate_avc`) and
`run_demo_avatar_single_audio_to_video.py` (per-version fps, audio stride and sampling defaults),
written from a reading of that code, not copied.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NUM_TRAIN_TIMESTEPS = 1000
UNDISTILLED_SIGMA_MIN = 0.001  # non-distilled sigmas are linspace(1, 0.001, steps) before the shift
NUM_FRAMES = 93  # video frames per segment (24 latent frames)
NUM_COND_FRAMES = 13  # frames a continuation segment takes over from the previous one (4 latents)
REF_IMG_INDEX = 10  # RoPE time position of the reference latent in continuation
MASK_FRAME_RANGE = 3  # noisy frames within +-this of the reference position do not attend to it
MAX_SEQUENCE_LENGTH = 512  # umT5 tokens per prompt, padded
# enhance_hf (v1.0 continuation): keep the timesteps above 500, then 10 uniform steps 500 .. 50.
ENHANCE_HF_TAIL_START = 500.0
ENHANCE_HF_TAIL_STEPS = 10

DEFAULT_PROMPT = "A person is talking naturally with natural expressions and movements."
DEFAULT_NEGATIVE_PROMPT = (
    "Close-up, Bright tones, overexposed, static, blurred details, subtitles, style, works, "
    "paintings, images, static, overall gray, worst quality, low quality, "
    "JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
# AT2V sizes (height, width) per resolution.
AT2V_SIZES = {"480p": (480, 832), "720p": (768, 1280)}
# AI2V aspect buckets keyed by height/width: entries of the reference's ASPECT_RATIO_627 / _960
# tables (longcat_video/utils/bukcet_config.py) plus their transposes. The nearest key wins.
AI2V_BUCKETS = {
    "480p": {0.58: (480, 832), 0.95: (608, 640), 1.05: (640, 608), 1.73: (832, 480)},
    "720p": {
        0.54: (704, 1312),
        0.59: (736, 1248),
        1.0: (960, 960),
        1.7: (1248, 736),
        1.86: (1312, 704),
    },
}
# Per model generation, the pipeline config flags' defaults:
#   fps / audio_stride: output frame rate and audio feature frames per video frame;
#   steps / guidance / use_distill: default sampling (v1.5 ships distilled with the DMD LoRA);
#   num_distill_steps / distill_linspace_grid: the distilled sigma grid (see sampling_sigmas);
#   reuse_cond_latents: continuation takes the previous latents (True) or re-encodes its decoded
#       frames with the VAE (False, v1.5);
#   enhance_hf: continuation segments append the uniform low-noise tail (v1.0, not distilled).
VERSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "1.0": {
        "fps": 16,
        "audio_stride": 2,
        "steps": 50,
        "guidance": 4.0,
        "use_distill": False,
        "num_distill_steps": 50,
        "distill_linspace_grid": False,
        "reuse_cond_latents": True,
        "enhance_hf": True,
    },
    "1.5": {
        "fps": 25,
        "audio_stride": 1,
        "steps": 8,
        "guidance": 1.0,
        "use_distill": True,
        "num_distill_steps": 8,
        "distill_linspace_grid": True,
        "reuse_cond_latents": False,
        "enhance_hf": False,
    },
}


def prompt_clean(text: str) -> str:
    """The reference's prompt cleaning: ftfy, HTML unescaped twice, whitespace collapsed."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def guided_velocity(
    v_cond: torch.Tensor,
    v_uncond_text: torch.Tensor,
    v_uncond: torch.Tensor,
    text_guidance_scale: float,
    audio_guidance_scale: float,
) -> torch.Tensor:
    """Combine the 3 CFG predictions: v_u + s_t (v_c − v_ut) + s_a (v_ut − v_u)."""
    text_term = text_guidance_scale * (v_cond - v_uncond_text)
    return v_uncond + text_term + audio_guidance_scale * (v_uncond_text - v_uncond)


def sampling_sigmas(
    num_inference_steps: int,
    use_distill: bool,
    num_distill_steps: int = 8,
    distill_linspace_grid: bool = False,
) -> list[float]:
    """Unshifted sigmas, before the scheduler's shift.

    Not distilled: linspace(1, 0.001, steps). Distilled: `num_distill_steps` points every
    1000 / n training timesteps, from the top. With `distill_linspace_grid` (v1.5) the points are
    read off linspace(1, 0, 1000), so step k has sigma 1 - k * (1000 / n) / 999 (0.87487 rather
    than 0.875); otherwise they are multiples of 1/1000. Fewer steps take evenly spaced points.
    """
    if not use_distill:
        return torch.linspace(1.0, UNDISTILLED_SIGMA_MIN, num_inference_steps).tolist()
    offsets = torch.arange(num_distill_steps) * (NUM_TRAIN_TIMESTEPS // num_distill_steps)
    if distill_linspace_grid:
        grid = torch.linspace(0.0, 1.0, NUM_TRAIN_TIMESTEPS).flip(0)[offsets]
    else:
        grid = (NUM_TRAIN_TIMESTEPS - offsets).float() / NUM_TRAIN_TIMESTEPS
    picks = np.floor(np.linspace(0, num_distill_steps, num_inference_steps, endpoint=False))
    return grid[torch.from_numpy(picks.astype(np.int64))].tolist()


def enhance_hf_schedule(scheduler: Any) -> None:
    """Keep the scheduler's timesteps above 500 and append 10 uniform ones, 500 down to 50.

    Rewrites `scheduler.timesteps` and `scheduler.sigmas` (= timesteps / 1000, then 0) in place,
    as the reference's `generate_avc(enhance_hf=True)` does after `set_timesteps`.
    """
    timesteps = scheduler.timesteps
    tail = np.linspace(ENHANCE_HF_TAIL_START, 0.0, ENHANCE_HF_TAIL_STEPS, endpoint=False)
    tail = torch.tensor(tail, dtype=timesteps.dtype, device=timesteps.device)
    timesteps = torch.cat([timesteps[timesteps > ENHANCE_HF_TAIL_START], tail])
    scheduler.timesteps = timesteps
    scheduler.sigmas = torch.cat(
        [timesteps / NUM_TRAIN_TIMESTEPS, torch.zeros(1, device=timesteps.device)]
    )


@dataclass
class LongCatAvatarSegmentState:
    """What continuing after a finished segment needs; `save`/`load` it to resume a long video.

    Args:
        segments_done: number of finished segments (the next one to render).
        cond_latents: (B, C, T_cond, h, w) normalised conditioning latents of the next segment.
        ref_latent: (B, C, 1, h, w) normalised first latent of segment 1 (the identity anchor).
        generator_states: one `torch.Generator.get_state()` per sample, so a resumed run draws the
            same noise as an uninterrupted one.
    """

    segments_done: int
    cond_latents: torch.Tensor
    ref_latent: torch.Tensor
    generator_states: list[torch.Tensor] = field(default_factory=list)

    def save(self, path: str | Path) -> None:
        """Write the state to a safetensors file."""
        tensors = {"cond_latents": self.cond_latents, "ref_latent": self.ref_latent}
        tensors |= {f"generator_state.{i}": s for i, s in enumerate(self.generator_states)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"segments_done": str(self.segments_done)})

    @classmethod
    def load(cls, path: str | Path) -> LongCatAvatarSegmentState:
        """Read a state written by `save`."""
        with safe_open(str(path), framework="pt") as handle:
            segments_done = int(handle.metadata()["segments_done"])
        tensors = load_file(str(path))
        count = sum(k.startswith("generator_state.") for k in tensors)
        return cls(
            segments_done=segments_done,
            cond_latents=tensors["cond_latents"],
            ref_latent=tensors["ref_latent"],
            generator_states=[tensors[f"generator_state.{i}"] for i in range(count)],
        )
