"""LongCat-Video-Avatar as a diffusers pipeline: narration audio (+ text, + portrait) → video.

Reimplements LongCat-Video's pipeline_longcat_video_avatar.py (generate_at2v / generate_ai2v /
generate_avc) as one DiffusionPipeline: segment 1 is audio+text-to-video (AT2V) or, given an image,
image+audio-to-video (AI2V); every later segment continues in latent space from the last one
(13 conditioning frames + the reference latent). Model files may reach ~800 lines (STYLE.md).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Wav2Vec2Model

from model.audio_encoders import audio_windows, wav2vec2_features, whisper_features
from model.transformer_longcat_avatar import LongCatKVCache, LongCatVideoAvatarTransformer3DModel

DEFAULT_PROMPT = "A person is talking naturally with natural expressions and movements."
DEFAULT_NEGATIVE_PROMPT = (
    "Close-up, Bright tones, overexposed, static, blurred details, subtitles, style, works, "
    "paintings, images, static, overall gray, worst quality, low quality, "
    "JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
# AT2V sizes (height, width) per resolution (reference demo L85-88).
AT2V_SIZES = {"480p": (480, 832), "720p": (768, 1280)}
# AI2V aspect buckets keyed by height/width: the entries of the reference's ASPECT_RATIO_627 / _960
# tables that our notes list, plus their transposes. The nearest key to the image's h/w wins.
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
# Per model generation: output fps, audio feature frames per video frame, default sampling.
VERSION_DEFAULTS = {
    "1.0": {"fps": 16, "audio_stride": 2, "steps": 50, "guidance": 4.0, "distill": False},
    "1.5": {"fps": 25, "audio_stride": 1, "steps": 8, "guidance": 1.0, "distill": True},
}
NUM_TRAIN_TIMESTEPS = 1000
NUM_DISTILL_STEPS = 8  # the v1.5 DMD LoRA was distilled on an 8-point grid
_OUTPUT_TYPES = ("pt", "np", "pil", "latent")


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
        from safetensors import safe_open

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


@dataclass
class LongCatVideoAvatarPipelineOutput(BaseOutput):
    """Output of LongCatVideoAvatarPipeline.

    Args:
        frames: the video, batch-first: "pt" (B, F, C, H, W) in [0, 1], "np" (B, F, H, W, C),
            "pil" a list of frame lists, "latent" the denoised latents (B, C, T, h, w).
        state: the state after the last segment, to continue the video later.
    """

    frames: torch.Tensor | np.ndarray | list
    state: LongCatAvatarSegmentState | None = None


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


def sampling_sigmas(num_inference_steps: int, use_distill: bool) -> list[float]:
    """Return the unshifted sigmas: linspace(1, 0.001), or the v1.5 distilled 8-point grid."""
    if not use_distill:
        return np.linspace(1.0, 0.001, num_inference_steps).tolist()
    # Distilled grid: 1000, 875, ..., 125 (/1000); fewer steps take evenly spaced grid points.
    grid = np.arange(NUM_DISTILL_STEPS, 0, -1) * (NUM_TRAIN_TIMESTEPS // NUM_DISTILL_STEPS)
    picks = np.floor(np.linspace(0, NUM_DISTILL_STEPS, num_inference_steps, endpoint=False))
    return (grid[picks.astype(int)] / NUM_TRAIN_TIMESTEPS).tolist()


def _clean_prompt(text: str) -> str:
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def _as_list(value: Any, size: int) -> list:
    items = value if isinstance(value, list) else [value]
    return items * size if len(items) == 1 else items


class LongCatVideoAvatarPipeline(DiffusionPipeline):
    """Talking-avatar video from audio with LongCat-Video-Avatar (v1.0 or v1.5).

    Components:
        tokenizer (`T5Tokenizer`): umT5 tokenizer.
        text_encoder (`UMT5EncoderModel`): umT5-XXL encoder; its `last_hidden_state` is the caption.
        vae (`AutoencoderKLWan`): Wan 2.1 VAE (4x8x8 compression, 16 latent channels).
        scheduler (`FlowMatchEulerDiscreteScheduler`): flow-matching Euler; a copy runs each call.
        transformer (`LongCatVideoAvatarTransformer3DModel`): the avatar DiT.
        audio_encoder (`Wav2Vec2Model` for v1.0, `WhisperModel` for v1.5).
        audio_feature_extractor (`Wav2Vec2FeatureExtractor` or `WhisperFeatureExtractor`).
    Config: model_version ("1.0" | "1.5"), sample_size ([H, W] default size, e.g. for a tiny
    checkpoint), default_steps (default num_inference_steps).
    """

    model_cpu_offload_seq = "text_encoder->audio_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "audio_encoder", "audio_feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: PreTrainedModel | None,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: LongCatVideoAvatarTransformer3DModel,
        audio_encoder: PreTrainedModel | None = None,
        audio_feature_extractor: Any = None,
        model_version: str = "1.0",
        sample_size: list[int] | None = None,
        default_steps: int | None = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
            audio_encoder=audio_encoder,
            audio_feature_extractor=audio_feature_extractor,
        )
        self.register_to_config(
            model_version=model_version, sample_size=sample_size, default_steps=default_steps
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @property
    def fps(self) -> int:
        """Output frames per second (16 for v1.0, 25 for v1.5): baked into the audio windows."""
        return VERSION_DEFAULTS[self.config.model_version]["fps"]

    @property
    def audio_stride(self) -> int:
        """Audio feature frames per video frame (2 for wav2vec2 at 32 Hz, 1 for Whisper)."""
        return VERSION_DEFAULTS[self.config.model_version]["audio_stride"]

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True when either guidance scale exceeds 1 (3 passes per step instead of 1)."""
        return self._text_guidance_scale > 1.0 or self._audio_guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        """Denoising steps per segment in the current call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a step callback to stop after the current segment."""
        return self._interrupt

    def offload_text_encoder(self, device: str | torch.device = "cpu") -> None:
        """Move the text encoder off the accelerator after encoding (umT5-XXL is 11 GB)."""
        if self.text_encoder is not None:
            self.text_encoder.to(device)

    def num_segments_for(self, duration_s: float, num_frames: int = 93, num_cond: int = 13) -> int:
        """Segments needed to cover duration_s of audio: 1 + ceil((frames − 93) / 80)."""
        frames = int(np.ceil(duration_s * self.fps - 1e-6))
        return 1 + max(0, -(-(frames - num_frames) // (num_frames - num_cond)))

    def check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        audio: Any,
        audio_features: Any,
        height: int,
        width: int,
        num_frames: int,
        num_cond_frames: int,
        num_segments: int,
        output_type: str,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        resume_state: LongCatAvatarSegmentState | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> None:
        """Raise a ValueError naming the first invalid argument and its value."""
        if audio is None and audio_features is None:
            raise ValueError("audio is required (a 16 kHz waveform, or a list of them)")
        step = self.vae_scale_factor_spatial * 2  # VAE 8x, then the DiT's 2x2 patches
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be multiples of {step}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
        if not 1 <= num_cond_frames < num_frames or (num_cond_frames - 1) % 4:
            raise ValueError(
                f"num_cond_frames must be 4k+1 below num_frames, got {num_cond_frames}"
            )
        if num_segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is not None and not isinstance(prompt, str | list):
            raise ValueError(f"prompt must be a str or list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if resume_state is not None and resume_state.segments_done >= num_segments:
            done = resume_state.segments_done
            raise ValueError(f"resume_state has {done} segments done, num_segments={num_segments}")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs has unknown names {unknown}")

    def _text_embeds(
        self, prompt: list[str], max_sequence_length: int, device: torch.device
    ) -> torch.Tensor:
        inputs = self.tokenizer(
            [_clean_prompt(p) for p in prompt],
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        mask = inputs.attention_mask.to(device)
        embeds = self.text_encoder(inputs.input_ids.to(device), mask).last_hidden_state
        # Zero the padding so each sample depends only on its own tokens; the transformer's mask is
        # recovered from these zeros (see _attention_mask).
        return embeds * mask[..., None].to(embeds.dtype)

    def encode_prompt(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = True,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode text to (prompt_embeds, negative_prompt_embeds), each (B, 512, d_model)."""
        device = device or self._execution_device
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._text_embeds(prompt, max_sequence_length, device)
        batch_size = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative = _as_list(negative_prompt or DEFAULT_NEGATIVE_PROMPT, batch_size)
            if len(negative) != batch_size:
                raise ValueError(f"negative_prompt has {len(negative)} items for {batch_size}")
            negative_prompt_embeds = self._text_embeds(negative, max_sequence_length, device)
        dtype = dtype or prompt_embeds.dtype
        prompt_embeds = prompt_embeds.to(device, dtype).repeat_interleave(num_videos_per_prompt, 0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device, dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(
                num_videos_per_prompt, 0
            )
        return prompt_embeds, negative_prompt_embeds

    def encode_audio(
        self, audio: np.ndarray | torch.Tensor, duration_s: float | None = None
    ) -> torch.Tensor:
        """Encode one 16 kHz mono waveform to per-layer features (T, audio_block, audio_channel).

        The waveform is zero-padded to duration_s first, as the reference pads to the video length.
        """
        wave = np.asarray(audio.cpu() if isinstance(audio, torch.Tensor) else audio, np.float32)
        wave = wave.reshape(-1)
        if duration_s is not None:
            wave = np.pad(wave, (0, max(0, int(np.ceil(duration_s * 16_000)) - wave.size)))
        if self.audio_encoder is None or self.audio_feature_extractor is None:
            raise ValueError("audio_encoder is None: pass audio_features instead of audio")
        rate = self.fps * self.audio_stride
        if isinstance(self.audio_encoder, Wav2Vec2Model):
            return wav2vec2_features(
                self.audio_encoder, self.audio_feature_extractor, wave, feature_rate_hz=rate
            )
        return whisper_features(self.audio_encoder, self.audio_feature_extractor, wave, fps=rate)

    def prepare_latents(
        self,
        batch_size: int,
        num_latent_frames: int,
        height: int,
        width: int,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return (B, C, T_lat, h, w) float32 noise, or the given latents on device."""
        channels = self.transformer.config.in_channels
        shape = (
            batch_size,
            channels,
            num_latent_frames,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device, torch.float32)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"generator list has {len(generator)} items, batch size {batch_size}")
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _latent_stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = latents.shape[1]
        mean = torch.tensor(self.vae.config.latents_mean[:channels]).view(1, channels, 1, 1, 1)
        std = torch.tensor(self.vae.config.latents_std[:channels]).view(1, channels, 1, 1, 1)
        return mean.to(latents), std.to(latents)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """VAE-encode (B, 3, F, H, W) pixels in [-1, 1] to normalised latents (the mode)."""
        latents = self.vae.encode(video.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        mean, std = self._latent_stats(latents.float())
        return (latents.float() - mean) / std

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode normalised latents (B, C, T, h, w) to pixels (B, 3, F, H, W) in [-1, 1]."""
        mean, std = self._latent_stats(latents.float())
        latents = (latents.float() * std + mean).to(self.vae.device, self.vae.dtype)
        return self.vae.decode(latents, return_dict=False)[0].float()

    def resolve_size(
        self, height: int | None, width: int | None, resolution: str, image: Any = None
    ) -> tuple[int, int]:
        """Pick (height, width): explicit, else the checkpoint's sample_size, else the bucket."""
        if height is not None and width is not None:
            return height, width
        if self.config.sample_size:
            return tuple(self.config.sample_size)
        if resolution not in AT2V_SIZES:
            raise ValueError(f"resolution must be one of {sorted(AT2V_SIZES)}, got {resolution!r}")
        if image is None:
            return AT2V_SIZES[resolution]
        first = image[0] if isinstance(image, list) else image
        img_h, img_w = self.video_processor.get_default_height_width(first)
        buckets = AI2V_BUCKETS[resolution]
        return buckets[min(buckets, key=lambda key: abs(key - img_h / img_w))]

    def _image_latents(
        self, image: PipelineImageInput, num_prompts: int, per_prompt: int, height: int, width: int
    ) -> torch.Tensor:
        images = _as_list(image, num_prompts)
        if len(images) != num_prompts:
            raise ValueError(f"image has {len(images)} items for {num_prompts} prompts")
        pixels = [
            self.video_processor.preprocess(img, height, width, resize_mode="crop")
            for img in images
        ]
        video = torch.cat(pixels).unsqueeze(2)  # (B, 3, 1, H, W)
        return self.encode_video(video).repeat_interleave(per_prompt, dim=0)

    def _audio_embeds(
        self, features: list[torch.Tensor], num_frames: int, start_frame: int
    ) -> torch.Tensor:
        windows = [audio_windows(f, num_frames, self.audio_stride, start_frame) for f in features]
        return torch.stack(windows)  # (B, num_frames, 5, audio_block, audio_channel)

    @staticmethod
    def _attention_mask(embeds: torch.Tensor) -> torch.Tensor:
        return (embeds.abs().amax(dim=-1) > 0).long()  # padded positions were zeroed

    def _predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        audio_embeds: torch.Tensor,
        kv_cache: LongCatKVCache | None,
        transformer_kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """Run the DiT once (batched 3-pass CFG when enabled) and return the guided velocity."""
        dtype = self.transformer.dtype
        if self.do_classifier_free_guidance:
            latents, timestep = torch.cat([latents] * 3), torch.cat([timestep] * 3)
            text = torch.cat([prompt_embeds, negative_prompt_embeds, negative_prompt_embeds])
            audio = torch.cat([audio_embeds, audio_embeds, torch.zeros_like(audio_embeds)])
        else:
            text, audio = prompt_embeds, audio_embeds
        output = self.transformer(
            hidden_states=latents.to(dtype),
            timestep=timestep,
            encoder_hidden_states=text.to(dtype),
            audio_embeds=audio.to(dtype),
            encoder_attention_mask=self._attention_mask(text),
            kv_cache=kv_cache,
            return_dict=False,
            **transformer_kwargs,
        )[0].float()
        if not self.do_classifier_free_guidance:
            return output
        v_cond, v_uncond_text, v_uncond = output.chunk(3)
        return guided_velocity(
            v_cond, v_uncond_text, v_uncond, self._text_guidance_scale, self._audio_guidance_scale
        )

    def _kv_cache(
        self, ref_latent: torch.Tensor, cond_latents: torch.Tensor, ref_img_index: int
    ) -> LongCatKVCache:
        """Cache the reference + conditioning K/V once per segment, repeated for the CFG passes."""
        clean = torch.cat([ref_latent, cond_latents], dim=2).to(self.transformer.dtype)
        cache = self.transformer.build_kv_cache(
            clean, ref_latent.shape[2], cond_latents.shape[2], ref_img_index
        )
        if not self.do_classifier_free_guidance or ref_latent.shape[0] == 1:
            return cache  # the DiT broadcasts a batch-1 cache
        cache.keys = [torch.cat([k] * 3) for k in cache.keys]
        cache.values = [torch.cat([v] * 3) for v in cache.values]
        return cache

    def _generator_states(self, generator: Any) -> list[torch.Tensor]:
        generators = generator if isinstance(generator, list) else [generator]
        return [g.get_state() for g in generators if g is not None]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        audio: np.ndarray | torch.Tensor | list | None = None,
        image: PipelineImageInput | None = None,
        num_segments: int | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution: str = "480p",
        num_frames: int = 93,
        num_cond_frames: int = 13,
        num_inference_steps: int | None = None,
        text_guidance_scale: float | None = None,
        audio_guidance_scale: float | None = None,
        use_distill: bool | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        audio_features: torch.Tensor | list[torch.Tensor] | None = None,
        ref_img_index: int = 10,
        mask_frame_range: int = 3,
        output_type: str = "np",
        return_dict: bool = True,
        resume_state: LongCatAvatarSegmentState | None = None,
        segment_callback: Callable[..., None] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = 512,
    ) -> LongCatVideoAvatarPipelineOutput | tuple:
        r"""Generate a talking-avatar video of `num_segments` segments.

        Args:
            prompt / negative_prompt: scene text; defaults are the model's (fal's) prompts.
            audio: 16 kHz mono waveform (array or tensor), or one per prompt in a list.
            image: optional portrait (PIL, array or tensor, or a list): image+audio-to-video.
            num_segments: segments to render; default: enough to cover the audio. The first has
                `num_frames` (93) frames, each later one `num_frames - num_cond_frames` (80) more.
            height / width: explicit size (multiples of 16); otherwise the checkpoint's
                sample_size, else the `resolution` bucket ("480p" / "720p", AI2V by image aspect).
            num_inference_steps / text_guidance_scale / audio_guidance_scale / use_distill: default
                per model version (v1.0: 50, 4, 4, no; v1.5: 8, 1, 1, distilled sigmas).
            generator: one torch.Generator or one per video; fixed generators give identical output.
            latents: initial noise of the first segment (B, C, T_lat, h, w).
            prompt_embeds / negative_prompt_embeds / audio_features: precomputed encodings (from
                `encode_prompt` / `encode_audio`) instead of text / audio; no encoder is used then.
            ref_img_index / mask_frame_range: RoPE time index of the reference latent in
                continuation, and the ± window of noisy frames that skip attending to it.
            output_type: "pt" (B, F, C, H, W), "np" (B, F, H, W, C), "pil", or "latent".
            resume_state: continue a video after `resume_state.segments_done` segments; only the
                frames of the segments rendered by this call are returned.
            segment_callback: `fn(pipe, segment_index, state, frames)` after each segment, with
                that segment's new frames (B, 3, F_new, H, W) in [-1, 1], on CPU.
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`; tensors it
                returns replace the pipeline's from that step on.
        Returns:
            LongCatVideoAvatarPipelineOutput, or a tuple (frames, state) when return_dict=False.
        """
        defaults = VERSION_DEFAULTS[self.config.model_version]
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_inputs = callback_on_step_end.tensor_inputs
        height, width = self.resolve_size(height, width, resolution, image)
        features = None if audio_features is None else _as_list(audio_features, 1)
        if num_segments is None and audio is not None:
            waves = audio if isinstance(audio, list) else [audio]
            duration_s = max(np.asarray(w).reshape(-1).size for w in waves) / 16_000
            num_segments = self.num_segments_for(duration_s, num_frames, num_cond_frames)
        elif num_segments is None and features is not None:
            duration_s = max(f.shape[0] for f in features) / (self.fps * self.audio_stride)
            num_segments = self.num_segments_for(duration_s, num_frames, num_cond_frames)

        # 1. Check inputs
        self.check_inputs(
            prompt,
            negative_prompt,
            audio,
            audio_features,
            height,
            width,
            num_frames,
            num_cond_frames,
            num_segments,
            output_type,
            prompt_embeds,
            negative_prompt_embeds,
            resume_state,
            callback_inputs,
        )
        text_scale, audio_scale = text_guidance_scale, audio_guidance_scale
        self._text_guidance_scale = defaults["guidance"] if text_scale is None else text_scale
        self._audio_guidance_scale = defaults["guidance"] if audio_scale is None else audio_scale
        steps = num_inference_steps or self.config.default_steps or defaults["steps"]
        use_distill = defaults["distill"] if use_distill is None else use_distill
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the prompt
        if prompt is None and prompt_embeds is None:
            prompt = DEFAULT_PROMPT
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            self.do_classifier_free_guidance,
            num_videos_per_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            max_sequence_length,
            device,
        )
        batch_size = prompt_embeds.shape[0]

        # 3. Encode the audio over the whole video (zero-padded to its length)
        new_frames = num_frames - num_cond_frames
        total_frames = num_frames + new_frames * (num_segments - 1)
        if features is None:
            waves = _as_list(audio, batch_size // num_videos_per_prompt)
            features = [self.encode_audio(w, total_frames / self.fps) for w in waves]
        features = [f.to(device) for f in _as_list(features, batch_size // num_videos_per_prompt)]
        features = [f for f in features for _ in range(num_videos_per_prompt)]
        if len(features) != batch_size:
            raise ValueError(f"audio has {len(features)} items for batch size {batch_size}")

        # 4. Reference / conditioning latents: a resumed state, else the portrait for AI2V
        num_latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        num_cond_latents = (num_cond_frames - 1) // self.vae_scale_factor_temporal + 1
        first_segment = 0
        ref_latent = cond_latents = None
        if resume_state is not None:
            first_segment = resume_state.segments_done
            ref_latent = resume_state.ref_latent.to(device, torch.float32)
            cond_latents = resume_state.cond_latents.to(device, torch.float32)
            generators = generator if isinstance(generator, list) else [generator]
            for gen, gen_state in zip(generators, resume_state.generator_states, strict=False):
                gen.set_state(gen_state)
        elif image is not None:
            cond_latents = self._image_latents(
                image, batch_size // num_videos_per_prompt, num_videos_per_prompt, height, width
            ).to(device)

        # 5. Timesteps: the checkpoint's shift applied to linspace(1, 0.001) or distilled sigmas
        sigmas = sampling_sigmas(steps, use_distill)
        self._num_timesteps = steps

        # 6. Segment loop: denoise, decode, hand over the conditioning to the next segment
        outputs, state = [], resume_state
        for segment in range(first_segment, num_segments):
            if self.interrupt and outputs:
                break  # a callback asked to stop: keep the finished segments
            # 6a. Noise; conditioning latents (portrait or previous segment) at the front, clean
            latents = self.prepare_latents(
                batch_size,
                num_latent_frames,
                height,
                width,
                device,
                generator,
                latents if segment == 0 else None,
            )
            n_cond = 0 if cond_latents is None else cond_latents.shape[2]
            if n_cond:
                latents[:, :, :n_cond] = cond_latents
            start_frame = 0 if segment == 0 else segment * new_frames
            audio_embeds = self._audio_embeds(features, num_frames, start_frame)
            # Continuation caches the reference + conditioning K/V once; AI2V runs them inline.
            kv_cache = None
            transformer_kwargs: dict[str, Any] = {"num_cond_latents": n_cond}
            if segment > 0:
                kv_cache = self._kv_cache(ref_latent, cond_latents, ref_img_index)
                transformer_kwargs |= {
                    "num_ref_latents": ref_latent.shape[2],
                    "ref_img_index": ref_img_index,
                    "mask_frame_range": mask_frame_range,
                }
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
            scheduler.set_timesteps(sigmas=sigmas, device=device)

            # 6b. Denoising loop
            with self.progress_bar(total=len(scheduler.timesteps)) as progress_bar:
                for i, t in enumerate(scheduler.timesteps):
                    if self.interrupt:
                        continue
                    model_input = latents[:, :, n_cond:] if kv_cache is not None else latents
                    timestep = t.expand(batch_size, model_input.shape[2]).clone()
                    if kv_cache is None:
                        timestep[:, :n_cond] = 0  # clean conditioning frames
                    velocity = self._predict_velocity(
                        model_input,
                        timestep,
                        prompt_embeds,
                        negative_prompt_embeds,
                        audio_embeds,
                        kv_cache,
                        transformer_kwargs,
                    )
                    if kv_cache is None:
                        velocity = velocity[:, :, n_cond:]
                    # The DiT predicts x0 − noise; the scheduler steps along noise − x0.
                    noisy = scheduler.step(-velocity, t, latents[:, :, n_cond:], return_dict=False)
                    latents = torch.cat([latents[:, :, :n_cond], noisy[0]], dim=2)
                    if callback_on_step_end is not None:
                        tensors = {
                            "latents": latents,
                            "prompt_embeds": prompt_embeds,
                            "negative_prompt_embeds": negative_prompt_embeds,
                        }
                        callback_kwargs = {k: tensors[k] for k in callback_inputs}
                        returned = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        latents = returned.pop("latents", latents)
                        prompt_embeds = returned.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = returned.pop(
                            "negative_prompt_embeds", negative_prompt_embeds
                        )
                    progress_bar.update()

            # 6c. Decode this segment; keep only its new frames after the first segment
            skip_frames = 0 if segment == 0 else num_cond_frames
            needs_pixels = (
                output_type != "latent"
                or segment_callback is not None
                or self.config.model_version == "1.5"
            )
            video = self.decode_latents(latents) if needs_pixels else None
            if segment == 0:
                ref_latent = latents[:, :, :1].clone()
            if self.config.model_version == "1.5":
                # v1.5 re-encodes the last decoded frames instead of reusing their latents.
                cond_latents = self.encode_video(video[:, :, -num_cond_frames:]).to(device)
            else:
                cond_latents = latents[:, :, -num_cond_latents:].clone()
            state = LongCatAvatarSegmentState(
                segment + 1, cond_latents, ref_latent, self._generator_states(generator)
            )
            new_video = None if video is None else video[:, :, skip_frames:].cpu()
            if segment_callback is not None:
                segment_callback(self, segment, state, new_video)
            skip_latents = 0 if segment == 0 else num_cond_latents
            outputs.append(latents[:, :, skip_latents:] if output_type == "latent" else new_video)

        # 7. Post-process
        if output_type == "latent":
            frames = torch.cat(outputs, dim=2)
        else:
            frames = self.video_processor.postprocess_video(torch.cat(outputs, dim=2), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, state)
        return LongCatVideoAvatarPipelineOutput(frames=frames, state=state)
