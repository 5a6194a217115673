"""Attention of the LongCat-Video-Avatar DiT: modules, processors, 3D RoPE and the frame layout.

Reimplements the attention of meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794
(`longcat_video/modules/avatar/attention.py`: `Attention`, `SingleStreamAttention`;
`longcat_video/modules/attention.py`: `MultiHeadCrossAttention`; `longcat_video/modules/avatar/
rope_3d.py`: `RotaryPositionalEmbedding`), written from a reading of that code, not copied.

Every softmax goes through diffusers' `dispatch_attention_fn`, so `set_attention_backend("native" |
"flash" | "_native_flash" | "sage" | ...)` on the model picks the kernel. No call passes a mask:
the continuation masks are separate calls over token ranges, and padded text is dropped per sample
(the reference's varlen attention), so backends without mask support give the same result.
Tensors are laid out [B, S, heads, head_dim], diffusers' dispatch convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

NORM_EPS = 1e-6  # every LayerNorm / RMSNorm in the blocks and the final layer
ROPE_BASE = 10000.0


@dataclass
class LongCatKVCache:
    """Per-block self-attention K/V of the reference + conditioning latents (pre-RoPE keys)."""

    keys: list[torch.Tensor]  # per block: (B, heads, S_cached, head_dim)
    values: list[torch.Tensor]
    num_ref_latents: int
    num_cond_latents: int


@dataclass(frozen=True)
class FrameLayout:
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


def frame_layout(
    num_frames: int,
    frame_tokens: int,
    num_ref: int,
    num_cond: int,
    cache: LongCatKVCache | None,
    ref_img_index: int,
    mask_frame_range: int | None,
) -> FrameLayout:
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
    return FrameLayout(num_ref, num_cond, num_noisy, frame_tokens, cache is not None, skip)


def rope_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    num_ref: int,
    ref_img_index: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the 3D RoPE angles for a (T, H, W) token grid, each [T*H*W, head_dim // 2] fp32.

    head_dim splits as t = hd - 4*(hd//6), h = w = 2*(hd//6) (44/42/42 at 128), base 10000, and the
    reference latent sits at time position `ref_img_index`, the others at 0, 1, ...
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
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, dim, 2, device=device).float() / dim))
        ang = pos[:, None] * inv_freq  # [n_axis, dim/2]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = -1
        angles.append(ang.view(shape).expand(t, h, w, dim // 2))
    ang = torch.cat(angles, dim=-1).reshape(t * h * w, head_dim // 2)  # concatenated t | h | w
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos) in fp32.

    x: [B, S, heads, head_dim]; cos, sin: [S, head_dim // 2].
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, S, heads, hd/2]
    cos, sin = cos[:, None], sin[:, None]  # [S, 1, hd/2]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # [B, S, heads, hd/2, 2]
    return out.flatten(-2).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in fp32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float = NORM_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class _DispatchingProcessor:
    """Base of the processors: one softmax attention through diffusers' backend dispatch."""

    _attention_backend = None
    _parallel_config = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v on [B, S, heads, head_dim], no mask."""
        return dispatch_attention_fn(
            q, k, v, attention_kwargs=attention_kwargs, backend=self._attention_backend
        )


class LongCatAvatarSelfAttnProcessor(_DispatchingProcessor):
    """Fused-qkv self-attention with q/k RMSNorm, 3D RoPE and the continuation masks.

    The masks are separate calls: the reference attends only to itself, conditioning latents only
    to conditioning latents, noisy latents to everything, except that noisy frames in the
    reference-skip window do not see the reference. With a KV cache, the cached pre-RoPE keys are
    rotated over the whole grid and only the noisy queries run.
    """

    def __call__(
        self,
        attn: LongCatSelfAttention,
        hidden_states: torch.Tensor,  # [B, N, C]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin over the whole grid (cache + input)
        layout: FrameLayout,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,  # [B or 1, S_cached, heads, hd]
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, N, C = hidden_states.shape
        qkv = attn.qkv(hidden_states).view(B, N, 3, attn.num_heads, attn.head_dim)
        q, k, v = qkv.unbind(2)  # each [B, N, heads, hd]
        q, k = attn.q_norm(q), attn.k_norm(k)
        kv_out = (k, v)  # a KV cache stores the keys before RoPE
        cos, sin = rope
        n_cached = 0 if kv_cache is None else kv_cache[0].shape[1]
        q = apply_rope(q, cos[n_cached:], sin[n_cached:])
        k = apply_rope(k, cos[n_cached:], sin[n_cached:])
        S = layout.frame_tokens
        if kv_cache is not None:
            k_ctx = apply_rope(kv_cache[0], cos[:n_cached], sin[:n_cached]).expand(B, -1, -1, -1)
            k_all = torch.cat([k_ctx, k], dim=1)  # [B, S_cached + N, heads, hd]
            v_all = torch.cat([kv_cache[1].expand(B, -1, -1, -1), v], dim=1)
            out = self._noisy(q, k_all, v_all, layout.num_ref * S, layout.skip, S, attention_kwargs)
        elif layout.num_ref + layout.num_cond == 0:
            out = self.attend(q, k, v, attention_kwargs)
        else:
            r, c = layout.num_ref * S, (layout.num_ref + layout.num_cond) * S
            outs = []
            if r:
                outs.append(self.attend(q[:, :r], k[:, :r], v[:, :r], attention_kwargs))
            if c > r:
                outs.append(self.attend(q[:, r:c], k[:, r:c], v[:, r:c], attention_kwargs))
            if c < N:
                outs.append(self._noisy(q[:, c:], k, v, r, layout.skip, S, attention_kwargs))
            out = torch.cat(outs, dim=1)  # [B, N, heads, hd]
        return attn.proj(out.reshape(B, N, C)), kv_out

    def _noisy(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        num_ref_tokens: int,
        skip: tuple[int, int] | None,
        frame_tokens: int,
        attention_kwargs: dict[str, Any] | None,
    ) -> torch.Tensor:
        """Noisy queries over all keys; frames in `skip` get the keys without the reference."""
        if skip is None:
            return self.attend(q, k, v, attention_kwargs)
        start, end = skip[0] * frame_tokens, skip[1] * frame_tokens
        no_ref = (k[:, num_ref_tokens:], v[:, num_ref_tokens:])
        outs = []
        if start:
            outs.append(self.attend(q[:, :start], k, v, attention_kwargs))
        outs.append(self.attend(q[:, start:end], *no_ref, attention_kwargs))
        if end < q.shape[1]:
            outs.append(self.attend(q[:, end:], k, v, attention_kwargs))
        return torch.cat(outs, dim=1)


class LongCatAvatarTextCrossAttnProcessor(_DispatchingProcessor):
    """Cross-attention to the caption tokens; each sample sees only its first `length` tokens."""

    def __call__(
        self,
        attn: LongCatTextCrossAttention,
        hidden_states: torch.Tensor,  # [B, N, C]
        encoder_hidden_states: torch.Tensor,  # [B, L, C]
        text_lengths: list[int] | None = None,  # real tokens per sample; None: all L
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        B, N, C = hidden_states.shape
        L = encoder_hidden_states.shape[1]
        q = attn.q_linear(hidden_states).view(B, N, attn.num_heads, attn.head_dim)
        q = attn.q_norm(q)
        kv = attn.kv_linear(encoder_hidden_states).view(B, L, 2, attn.num_heads, attn.head_dim)
        k, v = kv.unbind(2)
        k = attn.k_norm(k)
        if text_lengths is None or all(n == L for n in text_lengths):
            out = self.attend(q, k, v, attention_kwargs)
        else:  # the reference's varlen attention: one call per sample over its own tokens
            out = torch.cat(
                [
                    self.attend(q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], attention_kwargs)
                    for b, n in enumerate(text_lengths)
                ]
            )
        return attn.proj(out.reshape(B, N, C))


class LongCatAvatarAudioCrossAttnProcessor(_DispatchingProcessor):
    """Each latent frame's tokens attend only to that frame's audio tokens.

    Frames fold into the batch: [B, T, S, C] x [B, T, ctx, C_a] -> B*T independent attentions.
    """

    def __call__(
        self,
        attn: LongCatAudioCrossAttention,
        hidden_states: torch.Tensor,  # [B, T, S, C]
        audio: torch.Tensor,  # [B, T, ctx, C_a]
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        B, T, S, C = hidden_states.shape
        q = attn.q_linear(hidden_states).view(B * T, S, attn.num_heads, attn.head_dim)
        kv = attn.kv_linear(audio).view(B * T, audio.shape[2], 2, attn.num_heads, attn.head_dim)
        k, v = kv.unbind(2)  # each [B*T, ctx, heads, hd]
        out = self.attend(attn.q_norm(q), attn.k_norm(k), v, attention_kwargs)
        return attn.proj(out.reshape(B, T, S, C))


class LongCatSelfAttention(nn.Module, AttentionModuleMixin):
    """Self-attention weights (`qkv`, `q_norm`, `k_norm`, `proj`); the math is in the processor."""

    _default_processor_cls = LongCatAvatarSelfAttnProcessor
    _available_processors = [LongCatAvatarSelfAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, num_heads: int, processor: Any = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.set_processor(processor or self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: FrameLayout,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        return self.processor(self, hidden_states, rope, layout, kv_cache, attention_kwargs)


class LongCatTextCrossAttention(nn.Module, AttentionModuleMixin):
    """Caption cross-attention weights with per-head q/k RMSNorm; no gate."""

    _default_processor_cls = LongCatAvatarTextCrossAttnProcessor
    _available_processors = [LongCatAvatarTextCrossAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, num_heads: int, processor: Any = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.set_processor(processor or self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_lengths: list[int] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        return self.processor(
            self, hidden_states, encoder_hidden_states, text_lengths, attention_kwargs
        )


class LongCatAudioCrossAttention(nn.Module, AttentionModuleMixin):
    """Per-frame audio cross-attention weights (registration order follows the checkpoint)."""

    _default_processor_cls = LongCatAvatarAudioCrossAttnProcessor
    _available_processors = [LongCatAvatarAudioCrossAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, audio_dim: int, num_heads: int, processor: Any = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, 2 * dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.set_processor(processor or self._default_processor_cls())

    def forward(
        self,
        hidden_states: torch.Tensor,
        audio: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, audio, attention_kwargs)
