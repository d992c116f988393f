"""The masks/pos step: each feature level's padding mask and sine position embedding.

Data path: pad -> body -> **masks -> pos**. From the padded batch's mask (B x H x W, True = padding),
each image's valid (h, w) when known, and the levels' sizes, ``compute_levels`` returns per level
the nearest-downsampled mask (bit-identical to the reference's F.interpolate) and the
B x 2F x h x w embedding. It decides once per call which path runs (dispatch.sine_path):

- "triton": the fused kernel, one launch per level writing mask and pos (with image sizes the
  full-resolution mask is never read and nothing synchronizes);
- "separable": the PyTorch fallback for rectangular masks (sizes given, or found on a CPU mask):
  each level's extents follow from the sizes, pos from per-row/per-column values;
- "reference": the reference formulas (asked for, exporting, compiling, or a mask that is not a
  top-left rectangle per image off the kernels).

Its callers: MaskedBackboneBase.forward (the masks), PositionEmbeddingSine.forward and
sine_position_embedding (one level whose mask is at its own size), JoinerBase.masks_and_pos.

The Joiner calls its backbone and then its embedding once per level, as the reference does (so
forward hooks on both fire as in the reference). To keep one launch per level for both, it first
announces its embedding (``announce_embedding``) for the duration of its forward: the backbone then
computes each level's pos together with its mask, and the embedding, called with that very mask
(same tensor, unmodified), returns the pos already computed. The announcement is thread-local.
"""
import contextlib
import threading
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..dispatch import sine_path
from ..validation import check_image_sizes
from .custom_op import sine_masks_pos
from .params import SineParams
from .reference import downsample_mask_reference, sine_embedding_reference
from .separable import level_sizes, rectangle_mask, rectangle_sizes, sine_embedding_separable

POS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Levels(NamedTuple):
    masks: List[Tensor]                 # B x h x w bool per level (empty when not asked for)
    pos: Optional[List[Tensor]]         # B x 2F x h x w per level, or None without SineParams
    sizes: Optional[List[Tensor]]       # each level's valid (h, w) (CPU int64 B x 2) when known on the host


def compute_levels(mask: Tensor, image_sizes: Optional[Tensor], level_hw: Sequence[Tuple[int, int]],
                   params: Optional[SineParams], backend: str, dtype: torch.dtype = torch.float32,
                   need_masks: bool = True) -> Levels:
    """Masks (and, with ``params``, pos in ``dtype``, computed in float32 and rounded once) of the
    levels of sizes ``level_hw`` for a checked B x H x W bool ``mask``.

    ``image_sizes``: each image's valid (h, w) if the mask is known to be that top-left
    rectangle (integer B x 2), else None. A level the size of the mask gets the mask itself.
    """
    if dtype not in POS_DTYPES:
        raise ValueError(f"dtype must be one of {POS_DTYPES}, got {dtype}")
    if image_sizes is not None:
        check_image_sizes(image_sizes, mask)
    in_hw = (int(mask.shape[1]), int(mask.shape[2]))
    level_hw = [(int(h), int(w)) for h, w in level_hw]
    path = sine_path(backend, mask.device)
    if path == "triton" and params is not None:
        return _kernel_levels(mask, image_sizes, level_hw, params, dtype, need_masks)
    sizes = image_sizes
    if path == "separable" and sizes is None and mask.device.type == "cpu":
        sizes = rectangle_sizes(mask)  # cheap on the host; on a GPU it would synchronize
    if path == "separable" and sizes is not None:
        extents = [sizes if hw == in_hw else level_sizes(sizes, in_hw, hw) for hw in level_hw]
        masks = [rectangle_mask(e, h, w, mask.device) for e, (h, w) in zip(extents, level_hw)] if need_masks else []
        pos = None
        if params is not None:
            pos = [sine_embedding_separable(e, h, w, params, mask.device).to(dtype)
                   for e, (h, w) in zip(extents, level_hw)]
        return Levels(masks, pos, extents)
    level_masks = [mask if hw == in_hw else downsample_mask_reference(mask, list(hw)) for hw in level_hw]
    pos = None if params is None else [sine_embedding_reference(m, params).to(dtype) for m in level_masks]
    return Levels(level_masks if need_masks else [], pos, None)


def _kernel_levels(mask: Tensor, image_sizes: Optional[Tensor], level_hw: List[Tuple[int, int]],
                   params: SineParams, dtype: torch.dtype, need_masks: bool) -> Levels:
    if image_sizes is not None and image_sizes.device != mask.device:
        # One host->device copy for all levels (asynchronous: no synchronization).
        image_sizes = image_sizes.to(mask.device, non_blocking=True)
    masks: List[Tensor] = []
    pos: List[Tensor] = []
    for h, w in level_hw:
        m, p = sine_masks_pos(mask, image_sizes, h, w, params, dtype, need_masks)
        if need_masks:
            masks.append(m)
        pos.append(p)
    return Levels(masks, pos, None)


# ---------------------------------------------------------------- the Joiner's announcement

class _Announcement:
    """The Joiner's embedding, announced to its backbone, and the pos the backbone computed."""

    def __init__(self, backbone: nn.Module, params: SineParams, backend: str):
        self.backbone = backbone
        self.params = params
        self.backend = backend
        self.computed: List[Tuple[Tensor, int, Tensor]] = []  # (level mask, its version, pos)


_local = threading.local()


@contextlib.contextmanager
def announce_embedding(backbone: nn.Module, params: SineParams, backend: str) -> Iterator[None]:
    """While open (in this thread), ``backbone`` computes the levels' pos with their masks."""
    previous = getattr(_local, "announcement", None)
    _local.announcement = _Announcement(backbone, params, backend)
    try:
        yield
    finally:
        _local.announcement = previous


def announced_for(backbone: nn.Module) -> Optional[_Announcement]:
    """The open announcement addressed to ``backbone``, if any."""
    announcement = getattr(_local, "announcement", None)
    return announcement if announcement is not None and announcement.backbone is backbone else None


def remember_pos(announcement: _Announcement, masks: List[Tensor], pos: List[Tensor]) -> None:
    announcement.computed.extend((m, _version(m), p) for m, p in zip(masks, pos))


def precomputed_pos(mask: Tensor, params: SineParams, backend: str) -> Optional[Tensor]:
    """The pos computed with ``mask`` under the open announcement, if the embedding asking is the
    announced one (same parameters and backend) and the mask is that very, unmodified tensor."""
    announcement = getattr(_local, "announcement", None)
    if announcement is None or announcement.params != params or announcement.backend != backend:
        return None
    for level_mask, version, pos in announcement.computed:
        if level_mask is mask and _version(mask) == version:
            return pos
    return None


def _version(t: Tensor) -> int:
    # Inference tensors keep no version counter (an in-place edit between the backbone and the
    # embedding, e.g. by a hook, cannot be seen under torch.inference_mode).
    return 0 if t.is_inference() else int(t._version)
