"""detr_fast's modules with the call conventions of transformers' DETR family.

- TransformersSineEmbedding: ``forward(shape, device, dtype, mask=None)`` with the mask True on
  *valid* pixels (DETR, Conditional DETR, Deformable DETR); ``mask=None`` means no padding.
- TransformersSineEmbeddingLegacy: ``forward(pixel_values, pixel_mask)`` (Table Transformer,
  DAB-DETR), float32 whatever the input's dtype.
Both compute with detr_fast's masks/pos step (the kernels on CUDA, the separable fallback on
CPU) in float32 and round once to the requested dtype: in float32 they are bit-identical to
transformers' modules, in bfloat16/float16 more accurate than transformers' own computation in
that dtype. float64 is computed in float64 (by the reference formula).

- The "fast conv encoder" variant of a ``*ConvEncoder`` (its class is swapped, see class_swap):
  the folded body runs in channels_last, and the feature maps come back in the memory format and
  dtype transformers returns them in; the masks are transformers' own computation.
"""
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import check_backend
from ..fold import bn_dtype, enter_layout, memory_format_of, register_variant, restore_layout
from ..sine import POS_DTYPES, SineParams, compute_levels, sine_embedding_reference


def _padding_mask(mask: Tensor) -> Tensor:
    """transformers' masks are True (or 1) on valid pixels; detr_fast's on padding."""
    return ~mask if mask.dtype == torch.bool else mask == 0


def _embedding(padding: Tensor, image_sizes: Optional[Tensor], params: SineParams, backend: str,
               dtype: torch.dtype) -> Tensor:
    if dtype == torch.float64:
        return sine_embedding_reference(padding, params, torch.float64)
    pos_dtype = dtype if dtype in POS_DTYPES else torch.float32
    pos = compute_levels(padding, image_sizes, [tuple(padding.shape[1:])], params, backend, pos_dtype,
                         need_masks=False).pos[0]
    return pos if pos.dtype == dtype else pos.to(dtype)


class _SineModule(nn.Module):
    def __init__(self, params: SineParams, backend: str = "auto", attributes: Optional[Dict[str, Any]] = None):
        super().__init__()
        # The replaced module's own attributes (num_position_features, temperature, ...), so that
        # code reading them keeps working.
        for name, value in (attributes or {}).items():
            setattr(self, name, value)
        self.params = params
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"{self.params}, backend={self.backend!r}"


class TransformersSineEmbedding(_SineModule):
    """transformers' DETR sine embedding: ``forward(shape, device, dtype, mask=None)``."""

    def forward(self, shape: torch.Size, device: Any, dtype: torch.dtype, mask: Optional[Tensor] = None) -> Tensor:
        batch, height, width = int(shape[0]), int(shape[-2]), int(shape[-1])
        if mask is None:
            # No padding: every image is the full rectangle, so nothing needs to be read.
            padding = torch.zeros((), dtype=torch.bool, device=device).expand(batch, height, width)
            sizes = torch.tensor([[height, width]] * batch, dtype=torch.int64)
            return _embedding(padding, sizes, self.params, self.backend, dtype)
        if tuple(mask.shape) != (batch, height, width):
            raise ValueError(f"mask must have shape {(batch, height, width)} to match shape {tuple(shape)}, "
                             f"got {tuple(mask.shape)}")
        return _embedding(_padding_mask(mask), None, self.params, self.backend, dtype)


class TransformersSineEmbeddingLegacy(_SineModule):
    """Table Transformer's / DAB-DETR's sine embedding: ``forward(pixel_values, pixel_mask)``, float32."""

    def forward(self, pixel_values: Tensor, pixel_mask: Optional[Tensor]) -> Tensor:
        if pixel_mask is None:
            raise ValueError("No pixel mask provided")
        return _embedding(_padding_mask(pixel_mask), None, self.params, self.backend, torch.float32)


def fast_conv_encoder_forward(self: nn.Module, pixel_values: Tensor, pixel_mask: Tensor) -> List[Tuple[Tensor, Tensor]]:
    like = memory_format_of(pixel_values)
    body_input = enter_layout(self.model, pixel_values, channels_last=True)  # NCHW while training
    features = self.model(body_input)
    if not isinstance(features, (list, tuple)):
        features = features.feature_maps  # transformers' BackboneOutput
    dtype = bn_dtype(self.model)
    out = []
    for feature_map in features:
        feature_map = restore_layout(feature_map, like, dtype)
        # transformers' own downsampling: at the levels' sizes it is a few small reads.
        mask = F.interpolate(pixel_mask[None].float(), size=feature_map.shape[-2:]).to(torch.bool)[0]
        out.append((feature_map, mask))
    return out


FAST_CONV_ENCODER = register_variant("fast conv encoder", {"forward": fast_conv_encoder_forward})
