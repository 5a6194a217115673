"""LongCat-Video-Avatar diffusion transformer (DiT), one file, leaf modules first.

Reimplements LongCat-Video's `longcat_video/modules/avatar/longcat_video_dit_avatar.py` and what
it imports (modules/blocks.py, modules/attention.py, modules/avatar/{attention,blocks,rope_3d}.py)
from the facts in shared/reference/longcat_model.md (§1.1, §7) and checkpoint_keys.md; no upstream
code is copied. Attention runs through PyTorch SDPA (flash-attn when installed), so the model runs
on CPU in fp32 and on CUDA in bf16, and `from_pretrained` loads the official `avatar_single/` (v1.0)
and `base_model/` (v1.5) folders. Like diffusers' transformer_wan.py, it may run to ~800 lines.

Tokens are ordered [reference latent][conditioning latents][noisy latents], frame-major, with
S = H/2 * W/2 tokens per latent frame; attention tensors are laid out [B, S, heads, head_dim].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

try:  # optional fast path; SDPA is the reference path
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

_NORM_EPS = 1e-6  # every LayerNorm/RMSNorm in the blocks and final layer (MB L137-163, ATT)


@dataclass
class LongCatKVCache:
    """Per-block self-attention K/V of the reference + conditioning latents (pre-RoPE keys)."""

    keys: list[torch.Tensor]  # per block: (B, heads, S_cached, head_dim)
    values: list[torch.Tensor]
    num_ref_latents: int
    num_cond_latents: int


@dataclass(frozen=True)
class _FrameLayout:
    """Which latent frames a forward holds, and the reference-skip window over the noisy frames."""

    num_ref: int  # reference latents (0 or 1), attend only to themselves
    num_cond: int  # conditioning latents, attend only to each other
    num_noisy: int
    frame_tokens: int  # S = tokens per latent frame
    cached: bool  # True: ref/cond live in a KV cache, the input holds only the noisy frames
    skip: tuple[int, int] | None  # noisy-frame range [start, end) that must not see the reference

    @property
    def num_ctx_in_input(self) -> int:
        """Reference + conditioning frames present in hidden_states (0 with a KV cache)."""
        return 0 if self.cached else self.num_ref + self.num_cond


def _frame_layout(
    num_frames: int,
    frame_tokens: int,
    num_ref: int,
    num_cond: int,
    cache: LongCatKVCache | None,
    ref_img_index: int,
    mask_frame_range: int | None,
) -> _FrameLayout:
    """Frame bookkeeping for one forward; the skip window is dropped unless it fits (no clip)."""
    if cache is not None:
        cached = (cache.num_ref_latents, cache.num_cond_latents)
        if (num_ref, num_cond) not in ((0, 0), cached):
            raise ValueError(
                f"num_ref_latents, num_cond_latents = {num_ref}, {num_cond} disagree with the "
                f"kv_cache's {cached}"
            )
        num_ref, num_cond, num_noisy = *cached, num_frames
    else:
        num_noisy = num_frames - num_ref - num_cond
    if num_ref not in (0, 1):
        raise ValueError(f"num_ref_latents must be 0 or 1, got {num_ref}")
    if num_cond < 0 or num_noisy < 0:
        raise ValueError(
            f"{num_frames} latent frames cannot hold {num_ref} reference and {num_cond} "
            "conditioning latents"
        )
    skip = None
    if num_ref and mask_frame_range is not None and mask_frame_range > 0:
        # Noisy frame j has time position num_cond + j; skip those within +-range of the reference.
        start = ref_img_index - mask_frame_range - num_cond
        end = ref_img_index + mask_frame_range - num_cond + 1
        if start >= 0 and end <= num_noisy:
            skip = (start, end)
    return _FrameLayout(num_ref, num_cond, num_noisy, frame_tokens, cache is not None, skip)


# --------------------------------------------------------------------------------------------------
# Functional helpers
# --------------------------------------------------------------------------------------------------


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
    """Softmax attention on [B, S, heads, head_dim]; mask is bool [B, 1, 1, S_k], True = attend."""
    if (
        mask is None
        and _flash_attn_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        return _flash_attn_func(q, k, v)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    )  # [B, heads, S_q, head_dim]
    return out.transpose(1, 2)  # [B, S_q, heads, head_dim] (a view; callers reshape)


def _linear_fp32(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear computed in fp32 whatever the weight dtype (the reference's fp32 autocast)."""
    bias = None if linear.bias is None else linear.bias.float()
    return F.linear(x.float(), linear.weight.float(), bias)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm (no affine) then x * (1 + scale) + shift, all in fp32, rounded once to x.dtype.

    x: [B, T, S, C]; shift, scale: [B, T, 1, C] fp32 (one modulation per latent frame).
    """
    h = F.layer_norm(x.float(), x.shape[-1:], eps=_NORM_EPS)
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


def _rope_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    num_ref: int,
    ref_img_index: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 3D RoPE angles for a (T, H, W) token grid, each [T*H*W, head_dim // 2] fp32.

    head_dim splits as t = hd - 4*(hd//6), h = w = 2*(hd//6) (44/42/42 at 128), base 10000, and the
    reference latent sits at time position `ref_img_index`, the others at 0, 1, ... (ROPE L68-100).
    """
    t, h, w = grid
    dims = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    t_pos = torch.arange(t - num_ref, dtype=torch.float32, device=device)
    if num_ref:
        t_pos = torch.cat([torch.full((num_ref,), float(ref_img_index), device=device), t_pos])
    positions = (
        t_pos,
        torch.arange(h, device=device).float(),
        torch.arange(w, device=device).float(),
    )
    angles = []
    for axis, (pos, dim) in enumerate(zip(positions, dims, strict=True)):
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
        ang = pos[:, None] * inv_freq  # [n_axis, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = -1
        angles.append(ang.view(shape).expand(t, h, w, dim // 2))
    ang = torch.cat(angles, dim=-1).reshape(t * h * w, head_dim // 2)  # concatenated t | h | w
    return ang.cos(), ang.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) in fp32.

    x: [B, S, heads, head_dim]; cos, sin: [S, head_dim // 2].
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, S, heads, hd/2]
    cos, sin = cos[:, None], sin[:, None]  # [S, 1, hd/2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, S, heads, hd/2, 2]
    return out.flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Leaf modules
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in fp32, scaled in the input dtype (MB)."""

    def __init__(self, dim: int, eps: float = _NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class FP32LayerNorm(nn.LayerNorm):
    """Affine LayerNorm computed in fp32, returned in the input dtype (MB LayerNorm_FP32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify: [B, C, T, H, W] -> [B, T*H/ph*W/pw, hidden]."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, hidden, T, h, w] -> [B, N, hidden]


class TimestepEmbedder(nn.Module):
    """Sinusoid [cos | sin] of the timestep (sigma * 1000) -> MLP, in fp32 (MB L166-205)."""

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
            -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[..., None] * freqs  # [..., half]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, 1)) if dim % 2 else emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t, self.frequency_embedding_size)
        return _linear_fp32(self.mlp[2], F.silu(_linear_fp32(self.mlp[0], emb)))


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
    """Windowed audio features -> `context_tokens` tokens per latent frame (AB L8-88, DIT L420-436).

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
        self.norm = nn.LayerNorm(output_dim, eps=1e-5)

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

    def __init__(self, dim: int, hidden_dim: int, multiple_of: int = 256) -> None:
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


class LongCatSelfAttention(nn.Module):
    """Fused-qkv self-attention with per-head q/k RMSNorm, 3D RoPE and the continuation masks.

    Masks (ATT L136-194) are separate attention calls, never a dense mask: the reference attends
    only to itself, conditioning latents only to conditioning latents, noisy latents to everything,
    except that noisy frames in the reference-skip window do not see the reference.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, C]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin over the whole grid (cache + input)
        layout: _FrameLayout,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # [B or 1, S_cached, heads, hd]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each [B, N, heads, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        kv_out = (k, v)  # pre-RoPE keys are what a KV cache stores (ATT L129-130)
        cos, sin = rope
        n_cached = 0 if kv_cache is None else kv_cache[0].shape[1]
        q = _apply_rope(q, cos[n_cached:], sin[n_cached:])
        k = _apply_rope(k, cos[n_cached:], sin[n_cached:])
        S = layout.frame_tokens
        if kv_cache is not None:
            k_ctx = _apply_rope(kv_cache[0], cos[:n_cached], sin[:n_cached]).expand(B, -1, -1, -1)
            k_all = torch.cat([k_ctx, k], dim=1)  # [B, S_cached + N, heads, hd]
            v_all = torch.cat([kv_cache[1].expand(B, -1, -1, -1), v], dim=1)
            out = self._noisy_attention(q, k_all, v_all, layout.num_ref * S, layout.skip, S)
        elif layout.num_ref + layout.num_cond == 0:
            out = _attention(q, k, v)
        else:
            r, c = layout.num_ref * S, (layout.num_ref + layout.num_cond) * S
            outs = []
            if r:
                outs.append(_attention(q[:, :r], k[:, :r], v[:, :r]))
            if c > r:
                outs.append(_attention(q[:, r:c], k[:, r:c], v[:, r:c]))
            if c < N:
                outs.append(self._noisy_attention(q[:, c:], k, v, r, layout.skip, S))
            out = torch.cat(outs, dim=1)  # [B, N, heads, hd]
        return self.proj(out.reshape(B, N, C)), kv_out

    @staticmethod
    def _noisy_attention(
        q, k, v, num_ref_tokens: int, skip: tuple[int, int] | None, frame_tokens: int
    ):
        """Noisy queries over all keys; frames in `skip` get the keys without the reference."""
        if skip is None:
            return _attention(q, k, v)
        start, end = skip[0] * frame_tokens, skip[1] * frame_tokens
        outs = []
        if start:
            outs.append(_attention(q[:, :start], k, v))
        outs.append(_attention(q[:, start:end], k[:, num_ref_tokens:], v[:, num_ref_tokens:]))
        if end < q.shape[1]:
            outs.append(_attention(q[:, end:], k, v))
        return torch.cat(outs, dim=1)


class LongCatTextCrossAttention(nn.Module):
    """Cross-attention to the caption tokens with per-head q/k RMSNorm; no gate (MA L255-276)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [B, N, C]; y: [B, L, C]; mask: bool [B, 1, 1, L] (True = real token) or None."""
        B, N, C = x.shape
        q = self.q_norm(self.q_linear(x).view(B, N, self.num_heads, self.head_dim))
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, self.head_dim).unbind(2)
        out = _attention(q, self.k_norm(k), v, mask)  # [B, N, heads, hd]
        return self.proj(out.reshape(B, N, C))


class LongCatAudioCrossAttention(nn.Module):
    """Each latent frame's tokens attend only to that frame's audio tokens (ATT L281-468).

    Frames fold into the batch: [B, T, S, C] x [B, T, ctx, C_a] -> B*T independent attentions.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.k_norm = RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        B, T, S, C = x.shape
        q = self.q_linear(x).view(B * T, S, self.num_heads, self.head_dim)
        kv = self.kv_linear(audio).view(B * T, audio.shape[2], 2, self.num_heads, self.head_dim)
        k, v = kv.unbind(2)  # each [B*T, ctx, heads, hd]
        out = _attention(self.q_norm(q), self.k_norm(k), v)  # [B*T, S, heads, hd]
        return self.proj(out.reshape(B, T, S, C))


# --------------------------------------------------------------------------------------------------
# Transformer block and final layer
# --------------------------------------------------------------------------------------------------


class LongCatAvatarSingleStreamBlock(nn.Module):
    """adaLN self-attention -> text cross-attention -> gated audio cross-attention -> adaLN FFN.

    Modulation is per latent frame (t: [B, T, adaln]), chunked shift, scale, gate (DIT L24-191).
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
        self.pre_crs_attn_norm = FP32LayerNorm(hidden_size, eps=_NORM_EPS)
        self.pre_video_crs_attn_norm = FP32LayerNorm(hidden_size, eps=_NORM_EPS)
        if audio_prenorm:  # not in the shipped checkpoints (audio_prenorm: false)
            self.pre_audio_crs_attn_norm = FP32LayerNorm(audio_dim, eps=_NORM_EPS)
        self.attn = LongCatSelfAttention(hidden_size, num_heads)
        self.cross_attn = LongCatTextCrossAttention(hidden_size, num_heads)
        self.audio_cross_attn = LongCatAudioCrossAttention(hidden_size, audio_dim, num_heads)
        self.ffn = FeedForwardSwiGLU(hidden_size, int(hidden_size * mlp_ratio))

    def forward(
        self,
        x: torch.Tensor,  # [B, N, C], N = T * S
        t: torch.Tensor,  # [B, T, adaln] fp32
        y: torch.Tensor | None,  # [B, L, C] caption tokens; None skips both cross-attentions
        y_mask: torch.Tensor | None,  # bool [B, 1, 1, L]
        audio: torch.Tensor | None,  # [B, T_noisy, ctx, audio_dim]
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: _FrameLayout,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = x.shape
        T = t.shape[1]
        mod = _linear_fp32(self.adaLN_modulation[1], F.silu(t.float())).unsqueeze(2)  # [B,T,1,6C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x.view(B, T, -1, C)  # [B, T, S, C]

        h = _modulate(x, shift_msa, scale_msa).flatten(1, 2)  # [B, N, C]
        attn_out, kv = self.attn(h, rope, layout, kv_cache)
        x = _add_(x, gate_msa * attn_out.view(B, T, -1, C))

        ctx = layout.num_ctx_in_input  # frames that skip cross-attention
        if y is not None and ctx < T:
            x_noisy = x[:, ctx:].flatten(1, 2)  # [B, N_noisy, C]
            text_out = self.cross_attn(self.pre_crs_attn_norm(x_noisy), y, y_mask)
            x = _add_(x, text_out.view(B, T - ctx, -1, C), start_frame=ctx)

            audio_mod = _linear_fp32(self.audio_adaLN_modulation[1], F.silu(t[:, ctx:].float()))
            a_shift, a_scale, a_gate = audio_mod.unsqueeze(2).chunk(3, dim=-1)  # [B, T', 1, C]
            if hasattr(self, "pre_audio_crs_attn_norm"):
                audio = self.pre_audio_crs_attn_norm(audio)
            a = self.audio_cross_attn(self.pre_video_crs_attn_norm(x[:, ctx:]), audio)
            x = _add_(x, a_gate * _modulate(a, a_shift, a_scale), start_frame=ctx)

        h = _modulate(x, shift_mlp, scale_mlp)  # [B, T, S, C]
        x = _add_(x, gate_mlp * self.ffn(h))
        return x.view(B, N, C), kv


class FinalLayer(nn.Module):
    """Per-frame adaLN (chunks shift, scale) then Linear to patch pixels, in fp32 (MB L137-163)."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int, adaln_tembed_dim: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_patch * out_channels)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(adaln_tembed_dim, 2 * hidden_size)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C]; t: [B, T, adaln] fp32 -> [B, N, num_patch * out_channels] fp32."""
        B, N, C = x.shape
        mod = _linear_fp32(self.adaLN_modulation[1], F.silu(t.float())).unsqueeze(2)  # [B,T,1,2C]
        shift, scale = mod.chunk(2, dim=-1)  # shift first: the reverse of AdaLayerNormContinuous
        h = F.layer_norm(x.float().view(B, t.shape[1], -1, C), (C,), eps=_NORM_EPS)
        return _linear_fp32(self.linear, torch.addcmul(shift, h, 1 + scale).view(B, N, C))


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class LongCatVideoAvatarTransformer3DModel(ModelMixin, ConfigMixin):
    """The LongCat-Video-Avatar DiT: 15,871,660,096 parameters (v1.0), 15,852,916,800 (v1.5).

    Config keys that only pick attention kernels or context parallelism in the reference
    (`enable_flashattn2/3`, `enable_xformers`, `enable_bsa`, `bsa_params`, `cp_split_hw`) and the
    multi-speaker L-RoPE range (`class_range`, `class_interval`) are accepted and ignored.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LongCatAvatarSingleStreamBlock"]
    _repeated_blocks = ["LongCatAvatarSingleStreamBlock"]

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

    def _embed_timesteps(
        self, timestep: torch.Tensor, B: int, layout: _FrameLayout, num_frames: int
    ):
        """(B,) or (B, T) timesteps -> per-frame adaLN input [B, T, adaln] fp32.

        A (B,) timestep is the noisy frames' value; reference/conditioning frames get 0, as the
        pipeline sets them. Values are first rounded to the weight dtype (bf16: 980.25 -> 980).
        """
        dtype = self.x_embedder.proj.weight.dtype
        timestep = torch.as_tensor(timestep, device=self.x_embedder.proj.weight.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(B, num_frames)
            ctx = layout.num_ctx_in_input
            if ctx:
                timestep = torch.cat(
                    [torch.zeros_like(timestep[:, :ctx]), timestep[:, ctx:]], dim=1
                )
        if timestep.shape != (B, num_frames):
            raise ValueError(
                f"timestep must be (B,) or (B, T) = ({B}, {num_frames}), "
                f"got {tuple(timestep.shape)}"
            )
        return self.t_embedder(timestep.to(dtype).float())  # [B, T, adaln]

    def _embed_text(self, encoder_hidden_states: torch.Tensor, mask: torch.Tensor | None, dtype):
        """Caption states -> (y [B, L, C], bool key mask [B, 1, 1, L] or None)."""
        if encoder_hidden_states.ndim == 4:  # the reference pipeline's [B, 1, L, C]
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        y = self.y_embedder(encoder_hidden_states.to(dtype))
        if mask is None:
            return y, None
        mask = mask.to(y.device).bool()  # [B, L]
        if self.text_tokens_zero_pad:
            # Zero the padded tokens after the embedder and attend all L keys (DIT L463-473).
            return y * mask[..., None].to(y.dtype), None
        # A prompt with no real token attends to all its keys rather than producing NaN.
        empty = ~mask.any(dim=1, keepdim=True)
        return y, (mask | empty)[:, None, None, :]

    def _embed_audio(
        self, audio_embeds, B: int, layout: _FrameLayout, dtype, device
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
        # they own the last T' tokens (DIT L438-441).
        if tokens.shape[1] < layout.num_noisy:
            raise ValueError(
                f"audio_embeds covers {tokens.shape[1]} latent frames, fewer than the "
                f"{layout.num_noisy} noisy latents"
            )
        return tokens[:, tokens.shape[1] - layout.num_noisy :]

    # -- forward -----------------------------------------------------------------------------------

    def _run_blocks(self, x, t, y, y_mask, audio, rope, layout, kv_cache=None, collect_kv=False):
        """All blocks -> final hidden states and, if asked, each block's pre-RoPE (k, v)."""
        kvs = []
        for i, block in enumerate(self.blocks):
            block_cache = None if kv_cache is None else _cache_entry(kv_cache, i, x.device, x.dtype)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x, kv = self._gradient_checkpointing_func(
                    block, x, t, y, y_mask, audio, rope, layout, block_cache
                )
            else:
                x, kv = block(x, t, y, y_mask, audio, rope, layout, block_cache)
            if collect_kv:  # v is a view into the fused qkv output: copy it so that buffer can go
                kvs.append((kv[0], kv[1].contiguous()))
        return x, kvs

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, C, T, H, W): [ref][cond][noisy] latents along T
        timestep: torch.Tensor,  # (B,) or (B, T): sigma * 1000; ref/cond frames get 0
        encoder_hidden_states: torch.Tensor,  # (B, L, caption_channels)
        audio_embeds: torch.Tensor | None = None,  # (B, F, window, audio_block, audio_channel)
        encoder_attention_mask: torch.Tensor | None = None,  # (B, L), 1 = real token
        num_cond_latents: int = 0,
        num_ref_latents: int = 0,
        ref_img_index: int = 10,
        mask_frame_range: int = 3,
        kv_cache: LongCatKVCache | None = None,  # given: hidden_states holds only noisy latents
        return_dict: bool = True,
    ):
        """Predict (x0 - noise) for every input latent frame; returns fp32 `[B, C_out, T, H, W]`.

        `audio_embeds` has 1 + vae_scale*(k-1) video frames for the segment's k non-reference
        latents (conditioning + noisy); None means zero audio. With `kv_cache`, the reference and
        conditioning counts come from the cache.
        """
        B, _, T, H, W = hidden_states.shape
        pt, ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(
                f"latent H, W must be divisible by the patch size {self.patch_size}, got {H}x{W}"
            )
        dtype, device = self.x_embedder.proj.weight.dtype, hidden_states.device
        h, w = H // ph, W // pw
        layout = _frame_layout(
            T, h * w, num_ref_latents, num_cond_latents, kv_cache, ref_img_index, mask_frame_range
        )
        n_ctx_grid = 0 if kv_cache is None else layout.num_ref + layout.num_cond
        if kv_cache is not None:
            _check_cache(kv_cache, B, n_ctx_grid * h * w, len(self.blocks))
        rope = _rope_tables(
            self.head_dim, (n_ctx_grid + T, h, w), layout.num_ref, ref_img_index, device
        )

        x = self.x_embedder(hidden_states.to(dtype))  # [B, N, C]
        t = self._embed_timesteps(timestep, B, layout, T)  # [B, T, adaln] fp32
        y, y_mask = self._embed_text(encoder_hidden_states, encoder_attention_mask, dtype)
        audio = None
        if layout.num_noisy:
            audio = self._embed_audio(audio_embeds, B, layout, dtype, device)  # [B, T', ctx, dim]

        x, _ = self._run_blocks(x, t, y, y_mask, audio, rope, layout, kv_cache)
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
        layout = _frame_layout(
            T, h * w, num_ref_latents, num_cond_latents, None, ref_img_index, None
        )
        rope = _rope_tables(self.head_dim, (T, h, w), num_ref_latents, ref_img_index, device)
        x = self.x_embedder(hidden_states.to(dtype))  # [B, N_ctx, C]
        t = self._embed_timesteps(torch.zeros(B, T, device=device), B, layout, T)
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
