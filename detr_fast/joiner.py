"""The Joiner: backbone, then per-level masks and position embeddings."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .nested_tensor import NestedTensor


class JoinerBase(nn.Sequential):
    """Backbone then position embedding; returns ([NestedTensor per level], [pos per level]).

    With a PositionEmbeddingSine whose backend resolves to the kernels (CUDA, or backend="triton")
    and a MaskedBackboneBase backbone, each level's downsampled mask and position embedding come
    from one fused kernel launch (``masks_and_pos``) instead of the backbone downsampling the mask
    and the embedding recomputing from it. On the separable PyTorch fallback (backend "auto" on
    CPU) with a padded batch's image sizes, each level's mask and pos come from the sizes alone.
    TorchScript, tracing, backend="torch", the learned embedding and other backbones take the
    generic path, which is the reference computation.
    """

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        if not torch.jit.is_scripting():
            if self._fuses_masks_and_pos(tensor_list):
                return self._forward_fused(tensor_list)
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
    def masks_and_pos(self, tensor_list: NestedTensor, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """The masks/pos stage alone: for each B x C x h x w feature map, the padding mask of
        ``tensor_list`` nearest-downsampled to h x w (B x h x w bool, bit-identical to the
        reference) and the position embedding of that mask (B x 2F x h x w in the feature's dtype).

        One fused launch per level when the embedding runs on the kernels (sine embedding); from
        the image sizes alone on the separable fallback; the reference downsampling plus
        ``self[1]`` otherwise.
        """
        from .position_encoding import PositionEmbeddingSine, check_image_sizes, check_mask, rectangular_sizes
        from .reference import downsample_mask_reference
        from .sine_separable import level_sizes, rectangle_mask

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
        embedding = self[1]
        if isinstance(embedding, PositionEmbeddingSine) and embedding.uses_kernels(mask.device):
            from .ops import sine_masks_pos
            sizes: Optional[Tensor] = rectangular_sizes(tensor_list)
            if sizes is not None:
                check_image_sizes(sizes, mask, "tensor_list.image_sizes")
                if sizes.device != mask.device:
                    # One host->device copy for all levels (asynchronous: no synchronization).
                    sizes = sizes.to(mask.device, non_blocking=True)
            masks: List[Tensor] = []
            pos: List[Tensor] = []
            for f in features:
                m, p = sine_masks_pos(mask, sizes, int(f.shape[-2]), int(f.shape[-1]), embedding.num_pos_feats,
                                      embedding.temperature, embedding.normalize, embedding.scale,
                                      embedding.offset, embedding.eps, _pos_dtype(f), True)
                masks.append(m)
                pos.append(p if p.dtype == f.dtype else p.to(f.dtype))
            return masks, pos
        sizes = rectangular_sizes(tensor_list)
        if isinstance(embedding, PositionEmbeddingSine) and sizes is not None and embedding.uses_separable(mask.device):
            # The separable fallback: each level's extents follow from the image sizes, so neither
            # the full-resolution mask nor a level mask is read, and pos is written once per level.
            check_image_sizes(sizes, mask, "tensor_list.image_sizes")
            masks = []
            pos = []
            for f in features:
                out_hw = (int(f.shape[-2]), int(f.shape[-1]))
                extents = level_sizes(sizes, (int(mask.shape[1]), int(mask.shape[2])), out_hw)
                masks.append(rectangle_mask(extents, out_hw[0], out_hw[1], mask.device))
                pos.append(embedding.embed(masks[-1], extents, _pos_dtype(f)).to(f.dtype))
            return masks, pos
        masks = [downsample_mask_reference(mask, [int(f.shape[-2]), int(f.shape[-1])]) for f in features]
        pos = [embedding(NestedTensor(f, m)).to(f.dtype) for f, m in zip(features, masks)]
        return masks, pos

    @torch.jit.unused
    def _fuses_masks_and_pos(self, tensor_list: NestedTensor) -> bool:
        from .backbone import MaskedBackboneBase
        from .position_encoding import PositionEmbeddingSine, rectangular_sizes

        backbone, embedding = self[0], self[1]
        return (isinstance(backbone, MaskedBackboneBase)
                and type(backbone).forward is MaskedBackboneBase.forward
                and isinstance(embedding, PositionEmbeddingSine)
                and tensor_list.mask is not None
                and (embedding.uses_kernels(tensor_list.mask.device)
                     or (embedding.uses_separable(tensor_list.mask.device)
                         and rectangular_sizes(tensor_list) is not None)))

    @torch.jit.unused
    def _forward_fused(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
        xs = self[0].body(tensor_list.tensors)
        names = sorted(xs.keys())
        features = [xs[name] for name in names]
        masks, pos = self.masks_and_pos(tensor_list, features)
        return [NestedTensor(f, m) for f, m in zip(features, masks)], pos


def _pos_dtype(feature: Tensor) -> torch.dtype:
    """The reference casts pos to the features' dtype; the kernels write float32/bf16/fp16 directly."""
    if feature.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return feature.dtype
    return torch.float32
