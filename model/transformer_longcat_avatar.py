"""LongCat-Video-Avatar diffusion transformer (DiT): embedders, blocks, final layer, the model.

Reimplements meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794,
`longcat_video/modules/avatar/longcat_video_dit_avatar.py` (`LongCatVideoAvatarTransformer3DModel`,
`LongCatAvatarSingleStreamBlock`) and the pieces it imports from `longcat_video/modules/blocks.py`
(`PatchEmbed3D`, `TimestepEmbedder`, `CaptionEmbedder`, `FeedForwardSwiGLU`, `FinalLayer_FP32`) and
`longcat_video/modules/avatar/blocks.py` (`AudioProjModel`), written from a reading of that code,
not copied. Attention lives in model/attention_longcat_avatar.py. `from_pretrained` loads the
official `avatar_single/` (v1.0) and `base_model/` (v1.5) folders; docs/model.md lists the
behaviours that must match the reference and the tests that pin them.

Precision follows the reference's fp32 autocast regions the diffusers way: the timestep embedder,
every adaLN modulation, the pre-cross-attention LayerNorms and the final layer are
`_keep_in_fp32_modules` (kept fp32 by `from_pretrained` and model/loading.py, skipped by layerwise
casting) and are fed fp32 inputs; everything else runs in the weight dtype.

Tokens are ordered [reference latent][conditioning latents][noisy latents], frame-major, with
S = H/2 * W/2 tokens per latent frame.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from avatarflow.model.attention_longcat_avatar import (
    NORM_EPS,
    FrameLayout,
    LongCatAudioCrossAttention,
    LongCatKVCache,
    LongCatSelfAttention,
    LongCatTextCrossAttention,
    frame_layout,
    rope_tables,
)

AUDIO_PROJNORM_EPS = 1e-5  # the audio projection's final LayerNorm (nn.LayerNorm default)
FFN_MULTIPLE_OF = 256  # SwiGLU hidden size rounds up to a multiple of this (16384 * 2/3 -> 11008)
TIMESTEP_MAX_PERIOD = 10000


def _in_dtype_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x cast to the dtype of module's first parameter (fp32 for the kept-fp32 modules)."""
    return x.to(next(module.parameters()).dtype)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) then x * (1 + scale) + shift, all in fp32, rounded once to x.dtype.

    x: [B, T, S, C]; shift, scale: [B, T, 1, C] fp32 (one modulation per latent frame).
    """
    h = F.layer_norm(x.float(), x.shape[-1:], eps=NORM_EPS)
    return torch.addcmul(shift, h, 1 + scale).to(x.dtype)


def _add_(x: torch.Tensor, delta: torch.Tensor, start_frame: int = 0) -> torch.Tensor:
    """x[:, start_frame:] += delta, computed in the wider dtype and rounded once to x.dtype.

    x: [B, T, S, C]. In place (no copy of the residual stream) unless autograd is recording.
    """
    if torch.is_grad_enabled():
        tail = (x[:, start_frame:] + delta).to(x.dtype)
        return tail if start_frame == 0 else torch.cat([x[:, :start_frame], tail], dim=1)
    x[:, start_frame:].add_(delta)
    return x


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: [B, C, T, H, W] -> [B, T*H/ph*W/pw, hidden]."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, hidden, T, h, w] -> [B, N, hidden]


class TimestepEmbedder(nn.Module):
    """Sinusoid [cos | sin] of sigma * 1000 -> MLP (`TimestepEmbedder`); a kept-fp32 module."""

    def __init__(self, t_embed_dim: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, t_embed_dim),
            nn.SiLU(),
            nn.Linear(t_embed_dim, t_embed_dim),
        )

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
        """[..., dim] fp32 embedding [cos | sin] of t at frequencies 10000^(-i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(TIMESTEP_MAX_PERIOD)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / half
        )
        args = t.float()[..., None] * freqs  # [..., half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, 1)) if dim % 2 else emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t, self.frequency_embedding_size)
        return self.mlp(_in_dtype_of(self.mlp, emb)).float()


