"""fold_frozen_bn: run every conv + FrozenBatchNorm2d pair of a ResNet body as one convolution.

The modules are changed in place by swapping their class for a subclass whose forward calls the
folded convolutions (detr_fast.fused_conv.conv_bn). Nothing is renamed, added or removed: every
conv and BN stays a child under its own name, so the state_dict keys, shapes and values are the
reference's and checkpoints load both ways. The folded weights are derived at run time (see
fused_conv), so a checkpoint loaded or a parameter changed after folding takes effect.

What is folded: torchvision's Bottleneck and BasicBlock (conv1/bn1, conv2/bn2, conv3/bn3 and a
downsample Sequential(conv, bn)), the stem (conv1/bn1/relu) at the top of an
IntermediateLayerGetter or a torchvision ResNet. Blocks of other classes, or with a norm layer that
is not detr_fast's FrozenBatchNorm2d, are left as they are (a warning lists them);
detr_fast.convert() first replaces other frozen BN classes by detr_fast's.
"""
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .fused_conv import clear_fold_cache, conv_bn, foldable, memory_format_of

logger = logging.getLogger("detr_fast")

_STEM_ATTR = "_detr_fast_stem"
_CHANNELS_LAST_ATTR = "_detr_fast_channels_last"


def _downsample(downsample: Optional[nn.Module], x: Tensor) -> Tensor:
    if downsample is None:
        return x
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and foldable(downsample[0], downsample[1]):
        return conv_bn(x, downsample[0], downsample[1])
    return downsample(x)


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck with each conv + frozen BN folded; the last conv's epilogue adds the
    residual and applies the ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        identity = _downsample(self.downsample, x)
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=True)
        return conv_bn(out, self.conv3, self.bn3, relu=True, residual=identity)


class FoldedBasicBlock(BasicBlock):
    """torchvision's BasicBlock (resnet18/34) with each conv + frozen BN folded."""

    def forward(self, x: Tensor) -> Tensor:
        identity = _downsample(self.downsample, x)
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        return conv_bn(out, self.conv2, self.bn2, relu=True, residual=identity)


def _stem_plan(children: "OrderedDict[str, nn.Module]", returned: List[str]) -> Optional[Tuple[str, str, str]]:
    """(conv, bn, relu) names of a foldable stem at the top of ``children``, else None."""
    names = list(children.keys())
    if names[:3] != ["conv1", "bn1", "relu"] or any(n in returned for n in ("conv1", "bn1")):
        return None
    if not foldable(children["conv1"], children["bn1"]) or type(children["relu"]) is not nn.ReLU:
        return None
    return ("conv1", "bn1", "relu")


def _enter(module: nn.Module, x: Tensor) -> Tensor:
    if module.__dict__.get(_CHANNELS_LAST_ATTR, False) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _leave(y: Tensor, like: torch.memory_format, bn_dtype: Optional[torch.dtype]) -> Tensor:
    # Memory format in = memory format out: a caller who passes NCHW-contiguous images gets
    # NCHW-contiguous features, like the reference (code downstream may .view() them).
    y = y.contiguous(memory_format=like)
    # The reference's last op per layer is its frozen BN, whose buffers promote the conv's output:
    # under autocast its features are float32, not bf16/fp16. Return the same dtype, so that the
    # features and the pos (cast to the features' dtype by the Joiner) match the reference's.
    if bn_dtype is not None:
        y = y.to(torch.promote_types(y.dtype, bn_dtype))
    return y


def _bn_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the body's frozen BN buffers (the first buffer), or None without buffers."""
    for buf in module.buffers():
        return buf.dtype if buf.is_floating_point() else None
    return None


class FoldedIntermediateLayerGetter(IntermediateLayerGetter):
    """IntermediateLayerGetter whose stem conv1/bn1/relu runs as one folded convolution."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        like = memory_format_of(x)
        bn_dtype = _bn_dtype(self)
        x = _enter(self, x)
        stem = self.__dict__.get(_STEM_ATTR)
        out: Dict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            if stem is not None and name in stem[1:]:
                continue  # consumed by the folded stem convolution
            if stem is not None and name == stem[0]:
                x = conv_bn(x, self[stem[0]], self[stem[1]], relu=True)
            else:
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = _leave(x, like, bn_dtype)
        return out


class FoldedResNet(ResNet):
    """torchvision's ResNet whose stem conv1/bn1/relu runs as one folded convolution."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = _enter(self, x)
        if self.__dict__.get(_STEM_ATTR) is not None:
            x = conv_bn(x, self.conv1, self.bn1, relu=True)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_BLOCKS = {Bottleneck: FoldedBottleneck, BasicBlock: FoldedBasicBlock}
_BLOCK_PAIRS = {Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
                BasicBlock: (("conv1", "bn1"), ("conv2", "bn2"))}


