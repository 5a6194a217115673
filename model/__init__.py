"""The local LongCat-Video-Avatar model: DiT, pipeline, audio encoders, loading, tiny checkpoint.

Class names are re-exported here because diffusers resolves a saved pipeline's components by
importing this package (model_index.json records them as `["model", "<ClassName>"]`).
"""

from model.attention_longcat_avatar import (
    LongCatAvatarAudioCrossAttnProcessor,
    LongCatAvatarSelfAttnProcessor,
    LongCatAvatarTextCrossAttnProcessor,
)
from model.loading import CheckpointError, detect_layout, load_pipeline, load_transformer
from model.pipeline_longcat_avatar import (
    LongCatAvatarSegmentState,
    LongCatVideoAvatarPipeline,
    LongCatVideoAvatarPipelineOutput,
    guided_velocity,
)
from model.tiny import write_tiny_checkpoint
from model.transformer_longcat_avatar import LongCatKVCache, LongCatVideoAvatarTransformer3DModel

__all__ = [
    "CheckpointError",
    "LongCatAvatarAudioCrossAttnProcessor",
    "LongCatAvatarSelfAttnProcessor",
    "LongCatAvatarTextCrossAttnProcessor",
    "LongCatAvatarSegmentState",
    "LongCatKVCache",
    "LongCatVideoAvatarPipeline",
    "LongCatVideoAvatarPipelineOutput",
    "LongCatVideoAvatarTransformer3DModel",
    "detect_layout",
    "guided_velocity",
    "load_pipeline",
    "load_transformer",
    "write_tiny_checkpoint",
]
