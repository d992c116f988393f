"""The Joiner: backbone, then per-level masks and position embeddings."""
from typing import List, Tuple

import torch
from torch import Tensor, nn

from .dispatch import compiling
from .nested_tensor import NestedTensor, NestedTensorLike, script_nested_tensor, trusted_image_sizes
from .sine import POS_DTYPES, PositionEmbeddingSine, announce_embedding, compute_levels
from .validation import check_mask, check_nested_tensor


class JoinerBase(nn.Sequential):
    """Backbone then position embedding; returns ([NestedTensor per level], [pos per level]).

    Calls ``self[0]`` once and ``self[1]`` once per level, as the reference does (their forward
    hooks fire as in the reference). With a PositionEmbeddingSine the backbone is told the
    embedding beforehand (detr_fast.sine.levels.announce_embedding), so that each level's mask and pos
    are computed together — one fused kernel launch per level on the kernels, from the image sizes
    alone on the separable CPU fallback — and the embedding returns the pos already computed.
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    @torch.jit.unused
    def __prepare_scriptable__(self) -> "JoinerBase":
        script_nested_tensor()  # so that the scripted module takes detr_fast's NestedTensor too
        return self

    def forward(self, tensor_list: NestedTensorLike) -> Tuple[List[NestedTensor], List[Tensor]]:
        # Scripted: any NestedTensor class with decompose() in (see NestedTensorLike), detr_fast's out.
        if torch.jit.is_scripting():
            return self._levels(tensor_list)
        return self._forward_eager(tensor_list)

    def _levels(self, tensor_list: NestedTensorLike) -> Tuple[List[NestedTensor], List[Tensor]]:
        xs = self[0](tensor_list)
        names = list(xs.keys())
        names.sort()
        out: List[NestedTensor] = []
        pos: List[Tensor] = []
        for name in names:
            x = xs[name]
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos

    @torch.jit.unused
    def _forward_eager(self, tensor_list: NestedTensorLike) -> Tuple[List[NestedTensor], List[Tensor]]:
        check_nested_tensor(tensor_list)
        embedding = self[1]
        # Under torch.compile nothing is announced: the compiler fuses the masks' small ops itself.
        if isinstance(embedding, PositionEmbeddingSine) and type(embedding).forward is PositionEmbeddingSine.forward \
                and not compiling():
            with announce_embedding(self[0], embedding.sine_params(), embedding.backend):
                return self._levels(tensor_list)
        return self._levels(tensor_list)

    @torch.jit.unused
    def masks_and_pos(self, tensor_list: NestedTensor, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """The masks/pos stage alone: for each B x C x h x w feature map, the padding mask of
        ``tensor_list`` nearest-downsampled to h x w (B x h x w bool, bit-identical to the
        reference) and the position embedding of that mask (B x 2F x h x w in the feature's dtype).

        One fused launch per level when the sine embedding runs on the kernels; from the image
        sizes alone on the separable fallback; the reference downsampling plus ``self[1]`` otherwise.
        """
        check_nested_tensor(tensor_list)
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("masks_and_pos needs tensor_list.mask, got a NestedTensor without a mask")
        check_mask(mask, "tensor_list.mask")
        for i, f in enumerate(features):
            if not isinstance(f, Tensor) or f.dim() != 4:
                raise ValueError(f"features[{i}] must be a 4-D (B x C x h x w) tensor, got "
                                 f"{tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}")
            if f.shape[0] != mask.shape[0]:
                raise ValueError(f"features[{i}] has batch {f.shape[0]} but tensor_list.mask has batch "
                                 f"{mask.shape[0]}; expected the same")
        sizes = trusted_image_sizes(tensor_list)
        shapes = [f.shape[-2:] for f in features]
        embedding = self[1]
        if isinstance(embedding, PositionEmbeddingSine) and features:
            # The kernels write pos in the features' dtype directly; the other paths round once.
            dtype = features[0].dtype if features[0].dtype in POS_DTYPES else torch.float32
            levels = compute_levels(mask, sizes, shapes, embedding.sine_params(), embedding.backend, dtype)
            return levels.masks, [p.to(f.dtype) for p, f in zip(levels.pos, features)]
        masks = compute_levels(mask, sizes, shapes, None, "auto").masks
        return masks, [embedding(NestedTensor(f, m)).to(f.dtype) for f, m in zip(features, masks)]
