"""The ResNet body shared by both conventions: torchvision's ResNet with FrozenBatchNorm2d."""
import http.client
from typing import Dict

import torchvision
from torch import nn

from .fold import FrozenBatchNorm2d

RESNET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                "wide_resnet50_2", "wide_resnet101_2")
_BASIC_BLOCK_NAMES = ("resnet18", "resnet34")
TRAINABLE_LAYERS = ("layer2", "layer3", "layer4")


def layer_channels(name: str) -> Dict[str, int]:
    """Output channels of layer1..layer4 for a torchvision ResNet name."""
    expansion = 1 if name in _BASIC_BLOCK_NAMES else 4
    return {f"layer{i + 1}": 64 * 2 ** i * expansion for i in range(4)}


def make_frozen_resnet(name: str, dilation: bool, pretrained: bool) -> nn.Module:
    """torchvision's ResNet ``name`` with FrozenBatchNorm2d, ImageNet weights when pretrained."""
    if name not in RESNET_NAMES:
        raise ValueError(f"name must be one of {RESNET_NAMES}, got {name!r}")
    if not isinstance(dilation, bool):
        raise TypeError(f"dilation must be a bool, got {type(dilation).__name__}")
    if dilation and name in _BASIC_BLOCK_NAMES:
        # torchvision's BasicBlock raises NotImplementedError deep inside the constructor; say why here.
        raise ValueError(f"dilation=True needs a bottleneck ResNet (resnet50 or deeper), got name={name!r}: "
                         "torchvision's BasicBlock (resnet18/resnet34) does not support dilation")
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return torchvision.models.get_model(name, weights=weights,
                                            replace_stride_with_dilation=[False, False, dilation],
                                            norm_layer=FrozenBatchNorm2d)
    except (OSError, RuntimeError, http.client.HTTPException) as err:
        # OSError covers URLError and socket errors; a cut download raises http.client.IncompleteRead.
        if weights is None:
            raise
        raise RuntimeError(
            f"could not load torchvision's ImageNet weights for {name} ({weights.url}): {err}. "
            "Offline, pass pretrained=False and load a checkpoint with load_state_dict, or put the "
            "file in torch.hub's cache (TORCH_HOME)") from err


def freeze_parameters(backbone: nn.Module, train_backbone: bool) -> None:
    """The reference's requires_grad pattern: only layer2-4 train, and only with train_backbone."""
    for name, parameter in backbone.named_parameters():
        if not train_backbone or not any(layer in name for layer in TRAINABLE_LAYERS):
            parameter.requires_grad_(False)
