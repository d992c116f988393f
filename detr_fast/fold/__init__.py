"""Frozen BatchNorm folded into the convolutions: the BN class, the fold cache, fused convs, recipes per block kind."""
from .cache import clear_fold_cache
from .class_swap import register_variant, swapped_class, variant_of
from .folding import FoldResult, count_folded, fold, fold_frozen_bn, unfold_frozen_bn
from .frozen_bn import FrozenBatchNorm2d
from .fused_conv import memory_format_of
from .torchvision_blocks import bn_dtype, enter_layout, restore_layout

__all__ = [
    "FoldResult", "FrozenBatchNorm2d", "bn_dtype", "clear_fold_cache", "count_folded", "enter_layout", "fold",
    "fold_frozen_bn", "memory_format_of", "register_variant", "restore_layout", "swapped_class", "unfold_frozen_bn",
    "variant_of",
]
