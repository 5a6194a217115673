"""Audio features: loudness guard, wav2vec2 resampling forward, Whisper groups, frame windows."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest
import torch
from transformers import (
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

from avatarflow.model.audio_encoders import (
    audio_windows,
    normalize_loudness,
    prepare_wav2vec2_waveform,
    wav2vec2_features,
    whisper_features,
)
from avatarflow.model.tiny import TINY_WAV2VEC2, TINY_WHISPER, TINY_WHISPER_CHUNK_S

RATE = 16_000


def _tone(seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )


@pytest.fixture(scope="module")
def wav2vec2() -> tuple[Wav2Vec2Model, Wav2Vec2FeatureExtractor]:
    torch.manual_seed(0)
    return Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2)).eval(), Wav2Vec2FeatureExtractor()


@pytest.fixture(scope="module")
def whisper() -> tuple[WhisperModel, WhisperFeatureExtractor]:
    torch.manual_seed(0)
    model = WhisperModel(WhisperConfig(**TINY_WHISPER)).eval()
    extractor = WhisperFeatureExtractor(
        feature_size=TINY_WHISPER["num_mel_bins"], chunk_length=TINY_WHISPER_CHUNK_S
    )
    return model, extractor


def test_normalize_loudness_reaches_minus_23_lufs() -> None:
    out = normalize_loudness(_tone(2.0, amplitude=0.05))
    assert pyloudnorm.Meter(RATE).integrated_loudness(out.astype(np.float64)) == pytest.approx(
        -23.0, abs=0.5
    )


@pytest.mark.parametrize("wave", [np.zeros(RATE, np.float32), _tone(0.2)], ids=["silence", "short"])
def test_normalize_loudness_leaves_silence_and_short_clips_unchanged(wave: np.ndarray) -> None:
    np.testing.assert_array_equal(normalize_loudness(wave), wave)


def test_wav2vec2_prefilter_is_deterministic() -> None:
    wave = _tone(1.0)
    np.testing.assert_array_equal(prepare_wav2vec2_waveform(wave), prepare_wav2vec2_waveform(wave))


def test_wav2vec2_features_shape_at_twice_video_rate(wav2vec2) -> None:
    model, extractor = wav2vec2
    feats = wav2vec2_features(model, extractor, _tone(1.5), feature_rate_hz=32)
    assert feats.shape == (48, TINY_WAV2VEC2["num_hidden_layers"], TINY_WAV2VEC2["hidden_size"])


def test_wav2vec2_features_match_stock_forward_at_native_rate(wav2vec2) -> None:
    model, extractor = wav2vec2
    wave = _tone(1.0)
    # 1 s gives 49 CNN frames: resampling to 49 is the identity, so the stock forward must agree.
    feats = wav2vec2_features(model, extractor, wave, feature_rate_hz=49)
    values = extractor(prepare_wav2vec2_waveform(wave), sampling_rate=RATE, return_tensors="pt")
    with torch.no_grad():
        stock = model(values.input_values, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, torch.stack(stock[1:], dim=2)[0])


def test_whisper_features_group_layers(whisper) -> None:
    model, extractor = whisper
    wave = _tone(1.0)
    # At 50 fps the 50 Hz encoder frames pass through the interpolation unchanged.
    feats = whisper_features(model, extractor, wave, fps=50)
    mel = extractor(normalize_loudness(wave), sampling_rate=RATE, return_tensors="pt")
    with torch.no_grad():
        states = model.get_encoder()(mel.input_features, output_hidden_states=True).hidden_states
    assert feats.shape == (50, 5, TINY_WHISPER["d_model"])
    torch.testing.assert_close(feats[:, 0], torch.stack(states[0:8]).mean(0)[0, :50])
    torch.testing.assert_close(feats[:, 4], states[32][0, :50])


def test_whisper_features_span_several_windows_at_video_fps(whisper) -> None:
    model, extractor = whisper
    seconds = TINY_WHISPER_CHUNK_S * 2.5
    assert whisper_features(model, extractor, _tone(seconds), fps=25).shape[0] == seconds * 25


def test_audio_windows_centre_on_stride_and_clamp() -> None:
    feats = torch.arange(20, dtype=torch.float32).view(20, 1, 1)
    windows = audio_windows(feats, num_frames=10, stride=2, start_frame=1)
    assert windows.shape == (10, 5, 1, 1)
    assert windows[0, :, 0, 0].tolist() == [0, 1, 2, 3, 4]  # centre 2
    assert windows[-1, :, 0, 0].tolist() == [18, 19, 19, 19, 19]  # centre 20, clamped


def test_normalize_loudness_does_not_clip_like_the_reference() -> None:
    wave = _tone(2.0, amplitude=0.01)
    wave[RATE] = 0.5  # one spike: the -23 LUFS gain lifts it past full scale
    assert np.abs(normalize_loudness(wave)).max() > 1.0
