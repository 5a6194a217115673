"""Audio features for the LongCat-Video-Avatar DiT: wav2vec2 (v1.0) and Whisper (v1.5).

Reimplements the audio preprocessing of
meituan-longcat/LongCat-Video@6b3f4b8582a8bc3f20f795735f5383716c4ba794:
`longcat_video/pipeline_longcat_video_avatar.py` (`get_audio_embedding_wav2vec2`,
`get_audio_embedding_whisper`, `_loudness_norm`, `_add_noise_floor`) and
`longcat_video/audio_process/wav2vec2.py` (`Wav2Vec2ModelWrapper`), written from a reading of that
code, not copied: waveform at 16 kHz → loudness-normalised → per-layer encoder features →
per-video-frame windows. Vocal separation is not built in; docs/model.md says how to run a
separator before the pipeline.
"""

from __future__ import annotations

import numpy as np
import pyloudnorm
import torch
import torch.nn.functional as F
from scipy.signal import butter, lfilter
from transformers import (
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperFeatureExtractor,
    WhisperModel,
)

SAMPLE_RATE_HZ = 16_000
TARGET_LUFS = -23.0
AUDIO_WINDOW = 5  # video frame i sees features at i*stride + (-2..+2); the DiT hard-codes 5
WHISPER_RATE_HZ = 50  # Whisper encoder frames per second
WHISPER_GROUPS = 4  # hidden states 0..31 averaged in 4 groups of 8, plus the last one
_NOISE_FLOOR_DB = -45.0  # the reference adds this much noise before wav2vec2 (seeded here)
_LOUDNESS_LIMIT_LUFS = 100.0  # beyond this the reference leaves the loudness alone
_LOWPASS_HZ = 3_000.0


def normalize_loudness(waveform: np.ndarray, sample_rate_hz: int = SAMPLE_RATE_HZ) -> np.ndarray:
    """Scale a mono waveform to -23 LUFS, unclipped, as the reference's `_loudness_norm` does.

    Returned unchanged: silence and anything measured beyond ±100 LUFS (the reference's threshold),
    and clips under pyloudnorm's 0.4 s block, which the reference cannot measure at all.
    """
    wave = np.asarray(waveform, dtype=np.float64)
    meter = pyloudnorm.Meter(sample_rate_hz)
    if wave.size < int(meter.block_size * sample_rate_hz) + 1:
        return wave.astype(np.float32)
    loudness = meter.integrated_loudness(wave)
    if not abs(loudness) <= _LOUDNESS_LIMIT_LUFS:  # also catches -inf (silence)
        return wave.astype(np.float32)
    gain = 10.0 ** ((TARGET_LUFS - loudness) / 20.0)
    return (wave * gain).astype(np.float32)


def prepare_wav2vec2_waveform(waveform: np.ndarray, seed: int = 0) -> np.ndarray:
    """Apply the v1.0 pre-filter: loudness, a seeded -45 dB noise floor, a causal 3rd-order
    Butterworth low-pass at 3 kHz (the reference's `_smooth_transients`: `lfilter`, one pass)."""
    wave = normalize_loudness(waveform).astype(np.float64)
    rng = np.random.default_rng(seed)
    wave = wave + rng.standard_normal(wave.size) * 10.0 ** (_NOISE_FLOOR_DB / 20.0)
    b, a = butter(3, _LOWPASS_HZ, btype="low", fs=SAMPLE_RATE_HZ)
    return lfilter(b, a, wave).astype(np.float32)


@torch.no_grad()
def wav2vec2_features(
    model: Wav2Vec2Model,
    feature_extractor: Wav2Vec2FeatureExtractor,
    waveform: np.ndarray,
    feature_rate_hz: float,
) -> torch.Tensor:
    """Return wav2vec2 features (T, num_hidden_layers, hidden) at feature_rate_hz (2x video fps)."""
    wave = prepare_wav2vec2_waveform(waveform)
    num_features = max(1, int(wave.size / SAMPLE_RATE_HZ * feature_rate_hz))
    inputs = feature_extractor(wave, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt")
    values = inputs.input_values.to(model.device, model.dtype)

    # The reference resamples the CNN features to the feature rate *before* the transformer; a
    # forward hook on the CNN does that inside the stock forward.
    def resample(_module: torch.nn.Module, _inputs: tuple, cnn: torch.Tensor) -> torch.Tensor:
        return F.interpolate(cnn, size=num_features, mode="linear", align_corners=True)

    handle = model.feature_extractor.register_forward_hook(resample)
    try:
        states = model(values, output_hidden_states=True, return_dict=True).hidden_states
    finally:
        handle.remove()
    return torch.stack(states[1:], dim=2)[0]  # (T, layers, hidden): layer outputs, no embeddings


@torch.no_grad()
def whisper_features(
    model: WhisperModel,
    feature_extractor: WhisperFeatureExtractor,
    waveform: np.ndarray,
    fps: float,
) -> torch.Tensor:
    """Return Whisper encoder features (T, 5, d_model) at the video fps."""
    wave = normalize_loudness(waveform)
    encoder = model.get_encoder()
    # The encoder takes exactly one window (30 s = 3000 mel frames for large-v3).
    chunk = feature_extractor.n_samples
    pieces = []
    for start in range(0, max(wave.size, 1), chunk):
        piece = wave[start : start + chunk]
        mel = feature_extractor(piece, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt")
        mel = mel.input_features.to(model.device, model.dtype)
        states = encoder(mel, output_hidden_states=True, return_dict=True).hidden_states
        stacked = torch.stack(states, dim=2)[0]  # (1500, layers + 1, d_model) at 50 Hz
        size = (stacked.shape[1] - 1) // WHISPER_GROUPS
        groups = [stacked[:, g * size : (g + 1) * size].mean(dim=1) for g in range(WHISPER_GROUPS)]
        groups.append(stacked[:, -1])
        pieces.append(torch.stack(groups, dim=1))
    num_frames = max(1, int(wave.size / SAMPLE_RATE_HZ * fps))
    # Keep the encoder frames that span the video frames (2 per frame at 25 fps, as the reference).
    feats = torch.cat(pieces)[: max(1, round(num_frames * WHISPER_RATE_HZ / fps))]
    flat = feats.flatten(1).T[None]  # (1, 5 * d_model, T_50Hz)
    flat = F.interpolate(flat, size=num_frames, mode="linear", align_corners=True)
    return flat[0].T.reshape(num_frames, feats.shape[1], feats.shape[2])


def audio_windows(
    features: torch.Tensor, num_frames: int, stride: int, start_frame: int = 0
) -> torch.Tensor:
    """Cut (T, blocks, C) features into per-video-frame windows (num_frames, 5, blocks, C)."""
    half = AUDIO_WINDOW // 2
    frames = torch.arange(start_frame, start_frame + num_frames, device=features.device)
    offsets = torch.arange(-half, half + 1, device=features.device)
    index = (frames[:, None] * stride + offsets[None]).clamp(0, features.shape[0] - 1)
    return features[index]
