"""The Joiner: backbone, then per-level masks and position embeddings."""
from typing import List, Tuple

from torch import Tensor, nn

from .nested_tensor import NestedTensor


class JoinerBase(nn.Sequential):
    """Backbone then position embedding; returns ([NestedTensor per level], [pos per level])."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: NestedTensor) -> Tuple[List[NestedTensor], List[Tensor]]:
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
