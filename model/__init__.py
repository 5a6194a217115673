"""The local LongCat-Video-Avatar model: DiT, pipeline, audio encoders, loading, tiny checkpoint.

The classes are re-exported here for users; a saved pipeline's model_index.json records each of our
components by its own module (`["avatarflow.model.transformer_longcat_avatar", "<ClassName>"]`).
"""

from avatarflow.model.attention_longcat_avatar import (
    LongCatAvatarAudioCrossAttnProcessor,
    LongCatAvatarSelfAttnProcessor,
    LongCatAvatarTextCrossAttnProcessor,
)
from avatarflow.model.loading import CheckpointError, detect_layout, load_pipeline, load_transformer
from avatarflow.model.pipeline_longcat_avatar import (
    LongCatAvatarSegmentState,
    LongCatVideoAvatarPipeline,
    LongCatVideoAvatarPipelineOutput,
    guided_velocity,
)
from avatarflow.model.tiny import write_tiny_checkpoint
from avatarflow.model.transformer_longcat_avatar import (
    LongCatKVCache,
    LongCatVideoAvatarTransformer3DModel,
)

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
