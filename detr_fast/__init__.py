"""detr_fast: a fast, drop-in backbone stage for DETR-family detectors.

The names here follow Deformable-DETR's conventions (the seed's); DETR's are in detr_fast.detr.
"""
from .backbone import Backbone, BackboneBase, Joiner, build_backbone
from .conversion import ConversionReport, conversion_report, convert
from .dispatch import BACKENDS
from .fold import FrozenBatchNorm2d, clear_fold_cache, fold_frozen_bn, unfold_frozen_bn
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .sine import (
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    PositionEmbeddingSineHW,
    SineParams,
    build_position_encoding,
    sine_masks_pos,  # noqa: F401  (registers torch.ops.detr_fast.sine_masks_pos; no Triton)
    sine_position_embedding,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Backbone", "BackboneBase", "ConversionReport", "FrozenBatchNorm2d", "Joiner", "NestedTensor",
    "PositionEmbeddingLearned", "PositionEmbeddingSine", "PositionEmbeddingSineHW", "build_backbone",
    "build_position_encoding",
    "nested_tensor_from_tensor_list", "convert", "fold_frozen_bn", "unfold_frozen_bn",
    "sine_position_embedding", "clear_fold_cache", "SineParams", "conversion_report",
]
