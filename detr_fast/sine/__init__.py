"""The masks and the sine position embedding: parameters, reference, CPU fallback, dispatch, custom op, modules."""
from .custom_op import sine_masks_pos
from .levels import POS_DTYPES, announce_embedding, announced_for, compute_levels, remember_pos
from .params import FREQUENCY_RULES, SineParams
from .position_encoding import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    PositionEmbeddingSineHW,
    build_position_encoding,
    sine_position_embedding,
)
from .reference import downsample_mask_reference, pad_images_reference, sine_embedding_reference

__all__ = [
    "FREQUENCY_RULES", "POS_DTYPES", "PositionEmbeddingLearned", "PositionEmbeddingSine", "PositionEmbeddingSineHW",
    "SineParams", "announce_embedding", "announced_for", "build_position_encoding", "compute_levels",
    "downsample_mask_reference",
    "pad_images_reference", "remember_pos", "sine_embedding_reference", "sine_masks_pos", "sine_position_embedding",
]
