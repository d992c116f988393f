"""IDEA-Research's backbone conventions (DINO, DN-DETR, DAB-DETR, Mask DINO, Stable-DINO, Grounding DINO).

The same module names, signatures and state_dict keys as their ``models/dino/backbone.py``, so that
their checkpoints load with ``strict=True``: BackboneBase(backbone, train_backbone, num_channels,
return_interm_indices) picks the layers ``return_interm_indices`` names (DINO 4-scale: [1, 2, 3] =
layer2-4; 5-scale: [0, 1, 2, 3] = layer1-4; [3] = layer4), the Joiner returns each level's pos in
the feature's dtype, and the embedding is PositionEmbeddingSineHW (separate height and width
temperatures). Only the ResNet backbones are built here; a Swin or ConvNeXt model built by their
code can be given to detr_fast.convert(), which replaces its embedding.
"""
import math
from typing import List, Sequence

from torch import nn

from .backbone import MaskedBackboneBase
from .fold import FrozenBatchNorm2d
from .joiner import JoinerBase
from .resnet import layer_channels, make_frozen_resnet
from .sine import PositionEmbeddingLearned, PositionEmbeddingSineHW

__all__ = ["Backbone", "BackboneBase", "Joiner", "PositionEmbeddingSineHW", "build_backbone",
           "build_position_encoding"]

RETURN_INTERM_INDICES = ([0, 1, 2, 3], [1, 2, 3], [3])


def _check_indices(return_interm_indices: Sequence[int], name: str = "return_interm_indices") -> List[int]:
    indices = list(return_interm_indices) if isinstance(return_interm_indices, (list, tuple)) else None
    if indices not in RETURN_INTERM_INDICES:
        raise ValueError(f"{name} must be one of {list(RETURN_INTERM_INDICES)}, got {return_interm_indices!r}")
    return indices


class BackboneBase(MaskedBackboneBase):
    """DINO's BackboneBase: layer{5 - n + i} returned under the name str(return_interm_indices[i])."""

    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: List[int],
                 return_interm_indices: List[int]):
        indices = _check_indices(return_interm_indices)
        return_layers = {f"layer{5 - len(indices) + i}": str(index) for i, index in enumerate(indices)}
        super().__init__(backbone, train_backbone, return_layers)
        self.num_channels = num_channels


class Backbone(BackboneBase):
    """ResNet with frozen BatchNorm, DINO's conventions. DINO accepts resnet50/101; every torchvision
    ResNet detr_fast knows is accepted here, with its own channel counts."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool, return_interm_indices: List[int],
                 batch_norm: type = FrozenBatchNorm2d, *, pretrained: bool = True):
        if batch_norm is not FrozenBatchNorm2d:
            raise ValueError(f"batch_norm must be detr_fast.FrozenBatchNorm2d, got {batch_norm!r}")
        indices = _check_indices(return_interm_indices)
        body = make_frozen_resnet(name, dilation, pretrained)
        channels = list(layer_channels(name).values())
        super().__init__(body, train_backbone, channels[4 - len(indices):], indices)


class Joiner(JoinerBase):
    """DINO's Joiner: backbone then position embedding, each level's pos in its feature's dtype."""


def build_position_encoding(args) -> nn.Module:
    """From args.hidden_dim, position_embedding ('v2'/'sine' or 'v3'/'learned'), pe_temperatureH and
    pe_temperatureW, as DINO (the sine embedding always normalizes)."""
    hidden_dim = getattr(args, "hidden_dim", None)
    if not isinstance(hidden_dim, int) or isinstance(hidden_dim, bool) or hidden_dim <= 0 or hidden_dim % 2 != 0:
        raise ValueError(f"args.hidden_dim must be a positive even int, got {hidden_dim!r}")
    kind = getattr(args, "position_embedding", None)
    if kind in ("v2", "sine"):
        temperatures = []
        for name in ("pe_temperatureH", "pe_temperatureW"):
            value = getattr(args, name, 10000)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"args.{name} must be a positive number, got {value!r}")
            temperatures.append(value)
        return PositionEmbeddingSineHW(hidden_dim // 2, temperatureH=temperatures[0], temperatureW=temperatures[1],
                                       normalize=True)
    if kind in ("v3", "learned"):
        return PositionEmbeddingLearned(hidden_dim // 2)
    raise ValueError(f"args.position_embedding must be one of 'v2', 'sine', 'v3', 'learned', got {kind!r}")


def build_backbone(args) -> Joiner:
    """From args.backbone, lr_backbone (> 0, as DINO requires), return_interm_indices, dilation,
    hidden_dim, position_embedding, pe_temperatureH and pe_temperatureW, as DINO's build_backbone.
    ``args.backbone_freeze_keywords`` is read and, as DINO does for ResNets, not applied (DINO
    applies it to Swin only); ``args.masks`` is not read (return_interm_indices decides the levels).
    ``args.pretrained`` (default True) is honoured."""
    position_embedding = build_position_encoding(args)
    lr_backbone = getattr(args, "lr_backbone", None)
    if isinstance(lr_backbone, bool) or not isinstance(lr_backbone, (int, float)):
        raise ValueError(f"args.lr_backbone must be a number, got {lr_backbone!r}")
    if not lr_backbone > 0:
        raise ValueError(f"Please set lr_backbone > 0 (DINO's backbone always trains), got args.lr_backbone="
                         f"{lr_backbone!r}")
    indices = _check_indices(getattr(args, "return_interm_indices", None), "args.return_interm_indices")
    keywords = getattr(args, "backbone_freeze_keywords", None)
    if keywords is not None and not (isinstance(keywords, (list, tuple)) and all(isinstance(k, str) for k in keywords)):
        raise ValueError(f"args.backbone_freeze_keywords must be None or a list of str, got {keywords!r}")
    name = getattr(args, "backbone", None)
    if not isinstance(name, str) or not name.startswith(("resnet", "resnext", "wide_resnet")):
        raise ValueError(f"args.backbone must be a torchvision ResNet name (detr_fast builds only those; convert() "
                         f"a Swin / ConvNeXt model built by DINO's code instead), got {name!r}")
    backbone = Backbone(name, True, bool(getattr(args, "dilation", False)), indices,
                        pretrained=getattr(args, "pretrained", True))
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model
