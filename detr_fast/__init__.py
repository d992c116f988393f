"""detr_fast: a fast, drop-in backbone stage for DETR-family detectors.

The names here follow Deformable-DETR's conventions (the seed's); DETR's are in detr_fast.detr.
"""
from .backbone import Backbone, BackboneBase, Joiner, build_backbone
from .conversion import ConversionReport
from .convert import conversion_report, convert
from .dispatch import BACKENDS
from .fold_cache import clear_fold_cache
from .folding import fold_frozen_bn, unfold_frozen_bn
from .frozen_bn import FrozenBatchNorm2d
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .ops import sine_masks_pos  # noqa: F401  (registers torch.ops.detr_fast.sine_masks_pos; no Triton)
from .position_encoding import (
                                PositionEmbeddingLearned,
                                PositionEmbeddingSine,
                                build_position_encoding,
                                sine_position_embedding,
)
from .sine_params import SineParams

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Backbone", "BackboneBase", "ConversionReport", "FrozenBatchNorm2d", "Joiner", "NestedTensor",
    "PositionEmbeddingLearned", "PositionEmbeddingSine", "build_backbone", "build_position_encoding",
    "nested_tensor_from_tensor_list", "convert", "fold_frozen_bn", "unfold_frozen_bn",
    "sine_position_embedding", "clear_fold_cache", "SineParams", "conversion_report",
]
