"""Position embeddings of DETR: the sine one (the kernels' target) and the learned one."""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .dispatch import check_backend, resolve_backend
from .nested_tensor import NestedTensor
from .reference import learned_embedding_reference, sine_embedding_reference


class PositionEmbeddingSine(nn.Module):
    """Sine position embedding of a padding mask, as in DETR (offset=0.0) and Deformable-DETR
    (offset=-0.5, normalize=True).

    forward(NestedTensor) -> B x 2*num_pos_feats x H x W float32, a permuted view of a contiguous
    B x H x W x 2F buffer, exactly like the reference.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: Optional[float] = None, *, offset: float = 0.0, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(num_pos_feats, int) or isinstance(num_pos_feats, bool) or num_pos_feats <= 0 \
                or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even int, got {num_pos_feats!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_pos_feats = num_pos_feats
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.scale = float(2 * math.pi if scale is None else scale)
        self.offset = float(offset)
        self.eps = float(eps)
        self.backend = check_backend(backend)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs tensor_list.mask, got a NestedTensor without a mask")
        if torch.jit.is_scripting():
            return self.reference(mask)
        if resolve_backend(self.backend, mask.device) == "torch":
            return self.reference(mask)
        return self._forward_triton(tensor_list)

    def reference(self, mask: Tensor) -> Tensor:
        """The reference computation for a B x H x W bool mask."""
        return sine_embedding_reference(mask, self.num_pos_feats, self.temperature, self.normalize,
                                        self.scale, self.offset, self.eps)

    @torch.jit.unused
    def _forward_triton(self, tensor_list: NestedTensor) -> Tensor:
        raise NotImplementedError("backend='triton' for PositionEmbeddingSine is not implemented yet; "
                                  "use backend='torch' or 'auto'")

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}, offset={self.offset}, eps={self.eps}, "
                f"backend={self.backend!r}")


class PositionEmbeddingLearned(nn.Module):
    """Absolute position embedding learned per row and per column (at most 50 of each).

    Takes a NestedTensor (as DETR) or a Tensor (as the seed); returns B x 2F x H x W.
    """

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        if not isinstance(num_pos_feats, int) or isinstance(num_pos_feats, bool) or num_pos_feats <= 0:
            raise ValueError(f"num_pos_feats must be a positive int, got {num_pos_feats!r}")
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: Union[NestedTensor, Tensor]) -> Tensor:
        if isinstance(tensor_list, NestedTensor):
            x = tensor_list.tensors
        else:
            x = tensor_list
        h, w = x.shape[-2], x.shape[-1]
        if h > 50 or w > 50:
            raise ValueError("PositionEmbeddingLearned supports feature maps of at most 50 x 50 "
                             "(its embedding tables have 50 rows and 50 columns)")
        return learned_embedding_reference(self.row_embed.weight, self.col_embed.weight, x.shape[0], h, w)


def build_position_encoding(args) -> nn.Module:
    """From args.hidden_dim and args.position_embedding ('v2'/'sine' or 'v3'/'learned')."""
    hidden_dim = getattr(args, "hidden_dim", None)
    if not isinstance(hidden_dim, int) or hidden_dim <= 0 or hidden_dim % 2 != 0:
        raise ValueError(f"args.hidden_dim must be a positive even int, got {hidden_dim!r}")
    n_steps = hidden_dim // 2
    kind = getattr(args, "position_embedding", None)
    if kind in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True)
    if kind in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"args.position_embedding must be one of 'v2', 'sine', 'v3', 'learned', got {kind!r}")
