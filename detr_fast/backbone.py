"""The seed's (Deformable-DETR's) backbone conventions: layers 2-4, lists of strides and channels.

DETR's own conventions (layers 1-4, an int num_channels) are in detr_fast.detr.
"""
from typing import Dict

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .joiner import JoinerBase
from .nested_tensor import NestedTensor, NestedTensorLike, nested_like, script_nested_tensor, trusted_image_sizes
from .resnet import freeze_parameters, layer_channels, make_frozen_resnet
from .sine import announced_for, build_position_encoding, compute_levels, downsample_mask_reference, remember_pos
from .validation import check_mask, check_nested_tensor


class MaskedBackboneBase(nn.Module):
    """A ResNet body returning the chosen layers, each with its padding mask downsampled."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, return_layers: Dict[str, str]):
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        freeze_parameters(backbone, train_backbone)
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)

    @torch.jit.unused
    def __prepare_scriptable__(self) -> "MaskedBackboneBase":
        script_nested_tensor()  # so that the scripted module takes detr_fast's NestedTensor too
        return self

    def forward(self, tensor_list: NestedTensorLike) -> Dict[str, NestedTensor]:
        # Scripted, any NestedTensor class with decompose() is taken (DETR's own included) and
        # detr_fast's is returned; eager, the caller's class comes back (nested_like).
        if torch.jit.is_scripting():
            tensors, m = tensor_list.decompose()
            xs = self.body(tensors)
            out: Dict[str, NestedTensor] = {}
            for name, x in xs.items():
                if m is None:
                    raise ValueError("the backbone needs tensor_list.mask, got a NestedTensor without a mask")
                out[name] = NestedTensor(x, downsample_mask_reference(m, [x.shape[-2], x.shape[-1]]))
            return out
        return self._forward_eager(tensor_list)

    @torch.jit.unused
    def _forward_eager(self, tensor_list: NestedTensorLike) -> Dict[str, NestedTensor]:
        check_nested_tensor(tensor_list)
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("the backbone needs tensor_list.mask, got a NestedTensor without a mask")
        check_mask(mask, "tensor_list.mask")
        xs: Dict[str, Tensor] = self.body(tensor_list.tensors)
        features = list(xs.values())
        # The masks (and the pos, when the Joiner announced its embedding) of every level at once.
        announcement = announced_for(self)
        levels = compute_levels(mask, trusted_image_sizes(tensor_list), [f.shape[-2:] for f in features],
                                announcement.params if announcement else None,
                                announcement.backend if announcement else "auto")
        if announcement is not None and levels.pos is not None:
            remember_pos(announcement, levels.masks, levels.pos)
        sizes = levels.sizes or [None] * len(features)
        return {name: nested_like(tensor_list, x, m, s) for name, x, m, s in zip(xs, features, levels.masks, sizes)}


class BackboneBase(MaskedBackboneBase):
    """Deformable-DETR's BackboneBase: layer2-4 (strides 8, 16, 32) or layer4 alone (32)."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, return_interm_layers: bool,
                 channels: Dict[str, int] = layer_channels("resnet50")):
        if return_interm_layers:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            strides = [8, 16, 32]
        else:
            return_layers = {"layer4": "0"}
            strides = [32]
        super().__init__(backbone, train_backbone, return_layers)
        self.strides = strides
        self.num_channels = [channels[layer] for layer in return_layers]


class Backbone(BackboneBase):
    """ResNet backbone with frozen BatchNorm (Deformable-DETR conventions)."""

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 *, pretrained: bool = True):
        body = make_frozen_resnet(name, dilation, pretrained)
        super().__init__(body, train_backbone, return_interm_layers, layer_channels(name))
        if dilation:
            self.strides[-1] = self.strides[-1] // 2


class Joiner(JoinerBase):
    """Deformable-DETR's Joiner: also exposes the backbone's strides and num_channels."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels


def build_backbone(args) -> Joiner:
    """From args.lr_backbone, masks, num_feature_levels, backbone, dilation, hidden_dim and
    position_embedding, as Deformable-DETR. ``args.pretrained`` (default True) is honoured."""
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    return_interm_layers = bool(args.masks or (args.num_feature_levels > 1))
    backbone = Backbone(args.backbone, train_backbone, return_interm_layers, bool(args.dilation),
                        pretrained=getattr(args, "pretrained", True))
    return Joiner(backbone, position_embedding)
