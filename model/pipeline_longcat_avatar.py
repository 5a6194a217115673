"""LongCat-Video-Avatar as a diffusers pipeline: narration audio (+ text, + portrait) → video.

Reimplements meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794,
`longcat_video/pipeline_longcat_video_avatar.py` (`generate_at2v`, `generate_ai2v`,
`generate_avc`) and the segment loop of `run_demo_avatar_single_audio_to_video.py` as one
DiffusionPipeline, written from a reading of that code, not copied: segment 1 is audio+text-to-video
(AT2V) or, given an image, image+audio-to-video (AI2V); every later segment continues from the last
one (13 conditioning frames + the reference latent). Version differences (v1.0 / v1.5) are config
flags (see VERSION_DEFAULTS). Like diffusers' Wan pipelines this file may run to ~800 lines.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Wav2Vec2Model

from avatarflow.model.audio_encoders import (
    SAMPLE_RATE_HZ,
    audio_windows,
    wav2vec2_features,
    whisper_features,
)
from avatarflow.model.pipeline_helpers_longcat_avatar import (
    AI2V_BUCKETS,
    AT2V_SIZES,
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    MASK_FRAME_RANGE,
    MAX_SEQUENCE_LENGTH,
    NUM_COND_FRAMES,
    NUM_FRAMES,
    REF_IMG_INDEX,
    VERSION_DEFAULTS,
    LongCatAvatarSegmentState,
    enhance_hf_schedule,
    guided_velocity,
    prompt_clean,
    sampling_sigmas,
)
from avatarflow.model.transformer_longcat_avatar import (
    LongCatKVCache,
    LongCatVideoAvatarTransformer3DModel,
)

__all__ = [
    "AI2V_BUCKETS",
    "AT2V_SIZES",
    "VERSION_DEFAULTS",
    "LongCatAvatarSegmentState",
    "LongCatVideoAvatarPipeline",
    "LongCatVideoAvatarPipelineOutput",
    "guided_velocity",
    "sampling_sigmas",
]

_OUTPUT_TYPES = ("pt", "np", "pil", "latent")
# The config flags a model version sets; `None` in __init__ takes the version's default.
_VERSION_FLAGS = (
    "fps",
    "audio_stride",
    "use_distill",
    "num_distill_steps",
    "distill_linspace_grid",
    "reuse_cond_latents",
    "enhance_hf",
)

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import numpy as np
        >>> import torch
        >>> from model import load_pipeline, write_tiny_checkpoint

        >>> # Real weights: load_pipeline("/models/longcat") (official folders, no downloads).
        >>> pipe = load_pipeline(write_tiny_checkpoint("/tmp/longcat-tiny"))
        >>> pipe.set_progress_bar_config(disable=True)
        >>> speech = np.zeros(16_000, dtype=np.float32)  # 1 s of 16 kHz mono narration
        >>> out = pipe(
        ...     prompt="A woman talks to the camera in a bright kitchen.",
        ...     audio=speech,
        ...     guidance_scale=4.0,  # text CFG; audio_guidance_scale is the audio CFG
        ...     generator=torch.Generator().manual_seed(0),
        ...     output_type="np",
        ... )
        >>> out.frames.shape  # (batch, frames, height, width, 3) at pipe.fps
        (1, 93, 32, 32, 3)
        ```
"""


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


def _as_list(value: Any, size: int) -> list:
    items = value if isinstance(value, list) else [value]
    return items * size if len(items) == 1 else items


