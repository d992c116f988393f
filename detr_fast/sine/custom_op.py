"""The Triton sine embedding as a PyTorch custom operator.

Registered when ``detr_fast`` is imported (the schema and the fake implementation need no Triton);
the kernels themselves are imported on the first real call.

``torch.ops.detr_fast.sine_masks_pos`` is opaque to torch.compile: with its fake (meta)
implementation, ``torch.compile(fullgraph=True)`` traces a model that calls it without a graph
break and calls the kernel at run time. Registered through ``torch.library.custom_op`` (torch >=
2.4) or, on older torch, ``torch.library.Library`` + ``register_fake``/``impl_abstract``/Meta.

Schema: (mask, image_sizes?, height, width, num_pos_feats, temperature, normalize, scale, offset,
eps, frequencies, dtype, need_mask, temperature_w?=None) -> (level_mask, pos) where pos is the
contiguous B x h x w x 2F buffer (callers view it as B x 2F x h x w, the reference layout) and
level_mask the B x h x w nearest-downsampled mask, or an empty tensor when need_mask is False.
``temperature`` is the y half's temperature and ``temperature_w`` the x half's (None: the same;
DINO's PositionEmbeddingSineHW); it comes last, with a default, so calls without it are unchanged.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import compiling
from .params import SineParams
from .reference import cached_frequencies, cached_frequency_pair, downsample_mask_reference

_OP_NAME = "detr_fast::sine_masks_pos"
_SCHEMA = ("(Tensor mask, Tensor? image_sizes, int height, int width, int num_pos_feats, float temperature, "
           "bool normalize, float scale, float offset, float eps, str frequencies, ScalarType dtype, bool need_mask, "
           "float? temperature_w=None) -> (Tensor, Tensor)")


def _sine_masks_pos_impl(mask: Tensor, image_sizes: Optional[Tensor], height: int, width: int,
                         num_pos_feats: int, temperature: float, normalize: bool, scale: float,
                         offset: float, eps: float, frequencies: str, dtype: torch.dtype,
                         need_mask: bool, temperature_w: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    from ..kernels.sine_embedding import sine_embedding_general, sine_embedding_rect

    if temperature_w is None or temperature_w == temperature:
        dim_t = dim_t_x = cached_frequencies(num_pos_feats, temperature, mask.device, frequencies)
    else:  # one table per axis (rows of the cached 2 x F table)
        dim_t, dim_t_x = cached_frequency_pair(num_pos_feats, temperature, temperature_w, mask.device, frequencies)
    if image_sizes is not None:
        sizes = image_sizes
        if sizes.device != mask.device:
            # non_blocking: a pageable host->device copy is staged at once and never waits for
            # the device, so the common path has no host-device synchronization.
            sizes = sizes.to(mask.device, non_blocking=True)
        level_mask, pos = sine_embedding_rect(sizes, (int(mask.shape[1]), int(mask.shape[2])), (height, width),
                                              dim_t, normalize, scale, offset, eps, dtype, dim_t_x=dim_t_x)
        return level_mask if need_mask else mask.new_empty((0,)), pos
    # Arbitrary masks: the reference downsampling, then cumulative sums + the kernel. Nearest
    # resizing to the mask's own size is the identity (scale 1.0), so a mask already at the level's
    # size (PositionEmbeddingSine.forward) skips those three launches.
    if (height, width) != (mask.shape[1], mask.shape[2]):
        level_mask = downsample_mask_reference(mask, [height, width])
    elif need_mask:
        level_mask = mask.clone()  # an operator's output may not alias its input
    else:
        level_mask = mask
    pos = sine_embedding_general(level_mask, dim_t, normalize, scale, offset, eps, dtype, dim_t_x=dim_t_x)
    if not need_mask:
        level_mask = mask.new_empty((0,))
    return level_mask, pos


def _sine_masks_pos_fake(mask: Tensor, image_sizes: Optional[Tensor], height: int, width: int,
                         num_pos_feats: int, temperature: float, normalize: bool, scale: float,
                         offset: float, eps: float, frequencies: str, dtype: torch.dtype,
                         need_mask: bool, temperature_w: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    batch = mask.shape[0]
    pos = mask.new_empty((batch, height, width, 2 * num_pos_feats), dtype=dtype)
    level_mask = mask.new_empty((batch, height, width) if need_mask else (0,), dtype=torch.bool)
    return level_mask, pos


def _register() -> None:
    library = torch.library
    if hasattr(library, "custom_op") and hasattr(library, "register_fake"):
        op = library.custom_op(_OP_NAME, mutates_args=(), schema=_SCHEMA)(_sine_masks_pos_impl)
        op.register_fake(_sine_masks_pos_fake)
        return
    # Older torch: define the schema, one implementation for every backend, and the abstract one.
    lib = library.Library("detr_fast", "DEF")
    lib.define("sine_masks_pos" + _SCHEMA)
    lib.impl("sine_masks_pos", _sine_masks_pos_impl, "CompositeExplicitAutograd")
    register_fake = getattr(library, "register_fake", None) or getattr(library, "impl_abstract", None)
    if register_fake is not None:
        register_fake(_OP_NAME, lib=lib)(_sine_masks_pos_fake)
    else:
        lib.impl("sine_masks_pos", _sine_masks_pos_fake, "Meta")
    _register.lib = lib  # keep the registration alive


_register()


def sine_masks_pos(mask: Tensor, image_sizes: Optional[Tensor], height: int, width: int, params: SineParams,
                   dtype: torch.dtype, need_mask: bool) -> Tuple[Tensor, Tensor]:
    """Call the custom op; returns (level_mask, pos as a B x 2F x h x w view in the reference layout).

    No argument checking here: the caller (detr_fast.sine.levels) validates first.
    """
    args = (mask, image_sizes, height, width, params.num_pos_feats, params.temperature, params.normalize,
            params.scale, params.offset, params.eps, params.frequencies, dtype, need_mask, params.temperature_w)
    if compiling():
        level_mask, pos = torch.ops.detr_fast.sine_masks_pos(*args)
    else:
        # Eager: call the implementation directly. The dispatcher's per-call cost is a large part
        # of a launch-bound level (DETR's stride 32 is ~2 MB), and eager needs nothing it adds.
        level_mask, pos = _sine_masks_pos_impl(*args)
    return level_mask, pos.permute(0, 3, 1, 2)
