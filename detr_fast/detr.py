"""DETR's own backbone conventions: layers 1-4 for segmentation, an int num_channels."""
from torch import nn

from .backbone import MaskedBackboneBase
from .joiner import JoinerBase
from .resnet import layer_channels, make_frozen_resnet
from .sine import build_position_encoding


class BackboneBase(MaskedBackboneBase):
    """DETR's BackboneBase: layer1-4 with return_interm_layers, else layer4 alone."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: int, return_interm_layers: bool):
        if return_interm_layers:
            return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
        else:
            return_layers = {"layer4": "0"}
        super().__init__(backbone, train_backbone, return_layers)
        self.num_channels = num_channels


class Backbone(BackboneBase):
    """ResNet backbone with frozen BatchNorm (DETR conventions)."""

    def __init__(self, name: str, train_backbone: bool, return_interm_layers: bool, dilation: bool,
                 *, pretrained: bool = True):
        body = make_frozen_resnet(name, dilation, pretrained)
        super().__init__(body, train_backbone, layer_channels(name)["layer4"], return_interm_layers)


class Joiner(JoinerBase):
    """DETR's Joiner: backbone then position embedding."""


def build_backbone(args) -> Joiner:
    """From args.lr_backbone, masks, backbone, dilation, hidden_dim and position_embedding, as DETR.
    ``args.pretrained`` (default True) is honoured."""
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    backbone = Backbone(args.backbone, train_backbone, bool(args.masks), bool(args.dilation),
                        pretrained=getattr(args, "pretrained", True))
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model