class CaptionEmbedder(nn.Module):
    """Text encoder states -> hidden size: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.y_proj = nn.Sequential(
            nn.Linear(in_channels, hidden_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.y_proj(caption)


class AudioProjModel(nn.Module):
    """Windowed audio features -> `context_tokens` tokens per latent frame (`AudioProjModel`).

    The first latent frame sees its video frame's full window (`proj1`); every later latent covers
    `vae_scale` video frames and sees the first frame's window slots [0, mid], the middle frames'
    centre slot and the last frame's slots [mid, window) (`proj1_vf`, window + vae_scale - 1 slots).
    """

    def __init__(
        self,
        window: int,
        vae_scale: int,
        blocks: int,
        channels: int,
        intermediate_dim: int,
        output_dim: int,
        context_tokens: int,
    ) -> None:
        super().__init__()
        self.window, self.vae_scale = window, vae_scale
        self.context_tokens, self.output_dim = context_tokens, output_dim
        self.proj1 = nn.Linear(window * blocks * channels, intermediate_dim)
        self.proj1_vf = nn.Linear((window + vae_scale - 1) * blocks * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, context_tokens * output_dim)
        self.norm = nn.LayerNorm(output_dim, eps=AUDIO_PROJNORM_EPS)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio: [B, 1 + vae_scale*k, window, blocks, channels] -> [B, 1 + k, ctx, out]."""
        mid = self.window // 2
        first = audio[:, 0].flatten(1)  # [B, window*blocks*channels]
        # [B, k, vae_scale, window, blocks, ch]: one group of video frames per later latent
        later = audio[:, 1:].unflatten(1, (-1, self.vae_scale))
        later = torch.cat(
            [
                later[:, :, 0, : mid + 1],  # first video frame of the group: slots 0..mid
                later[:, :, 1:-1, mid],  # middle frames: centre slot only
                later[:, :, -1, mid:],  # last frame: slots mid..window-1
            ],
            dim=2,
        )  # [B, k, window + vae_scale - 1, blocks, ch]
        later = later.flatten(2)  # flattened as (slot, block, channel)
        h = torch.cat([F.relu(self.proj1(first))[:, None], F.relu(self.proj1_vf(later))], dim=1)
        h = self.proj3(F.relu(self.proj2(h)))  # [B, 1 + k, ctx*out]
        return self.norm(h.unflatten(-1, (self.context_tokens, self.output_dim)))


class FeedForwardSwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases; hidden 2/3 * mlp_ratio * dim, rounded up to 256."""

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = FFN_MULTIPLE_OF) -> None:
        super().__init__()
        hidden_dim = int(2 * hidden_dim / 3)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)  # 16384 -> 11008
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        h = F.silu(self.w1(x), inplace=True)  # [B, N, hidden]: the largest activation, so reuse it
        return self.w2(h.mul_(self.w3(x)))


# --------------------------------------------------------------------------------------------------
# Transformer block and final layer
# --------------------------------------------------------------------------------------------------


class LongCatAvatarSingleStreamBlock(nn.Module):
    """adaLN self-attention -> text cross-attention -> gated audio cross-attention -> adaLN FFN.

    Modulation is per latent frame (t: [B, T, adaln]), chunked shift, scale, gate.
    Reference and conditioning latents get no text or audio cross-attention.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        adaln_tembed_dim: int,
        audio_dim: int,
        audio_prenorm: bool = False,
    ) -> None:
        super().__init__()
        # Registration order follows the official module: state_dict() keys in checkpoint order.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(adaln_tembed_dim, 6 * hidden_size)
        )
        self.audio_adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(adaln_tembed_dim, 3 * hidden_size)
        )
        self.pre_crs_attn_norm = FP32LayerNorm(hidden_size, eps=NORM_EPS)
        self.pre_video_crs_attn_norm = FP32LayerNorm(hidden_size, eps=NORM_EPS)
        if audio_prenorm:  # not in the shipped checkpoints (audio_prenorm: false)
            self.pre_audio_crs_attn_norm = FP32LayerNorm(audio_dim, eps=NORM_EPS)
        self.attn = LongCatSelfAttention(hidden_size, num_heads)
        self.cross_attn = LongCatTextCrossAttention(hidden_size, num_heads)
        self.audio_cross_attn = LongCatAudioCrossAttention(hidden_size, audio_dim, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, int(hidden_size * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,  # [B, N, C], N = T * S
        t: torch.Tensor,  # [B, T, adaln] fp32
        y: torch.Tensor | None,  # [B, L, C] caption tokens; None skips both cross-attentions
        text_lengths: list[int] | None,  # real caption tokens per sample; None: all L
        audio: torch.Tensor | None,  # [B, T_noisy, ctx, audio_dim]
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: FrameLayout,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = x.shape
        T = t.shape[1]
        mod = self.adaLN_modulation(_in_dtype_of(self.adaLN_modulation, t)).float().unsqueeze(2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x.view(B, T, -1, C)  # [B, T, S, C]

        h = _modulate(x, shift_msa, scale_msa).flatten(1, 2)  # [B, N, C]
        attn_out, kv = self.attn(h, rope, layout, kv_cache, attention_kwargs)
        x = _add_(x, gate_msa * attn_out.view(B, T, -1, C))

        ctx = layout.num_ctx_in_input  # frames that skip cross-attention
        if y is not None and ctx < T:
            x_noisy = x[:, ctx:].flatten(1, 2)  # [B, N_noisy, C]
            x_noisy = self.pre_crs_attn_norm(x_noisy)
            text_out = self.cross_attn(x_noisy, y, text_lengths, attention_kwargs)
            x = _add_(x, text_out.view(B, T - ctx, -1, C), start_frame=ctx)

            t_audio = _in_dtype_of(self.audio_adaLN_modulation, t[:, ctx:])
            audio_mod = self.audio_adaLN_modulation(t_audio).float()
            a_shift, a_scale, a_gate = audio_mod.unsqueeze(2).chunk(3, dim=-1)  # [B, T', 1, C]
            if hasattr(self, "pre_audio_crs_attn_norm"):
                audio = self.pre_audio_crs_attn_norm(audio)
            x_noisy = self.pre_video_crs_attn_norm(x[:, ctx:])
            a = self.audio_cross_attn(x_noisy, audio, attention_kwargs)
            x = _add_(x, a_gate * _modulate(a, a_shift, a_scale), start_frame=ctx)

        h = _modulate(x, shift_mlp, scale_mlp)  # [B, T, S, C]
        x = _add_(x, gate_mlp * self.ffn(h))
        return x.view(B, N, C), kv


class FinalLayer(nn.Module):
    """Per-frame adaLN (chunks shift, scale) then Linear to patch pixels (`FinalLayer_FP32`)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C]; t: [B, T, adaln] fp32 -> [B, N, num_patch * out_channels] fp32."""
        B, N, C = x.shape
        mod = self.adaLN_modulation(_in_dtype_of(self, t)).float().unsqueeze(2)  # [B, T, 1, 2C]
        shift, scale = mod.chunk(2, dim=-1)  # shift first: the reverse of AdaLayerNormContinuous
        h = F.layer_norm(x.float().view(B, t.shape[1], -1, C), (C,), eps=NORM_EPS)
        h = torch.addcmul(shift, h, 1 + scale).view(B, N, C)
        return self.linear(_in_dtype_of(self, h)).float()


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class LongCatVideoAvatarTransformer3DModel(ModelMixin, ConfigMixin, AttentionMixin):
    """The LongCat-Video-Avatar DiT: 15,871,660,096 parameters (v1.0), 15,852,916,800 (v1.5).

    Config keys that only pick attention kernels or context parallelism in the reference
    (`enable_flashattn2/3`, `enable_xformers`, `enable_bsa`, `bsa_params`, `cp_split_hw`) and the
    multi-speaker L-RoPE range (`class_range`, `class_interval`) are accepted and ignored: the
    kernel is chosen with `set_attention_backend`.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatAvatarSingleStreamBlock"]
    _repeated_blocks = ["LongCatAvatarSingleStreamBlock"]
    # The reference computes these under an fp32 autocast; names match module path components.
    _keep_in_fp32_modules = [
        "t_embedder",
        "adaLN_modulation",
        "audio_adaLN_modulation",
        "pre_crs_attn_norm",
        "pre_video_crs_attn_norm",
        "final_layer",
    ]
    _skip_layerwise_casting_patterns = ["x_embedder", "t_embedder", "norm", "adaLN_modulation"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: int = 16,
        hidden_size: int = 4096,
        depth: int = 48,
        num_heads: int = 32,
        caption_channels: int = 4096,
        mlp_ratio: int = 4,
        adaln_tembed_dim: int = 512,
        frequency_embedding_size: int = 256,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        audio_window: int = 5,
        audio_block: int = 12,
        audio_channel: int = 768,
        intermediate_dim: int = 512,
        output_dim: int = 768,
        context_tokens: int = 32,
        vae_scale: int = 4,
        text_tokens_zero_pad: bool = False,
        audio_prenorm: bool = False,
        class_range: int = 24,
        class_interval: int = 4,
        enable_flashattn3: bool = False,
        enable_flashattn2: bool = False,
        enable_xformers: bool = False,
        enable_bsa: bool = False,
        bsa_params: dict | None = None,
        cp_split_hw: list[int] | None = None,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        if patch_size[0] != 1:
            raise ValueError(f"patch_size[0] must be 1 (no temporal patching), got {patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 8:
            raise ValueError(
                "hidden_size / num_heads must be a multiple of 8 for 3D RoPE, "
                f"got {hidden_size} / {num_heads}"
            )
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.head_dim = hidden_size // num_heads
        self.text_tokens_zero_pad = text_tokens_zero_pad
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed3D(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(adaln_tembed_dim, frequency_embedding_size)
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size)
        self.blocks = nn.ModuleList(
            LongCatAvatarSingleStreamBlock(
                hidden_size, num_heads, mlp_ratio, adaln_tembed_dim, output_dim, audio_prenorm
            )
            for _ in range(depth)
        )
        self.audio_proj = AudioProjModel(
            audio_window,
            vae_scale,
            audio_block,
            audio_channel,
            intermediate_dim,
            output_dim,
            context_tokens,
        )
        self.final_layer = FinalLayer(
            hidden_size, math.prod(patch_size), out_channels, adaln_tembed_dim
        )

    # -- input preparation ------------------------------------------------------------------------

    def _embed_timesteps(self, timestep: torch.Tensor, B: int, num_frames: int) -> torch.Tensor:
        """(B,) or (B, T) timesteps -> per-frame adaLN input [B, T, adaln] fp32.

        A (B,) timestep applies to every input frame, reference and conditioning frames included,
        as in the reference; give (B, T) with zeros to mark clean frames (the pipeline does).
        Values are first rounded to the weight dtype (bf16: 980.25 -> 980).
        """
        dtype = self.x_embedder.proj.weight.dtype
        timestep = torch.as_tensor(timestep, device=self.x_embedder.proj.weight.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, num_frames)
        if timestep.shape != (B, num_frames):
            raise ValueError(
                f"timestep must be (B,) or (B, T) = ({B}, {num_frames}), "
                f"got {tuple(timestep.shape)}"
            )
        return self.t_embedder(timestep.to(dtype).float())  # [B, T, adaln]

    def _embed_text(
        self, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, list[int] | None]:
        """Caption states -> (y [B, L, C], real tokens per sample or None for all L).

        Without zero-padding, each sample's real tokens are moved to the front (order kept), so
        attention over its first `length` keys is the reference's varlen attention.
        """
        if encoder_hidden_states.ndim == 4:  # the reference pipeline's [B, 1, L, C]
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        y = self.y_embedder(encoder_hidden_states.to(dtype))
        if mask is None:
            return y, None
        mask = mask.to(y.device).bool()  # [B, L]
        if self.text_tokens_zero_pad:
            # Zero the padded tokens after the embedder and attend all L keys.
            return y * mask[..., None].to(y.dtype), None
        L = mask.shape[1]
        # A prompt with no real token attends to all its keys rather than producing NaN.
        lengths = [n or L for n in mask.sum(dim=1).tolist()]
        if all(n == L for n in lengths):
            return y, None
        order = torch.argsort((~mask).int(), dim=1, stable=True)  # real tokens first
        return torch.gather(y, 1, order[..., None].expand_as(y)), lengths

    def _embed_audio(
        self, audio_embeds, B: int, layout: FrameLayout, dtype, device
    ) -> torch.Tensor:
        """Windowed audio [B, F, window, blocks, ch] -> noisy frames' tokens [B, T', ctx, dim]."""
        cfg = self.config
        if audio_embeds is None:  # the zero features the pipeline uses for its no-audio pass
            num_latents = layout.num_cond + layout.num_noisy
            num_audio_frames = 1 + cfg.vae_scale * (num_latents - 1)
            audio_embeds = torch.zeros(
                B,
                num_audio_frames,
                cfg.audio_window,
                cfg.audio_block,
                cfg.audio_channel,
                device=device,
            )
        num_audio_frames = audio_embeds.shape[1]
        if audio_embeds.ndim != 5 or (num_audio_frames - 1) % cfg.vae_scale:
            raise ValueError(
                "audio_embeds must be [B, 1 + vae_scale*k, window, blocks, channels], "
                f"got {tuple(audio_embeds.shape)}"
            )
        tokens = self.audio_proj(audio_embeds.to(device=device, dtype=dtype))  # [B, n, ctx, dim]
        # The reference would reuse the first latent's tokens, but only noisy latents take audio:
        # they own the last T' tokens.
        if tokens.shape[1] < layout.num_noisy:
            raise ValueError(
                f"audio_embeds covers {tokens.shape[1]} latent frames, fewer than the "
                f"{layout.num_noisy} noisy latents"
            )
        return tokens[:, tokens.shape[1] - layout.num_noisy :]

    # -- forward -----------------------------------------------------------------------------------

    def _run_blocks(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        text_lengths: list[int] | None,
        audio: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: FrameLayout,
        kv_cache: LongCatKVCache | None = None,
        collect_kv: bool = False,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """All blocks -> final hidden states and, if asked, each block's pre-RoPE (k, v)."""
        kvs = []
        for i, block in enumerate(self.blocks):
            block_cache = None if kv_cache is None else _cache_entry(kv_cache, i, x.device, x.dtype)
            args = (x, t, y, text_lengths, audio, rope, layout, block_cache, attention_kwargs)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x, kv = self._gradient_checkpointing_func(block, *args)
            else:
                x, kv = block(*args)
            if collect_kv:  # v is a view into the fused qkv output: copy it so that buffer can go
                kvs.append((kv[0], kv[1].contiguous()))
        return x, kvs

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, T, H, W): [ref][cond][noisy] latents along T
        timestep: torch.Tensor,  # (B,) for every frame, or (B, T): sigma * 1000
        encoder_hidden_states: torch.Tensor,  # (B, L, caption_channels)
        audio_embeds: torch.Tensor | None = None,  # (B, F, window, audio_block, audio_channel)
        encoder_attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        num_cond_latents: int = 0,
        num_ref_latents: int = 0,
        ref_img_index: int = 10,
        mask_frame_range: int = 3,
        kv_cache: LongCatKVCache | None = None,  # given: hidden_states holds only noisy latents
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Predict (x0 - noise) for every input latent frame; returns fp32 `[B, C_out, T, H, W]`.

        `audio_embeds` has 1 + vae_scale*(k-1) video frames for the segment's k non-reference
        latents (conditioning + noisy); None means zero audio. With `kv_cache`, the reference and
        conditioning counts come from the cache. `attention_kwargs` reaches every attention
        processor (the default ones hand it to `dispatch_attention_fn` as backend arguments).
        """
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"latent H, W must be divisible by the patch size {self.patch_size}, got {H}x{W}"
            )
        dtype, device = self.x_embedder.proj.weight.dtype, hidden_states.device
        h, w = H // ph, W // pw
        layout = frame_layout(
            T, h * w, num_ref_latents, num_cond_latents, kv_cache, ref_img_index, mask_frame_range
        )
        n_ctx_grid = 0 if kv_cache is None else layout.num_ref + layout.num_cond
        if kv_cache is not None:
            _check_cache(kv_cache, B, n_ctx_grid * h * w, len(self.blocks))
        rope = rope_tables(
            self.head_dim, (n_ctx_grid + T, h, w), layout.num_ref, ref_img_index, device
        )

        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]
        t = self._embed_timesteps(timestep, B, T)  # [B, T, adaln] fp32
        y, text_lengths = self._embed_text(encoder_hidden_states, encoder_attention_mask, dtype)
        audio = None
        if layout.num_noisy:
            audio = self._embed_audio(audio_embeds, B, layout, dtype, device)  # [B, T', ctx, dim]

        x, _ = self._run_blocks(
            x, t, y, text_lengths, audio, rope, layout, kv_cache, attention_kwargs=attention_kwargs
        )
        out = self.final_layer(x, t)  # [B, N, pt*ph*pw*C_out] fp32
        out = out.view(B, T, h, w, pt, ph, pw, self.out_channels)  # patch vector is channel-last
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, self.out_channels, T * pt, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    def build_kv_cache(
        self,
        hidden_states: torch.Tensor,  # (B, C, T_ref + T_cond, H, W): ref then cond latents
        num_ref_latents: int,
        num_cond_latents: int,
        ref_img_index: int = 10,
    ) -> LongCatKVCache:
        """Run reference + conditioning latents once (timestep 0, no cross-attention) and keep each
        block's pre-RoPE keys and values; each denoising step then runs only the noisy latents.

        The cache does not depend on `ref_img_index`: the reference only attends to itself, and RoPE
        is re-applied to the cached keys on every cached forward.
        """
        B, _, T, H, W = hidden_states.shape
        if num_ref_latents + num_cond_latents != T or T == 0:
            raise ValueError(
                f"hidden_states has {T} latent frames, expected num_ref_latents + "
                f"num_cond_latents = {num_ref_latents} + {num_cond_latents} > 0"
            )
        _, ph, pw = self.patch_size
        dtype, device = self.x_embedder.proj.weight.dtype, hidden_states.device
        h, w = H // ph, W // pw
        layout = frame_layout(
            T, h * w, num_ref_latents, num_cond_latents, None, ref_img_index, None
        )
        rope = rope_tables(self.head_dim, (T, h, w), num_ref_latents, ref_img_index, device)
        x = self.x_embedder(hidden_states.to(dtype))  # [B, N_ctx, C]
        t = self._embed_timesteps(torch.zeros(B, T, device=device), B, T)
        _, kvs = self._run_blocks(x, t, None, None, None, rope, layout, collect_kv=True)
        return LongCatKVCache(
            keys=[k.transpose(1, 2) for k, _ in kvs],  # views as (B, heads, S_cached, head_dim)
            values=[v.transpose(1, 2) for _, v in kvs],
            num_ref_latents=num_ref_latents,
            num_cond_latents=num_cond_latents,
        )


def _cache_entry(cache: LongCatKVCache, i: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Block i's cached (k, v) as [B_cache, S_cached, heads, hd] on the compute device."""
    k = cache.keys[i].to(device=device, dtype=dtype).transpose(1, 2)
    v = cache.values[i].to(device=device, dtype=dtype).transpose(1, 2)
    return k, v


def _check_cache(cache: LongCatKVCache, batch: int, num_tokens: int, depth: int) -> None:
    """Raise if a KV cache does not fit this forward (block count, batch, token count)."""
    if len(cache.keys) != depth or len(cache.values) != depth:
        raise ValueError(f"kv_cache has {len(cache.keys)} blocks, the model has {depth}")
    k = cache.keys[0]
    if k.shape[0] not in (1, batch) or k.shape[2] != num_tokens:
        raise ValueError(
            f"kv_cache keys {tuple(k.shape)} do not fit batch {batch} with {num_tokens} cached "
            "tokens (same latent H, W as the noisy latents; batch 1 or the same batch)"
        )