def _block_foldable(block: nn.Module, base: type) -> bool:
    if type(block.relu) is not nn.ReLU:
        return False
    if not all(foldable(getattr(block, c), getattr(block, b)) for c, b in _BLOCK_PAIRS[base]):
        return False
    ds = block.downsample
    return ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 2 and foldable(ds[0], ds[1]))


@dataclass
class FoldResult:
    """What a fold did: ``pairs`` conv + BN pairs now run as one convolution (in ``blocks``
    residual blocks and ``stems`` stems); ``skipped`` lists (module path, why not)."""
    blocks: int = 0
    stems: int = 0
    pairs: int = 0
    skipped: List[Tuple[str, str]] = field(default_factory=list)


_UNFOLDABLE = "not torchvision's block with nn.Conv2d + detr_fast FrozenBatchNorm2d + nn.ReLU"


def fold(module: nn.Module, channels_last: bool = True) -> FoldResult:
    """fold_frozen_bn's work, without warnings: returns what was folded and what was not."""
    result = FoldResult()
    for name, m in module.named_modules():
        base = next((b for b in _BLOCKS if type(m) in (b, _BLOCKS[b])), None)
        if base is not None:
            if _block_foldable(m, base):
                m.__class__ = _BLOCKS[base]
                result.blocks += 1
            else:
                m.__class__ = base  # unfold a block that can no longer be folded
                result.skipped.append((name or type(m).__name__, _UNFOLDABLE))
        elif type(m) in (IntermediateLayerGetter, FoldedIntermediateLayerGetter, ResNet, FoldedResNet):
            if type(m) in (IntermediateLayerGetter, FoldedIntermediateLayerGetter):
                plan = _stem_plan(OrderedDict(m.items()), list(m.return_layers))
                m.__class__ = FoldedIntermediateLayerGetter
            else:
                children = OrderedDict(m.named_children())
                plan = _stem_plan(children, [])
                m.__class__ = FoldedResNet
            m.__dict__[_STEM_ATTR] = plan
            m.__dict__[_CHANNELS_LAST_ATTR] = channels_last
            result.stems += plan is not None
            if plan is None and "conv1" in dict(m.named_children()):
                result.skipped.append(((name + ".conv1") if name else "conv1", _UNFOLDABLE))
    result.pairs = count_folded(module)
    logger.info("fold_frozen_bn: folded %d residual blocks and %d stems", result.blocks, result.stems)
    return result


def fold_frozen_bn(module: nn.Module, *, channels_last: Optional[bool] = None) -> nn.Module:
    """Fold every conv + FrozenBatchNorm2d pair under ``module`` into one convolution, in place.

    ``module`` may be a detr_fast or upstream Backbone/Joiner, a body (IntermediateLayerGetter) or
    a torchvision ResNet with detr_fast's FrozenBatchNorm2d. ``channels_last`` (default: True)
    runs the folded body in channels_last; its outputs keep the input's memory format. Returns
    ``module``. Idempotent. The state_dict is unchanged. Warns about what it left unfolded, and
    when it found nothing to fold.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool or None, got {type(channels_last).__name__}")
    # channels_last is what the tensor cores and oneDNN's fused post-ops want; it measured faster
    # on CPU (README: "Backbone folding and convert()").
    result = fold(module, True if channels_last is None else channels_last)
    if result.skipped:
        warnings.warn("detr_fast.fold_frozen_bn left these unfolded: "
                      + "; ".join(f"{path} ({why})" for path, why in result.skipped))
    elif result.pairs == 0:
        warnings.warn(f"detr_fast.fold_frozen_bn found no conv + FrozenBatchNorm2d pair to fold in "
                      f"{type(module).__name__}; nothing was changed (detr_fast.convert() recognises "
                      f"more model families)")
    return module


def unfold_frozen_bn(module: nn.Module) -> nn.Module:
    """Undo fold_frozen_bn in place: the reference classes and forwards come back."""
    reverse = {FoldedBottleneck: Bottleneck, FoldedBasicBlock: BasicBlock,
               FoldedIntermediateLayerGetter: IntermediateLayerGetter, FoldedResNet: ResNet}
    for m in module.modules():
        if type(m) in reverse:
            m.__class__ = reverse[type(m)]
            m.__dict__.pop(_STEM_ATTR, None)
            m.__dict__.pop(_CHANNELS_LAST_ATTR, None)
    clear_fold_cache(module)
    return module


def count_folded(module: nn.Module) -> int:
    """How many conv + BN pairs under ``module`` run folded."""
    n = 0
    for m in module.modules():
        if type(m) in (FoldedBottleneck, FoldedBasicBlock):
            n += len(_BLOCK_PAIRS[Bottleneck if type(m) is FoldedBottleneck else BasicBlock])
            n += m.downsample is not None
        elif type(m) in (FoldedIntermediateLayerGetter, FoldedResNet) and m.__dict__.get(_STEM_ATTR):
            n += 1
    return n