class LongCatVideoAvatarPipeline(DiffusionPipeline):
    """Talking-avatar video from audio with LongCat-Video-Avatar (v1.0 or v1.5).

    Components:
        tokenizer (`T5Tokenizer`): umT5 tokenizer.
        text_encoder (`UMT5EncoderModel`): umT5-XXL encoder; its `last_hidden_state` is the caption.
        vae (`AutoencoderKLWan`): Wan 2.1 VAE (4x8x8 compression, 16 latent channels).
        scheduler (`FlowMatchEulerDiscreteScheduler`): flow-matching Euler. Each call runs on its
            own copy of `self.scheduler`, so a swapped scheduler (class or config) is what samples
            and concurrent calls never share its step state.
        transformer (`LongCatVideoAvatarTransformer3DModel`): the avatar DiT.
        audio_encoder (`Wav2Vec2Model` for v1.0, `WhisperModel` for v1.5).
        audio_feature_extractor (`Wav2Vec2FeatureExtractor` or `WhisperFeatureExtractor`).
    Config: model_version ("1.0" | "1.5"), sample_size ([H, W] default size, e.g. for a tiny
    checkpoint), default_steps (default num_inference_steps), default_guidance_scale, and the
    version flags (fps, audio_stride, use_distill, num_distill_steps, distill_linspace_grid,
    reuse_cond_latents, enhance_hf), each defaulting to the model version's value in
    VERSION_DEFAULTS.
    """

    model_cpu_offload_seq = "text_encoder->audio_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder", "audio_encoder", "audio_feature_extractor"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        text_encoder: PreTrainedModel | None,
        vae: AutoencoderKLWan,
        scheduler: SchedulerMixin,
        transformer: LongCatVideoAvatarTransformer3DModel,
        audio_encoder: PreTrainedModel | None = None,
        audio_feature_extractor: Any = None,
        model_version: str = "1.0",
        sample_size: list[int] | None = None,
        default_steps: int | None = None,
        default_guidance_scale: float | None = None,
        fps: int | None = None,
        audio_stride: int | None = None,
        use_distill: bool | None = None,
        num_distill_steps: int | None = None,
        distill_linspace_grid: bool | None = None,
        reuse_cond_latents: bool | None = None,
        enhance_hf: bool | None = None,
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
        if model_version not in VERSION_DEFAULTS:
            raise ValueError(f"model_version must be one of {sorted(VERSION_DEFAULTS)}")
        version = VERSION_DEFAULTS[model_version]
        given = {
            "fps": fps,
            "audio_stride": audio_stride,
            "use_distill": use_distill,
            "num_distill_steps": num_distill_steps,
            "distill_linspace_grid": distill_linspace_grid,
            "reuse_cond_latents": reuse_cond_latents,
            "enhance_hf": enhance_hf,
        }
        flags = {k: version[k] if given[k] is None else given[k] for k in _VERSION_FLAGS}
        if default_guidance_scale is None:
            default_guidance_scale = version["guidance"]
        self.register_to_config(
            model_version=model_version,
            sample_size=sample_size,
            default_steps=default_steps,
            default_guidance_scale=default_guidance_scale,
            **flags,
        )
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @property
    def fps(self) -> int:
        """Output frames per second (16 for v1.0, 25 for v1.5): baked into the audio windows."""
        return int(self.config.fps)

    @property
    def audio_stride(self) -> int:
        """Audio feature frames per video frame (2 for wav2vec2 at 32 Hz, 1 for Whisper)."""
        return int(self.config.audio_stride)

    @property
    def guidance_scale(self) -> float:
        """Text classifier-free guidance scale of the current call."""
        return self._guidance_scale

    @property
    def text_guidance_scale(self) -> float:
        """The reference's name for `guidance_scale`."""
        return self._guidance_scale

    @property
    def audio_guidance_scale(self) -> float:
        """Audio classifier-free guidance scale of the current call."""
        return self._audio_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """True when either guidance scale exceeds 1 (3 passes per step instead of 1)."""
        return self._guidance_scale > 1.0 or self._audio_guidance_scale > 1.0

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        """`attention_kwargs` of the current call, passed to every attention processor."""
        return self._attention_kwargs

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

    def num_segments_for(
        self, duration_s: float, num_frames: int = NUM_FRAMES, num_cond: int = NUM_COND_FRAMES
    ) -> int:
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
            raise ValueError(f"audio is required (a {SAMPLE_RATE_HZ} Hz waveform, or a list)")
        step = self.vae_scale_factor_spatial * 2  # VAE 8x, then the DiT's 2x2 patches
        if height % step or width % step or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be multiples of {step}, got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
        temporal = self.vae_scale_factor_temporal
        if not 1 <= num_cond_frames < num_frames or (num_cond_frames - 1) % temporal:
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
            [prompt_clean(p) for p in prompt],
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
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
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
            padded = int(np.ceil(duration_s * SAMPLE_RATE_HZ))
            wave = np.pad(wave, (0, max(0, padded - wave.size)))
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
            attention_kwargs=self._attention_kwargs,
            return_dict=False,
            **transformer_kwargs,
        )[0].float()
        if not self.do_classifier_free_guidance:
            return output
        v_cond, v_uncond_text, v_uncond = output.chunk(3)
        return guided_velocity(
            v_cond, v_uncond_text, v_uncond, self._guidance_scale, self._audio_guidance_scale
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

    def _set_timesteps(
        self, scheduler: SchedulerMixin, sigmas: list[float], enhance_hf: bool, device: Any
    ) -> None:
        """Set the call's scheduler copy to these (unshifted) sigmas, plus the enhance_hf tail."""
        if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
            raise ValueError(
                f"{type(scheduler).__name__}.set_timesteps takes no sigmas; LongCat-Video-Avatar "
                "samples on explicit flow-matching sigmas (use a flow-matching scheduler)"
            )
        scheduler.set_timesteps(sigmas=sigmas, device=device)
        if enhance_hf:
            enhance_hf_schedule(scheduler)

    def _resolve_guidance(
        self, guidance_scale: float | None, text_guidance_scale: float | None
    ) -> float:
        both = guidance_scale is not None and text_guidance_scale is not None
        if both and guidance_scale != text_guidance_scale:
            raise ValueError(
                f"guidance_scale={guidance_scale} and its alias text_guidance_scale="
                f"{text_guidance_scale} disagree; pass one of them"
            )
        scale = guidance_scale if guidance_scale is not None else text_guidance_scale
        return float(self.config.default_guidance_scale if scale is None else scale)

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
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
        num_frames: int = NUM_FRAMES,
        num_cond_frames: int = NUM_COND_FRAMES,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        audio_guidance_scale: float | None = None,
        use_distill: bool | None = None,
        enhance_hf: bool | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        audio_features: torch.Tensor | list[torch.Tensor] | None = None,
        ref_img_index: int = REF_IMG_INDEX,
        mask_frame_range: int = MASK_FRAME_RANGE,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        resume_state: LongCatAvatarSegmentState | None = None,
        segment_callback: Callable[..., None] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        text_guidance_scale: float | None = None,
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
            num_inference_steps: default per model version (v1.0: 50; v1.5: 8).
            guidance_scale: text classifier-free guidance scale (`text_guidance_scale` is an
                alias); with audio_guidance_scale, CFG runs when either exceeds 1. Default per
                version (v1.0: 4, 4; v1.5: 1, 1).
            use_distill: sample on the distilled sigma grid (default: v1.5 yes, v1.0 no).
            enhance_hf: continuation segments keep the timesteps above 500 and add 10 uniform
                low-noise steps (default: on for v1.0 when not distilled, as the reference demo).
            generator: one torch.Generator or one per video; fixed generators give identical output.
            latents: initial noise of the first segment (B, C, T_lat, h, w).
            prompt_embeds / negative_prompt_embeds / audio_features: precomputed encodings (from
                `encode_prompt` / `encode_audio`) instead of text / audio; no encoder is used then.
            ref_img_index / mask_frame_range: RoPE time index of the reference latent in
                continuation, and the ± window of noisy frames that skip attending to it.
            output_type: "pt" (B, F, C, H, W), "np" (B, F, H, W, C), "pil", or "latent".
            attention_kwargs: passed to every attention processor of the transformer.
            resume_state: continue a video after `resume_state.segments_done` segments; only the
                frames of the segments rendered by this call are returned.
            segment_callback: `fn(pipe, segment_index, state, frames)` after each segment, with
                that segment's new frames (B, 3, F_new, H, W) in [-1, 1], on CPU.
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`; tensors it
                returns replace the pipeline's from that step on.

        Examples:

        Returns:
            LongCatVideoAvatarPipelineOutput, or a tuple (frames, state) when return_dict=False.
        """
        callback_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_inputs = callback_on_step_end.tensor_inputs
        height, width = self.resolve_size(height, width, resolution, image)
        features = None if audio_features is None else _as_list(audio_features, 1)
        if num_segments is None and audio is not None:
            waves = audio if isinstance(audio, list) else [audio]
            duration_s = max(np.asarray(w).reshape(-1).size for w in waves) / SAMPLE_RATE_HZ
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
        self._guidance_scale = self._resolve_guidance(guidance_scale, text_guidance_scale)
        self._audio_guidance_scale = float(
            self.config.default_guidance_scale
            if audio_guidance_scale is None
            else audio_guidance_scale
        )
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        use_distill = self.config.use_distill if use_distill is None else use_distill
        if enhance_hf and use_distill:
            raise ValueError("enhance_hf and use_distill cannot both be True (as in the reference)")
        enhance_hf = (
            self.config.enhance_hf and not use_distill if enhance_hf is None else enhance_hf
        )
        steps = num_inference_steps or self.config.default_steps
        steps = steps or VERSION_DEFAULTS[self.config.model_version]["steps"]
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
        temporal = self.vae_scale_factor_temporal
        num_latent_frames = (num_frames - 1) // temporal + 1
        num_cond_latents = (num_cond_frames - 1) // temporal + 1
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

        # 5. Timesteps: this call's copy of self.scheduler, shifted linspace or distilled sigmas
        scheduler = copy.deepcopy(self.scheduler)
        sigmas = sampling_sigmas(
            steps, use_distill, self.config.num_distill_steps, self.config.distill_linspace_grid
        )

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
            self._set_timesteps(scheduler, sigmas, enhance_hf and segment > 0, device)
            self._num_timesteps = len(scheduler.timesteps)

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
            reencode = not self.config.reuse_cond_latents
            needs_pixels = output_type != "latent" or segment_callback is not None or reencode
            video = self.decode_latents(latents) if needs_pixels else None
            if segment == 0:
                ref_latent = latents[:, :, :1].clone()
            if reencode:  # the last decoded frames go back through the VAE
                cond_latents = self.encode_video(video[:, :, -num_cond_frames:]).to(device)
            else:  # the last latents carry over as they are
                cond_latents = latents[:, :, -num_cond_latents:].clone()
            state = LongCatAvatarSegmentState(
                segment + 1, cond_latents, ref_latent, self._generator_states(generator)
            )
            skip_frames = 0 if segment == 0 else num_cond_frames
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
