"""fold_frozen_bn: run every conv + frozen BatchNorm pair of a backbone as one convolution.

The modules are changed in place by swapping their class for a subclass whose forward calls the
folded convolutions (detr_fast.fold.fused_conv.conv_bn). Nothing is renamed, added or removed: every
conv and BN stays a child under its own name, so the state_dict keys, shapes and values are the
reference's and checkpoints load both ways. The folded weights are derived at run time (see
fused_conv), so a checkpoint loaded or a parameter changed after folding takes effect.

What is folded:
- torchvision's Bottleneck and BasicBlock and the stem (conv1/bn1/relu) at the top of an
  IntermediateLayerGetter or a torchvision ResNet (torchvision_blocks.py: static classes);
- every structure in recipes.RECIPES: timm's ResNet blocks and feature-extractor stem,
  transformers' ResNet, RT-DETR's ResNet-vd and HGNetV2 conv units and residual layers. Each
  module folded by a recipe is first checked, on a small random input, to compute what it did.
Blocks with another norm layer (a trainable nn.BatchNorm2d, another library's frozen BN),
another activation before a residual add, or extra branches are left as they are, with the
reason. detr_fast.convert() first replaces other libraries' frozen BN classes by detr_fast's.
"""
import logging
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import ResNet

from ..validation import check_module
from .cache import clear_fold_cache
from .class_swap import base_class
from .recipes import Recipe, folded_class, folded_recipe, probe_input, recipe_for
from .sequential import FoldedSequential, has_folded_forward
from .torchvision_blocks import (
    BLOCK_PAIRS,
    BLOCKS,
    CHANNELS_LAST_ATTR,
    STEM_ATTR,
    FoldedBasicBlock,
    FoldedBottleneck,
    FoldedIntermediateLayerGetter,
    FoldedResNet,
    block_foldable,
    stem_plan,
)

logger = logging.getLogger("detr_fast")

_CONTAINERS = {IntermediateLayerGetter: FoldedIntermediateLayerGetter, ResNet: FoldedResNet}
_UNFOLD = {**{v: k for k, v in BLOCKS.items()}, **{v: k for k, v in _CONTAINERS.items()}}


@dataclass
class FoldResult:
    """What a fold did: ``pairs`` conv + BN pairs now run as one convolution (in ``blocks``
    residual blocks and ``stems`` stems; ``structures`` counts the folded modules by structure);
    ``skipped`` lists (module path, why not)."""
    blocks: int = 0
    stems: int = 0
    pairs: int = 0
    structures: Dict[str, int] = field(default_factory=dict)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    # Every change made, to undo exactly this fold: (module, its class before, its __dict__
    # entries before for the attributes folding sets).
    changes: List[Tuple[nn.Module, type, Dict[str, Any]]] = field(default_factory=list)

    def undo(self) -> None:
        """Put every module this fold changed back as it was."""
        for module, cls, attrs in reversed(self.changes):
            module.__class__ = cls
            for name, value in attrs.items():
                if value is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    module.__dict__[name] = value
            clear_fold_cache(module)
        self.changes.clear()

    def counted(self, structure: str) -> None:
        self.structures[structure] = self.structures.get(structure, 0) + 1

    def describe_structures(self) -> str:
        """E.g. "16 Bottleneck, 1 torchvision stem": what the folded modules are."""
        return ", ".join(f"{n} {name}" for name, n in self.structures.items())


_MISSING = object()
_UNFOLDABLE = "not torchvision's block with nn.Conv2d + detr_fast FrozenBatchNorm2d + nn.ReLU"


def _set_class(result: FoldResult, module: nn.Module, cls: type, **attrs: Any) -> None:
    """Change ``module``'s class (and private attributes), recording how to undo it."""
    if type(module) is cls and all(module.__dict__.get(k, _MISSING) == v for k, v in attrs.items()):
        return
    result.changes.append((module, type(module), {k: module.__dict__.get(k, _MISSING) for k in attrs}))
    module.__class__ = cls
    module.__dict__.update(attrs)


def _folds_like_before(module: nn.Module, recipe: Recipe) -> bool:
    """Whether ``module`` run with ``recipe``'s methods computes what its own class computes, on a
    small random input (eval mode, no grad): a structure that only looks like a known one fails."""
    folded = folded_class(base_class(module), recipe)
    modes = [(m, m.training) for m in module.modules()]
    original = module.__class__
    try:
        module.eval()
        x = probe_input(module, recipe)
        with torch.no_grad():
            module.__class__ = base_class(module)
            want = module(x)
            module.__class__ = folded
            got = module(x)
    except Exception:  # e.g. a block that needs another input size: not one we know
        return False
    finally:
        module.__class__ = original
        for m, mode in modes:
            m.training = mode
        clear_fold_cache(module)
    return _close(want, got)


def _close(want: Any, got: Any) -> bool:
    """Whether two outputs (a tensor, or a list/tuple/dict of them) agree up to folding's rounding."""
    if isinstance(want, dict) and isinstance(got, dict):
        want, got = list(want.values()), list(got.values())
    if isinstance(want, (list, tuple)) and isinstance(got, (list, tuple)):
        return len(want) == len(got) and all(_close(a, b) for a, b in zip(want, got))
    if not (torch.is_tensor(want) and torch.is_tensor(got)) or want.shape != got.shape:
        return False
    if want.numel() == 0:
        return True
    scale = max(float(want.abs().max()), 1e-12)
    err = float((want.double() - got.double()).abs().max())
    # float32 on CPU: rounding only; CUDA may run the convolutions in TF32, reduced precision rounds.
    tol = 1e-4 if want.dtype == torch.float32 and want.device.type == "cpu" else 2e-2
    return math.isfinite(err) and err <= tol * scale


def fold(module: nn.Module, channels_last: bool = True) -> FoldResult:
    """fold_frozen_bn's work, without warnings: returns what was folded and what was not. All or
    nothing: interrupted by any exception (a failing probe, Ctrl-C), it undoes what it changed."""
    result = FoldResult()
    try:
        _fold_into(module, channels_last, result)
    except BaseException:
        result.undo()
        raise
    logger.info("fold_frozen_bn: folded %d residual blocks and %d stems (%d conv+BN pairs)",
                result.blocks, result.stems, result.pairs)
    return result


def _fold_into(module: nn.Module, channels_last: bool, result: FoldResult) -> None:
    for name, m in module.named_modules():
        where = name or type(m).__name__
        base = next((b for b in BLOCKS if type(m) in (b, BLOCKS[b])), None)
        container = next((c for c in _CONTAINERS if type(m) in (c, _CONTAINERS[c])), None)
        if base is not None:
            if block_foldable(m, base):
                _set_class(result, m, BLOCKS[base])
                result.blocks += 1
                result.counted(base.__name__)
            else:
                _set_class(result, m, base)  # unfold a block that can no longer be folded
                result.skipped.append((where, _UNFOLDABLE))
        elif container is not None:
            if container is IntermediateLayerGetter:
                plan = stem_plan(OrderedDict(m.items()), list(m.return_layers))
            else:
                plan = stem_plan(OrderedDict(m.named_children()), [])
            _set_class(result, m, _CONTAINERS[container], **{STEM_ATTR: plan, CHANNELS_LAST_ATTR: channels_last})
            if plan is not None:
                result.stems += 1
                result.counted("torchvision stem")
            if plan is None and "conv1" in dict(m.named_children()):
                result.skipped.append(((name + ".conv1") if name else "conv1", _UNFOLDABLE))
        else:
            _fold_by_recipe(m, where, result)
    for m in module.modules():
        # A layer of folded blocks lets each block write into its input when that is private.
        if type(m) in (nn.Sequential, FoldedSequential):
            all_folded = len(m) > 0 and all(has_folded_forward(block) for block in m)
            _set_class(result, m, FoldedSequential if all_folded else nn.Sequential)
    result.pairs = count_folded(module)


def _fold_by_recipe(m: nn.Module, where: str, result: FoldResult) -> None:
    recipe = recipe_for(m)
    if recipe is None:
        if folded_recipe(m) is not None:  # edited since it was folded: no longer what its recipe knows
            _set_class(result, m, base_class(m))
        return
    problem = recipe.why_not(m)
    if problem is None and folded_recipe(m) is not recipe and not _folds_like_before(m, recipe):
        problem = "folded, it would not compute what it does now (checked on a random input)"
    if problem is not None:
        _set_class(result, m, base_class(m))  # unfold a module that can no longer be folded
        result.skipped.append((where, problem))
        return
    _set_class(result, m, folded_class(base_class(m), recipe))
    result.counted(recipe.name)
    if recipe.kind == "stem":
        result.stems += 1
    elif recipe.kind == "block":
        result.blocks += 1


def fold_frozen_bn(module: nn.Module, *, channels_last: Optional[bool] = None) -> nn.Module:
    """Fold every conv + FrozenBatchNorm2d pair under ``module`` into one convolution, in place.

    ``module`` may be a detr_fast or upstream Backbone/Joiner, a body (IntermediateLayerGetter) or
    a torchvision ResNet with detr_fast's FrozenBatchNorm2d. ``channels_last`` (default: True)
    runs the folded body in channels_last; its outputs keep the input's memory format. Returns
    ``module``. Idempotent. The state_dict is unchanged. Warns about what it left unfolded, and
    when it found nothing to fold.
    """
    check_module(module)
    if channels_last is not None and not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool or None, got {type(channels_last).__name__}")
    # channels_last is what the tensor cores and oneDNN's fused post-ops want; it measured faster
    # on CPU (docs/folding.md).
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
    """Undo every fold under ``module`` in place: the reference classes and forwards come back."""
    check_module(module)
    for m in module.modules():
        if type(m) is FoldedSequential:
            m.__class__ = nn.Sequential
        elif type(m) in _UNFOLD:
            m.__class__ = _UNFOLD[type(m)]
            m.__dict__.pop(STEM_ATTR, None)
            m.__dict__.pop(CHANNELS_LAST_ATTR, None)
        elif folded_recipe(m) is not None:
            m.__class__ = base_class(m)
    clear_fold_cache(module)
    return module


def count_folded(module: nn.Module) -> int:
    """How many conv + BN pairs under ``module`` run folded."""
    convs = set()
    for m in module.modules():
        if type(m) in (FoldedBottleneck, FoldedBasicBlock):
            pairs = BLOCK_PAIRS[_UNFOLD[type(m)]]
            convs.update(id(getattr(m, conv)) for conv, _ in pairs)
            if m.downsample is not None:
                convs.add(id(m.downsample[0]))
        elif type(m) in (FoldedIntermediateLayerGetter, FoldedResNet) and m.__dict__.get(STEM_ATTR):
            convs.add(id(getattr(m, m.__dict__[STEM_ATTR][0])))
        elif folded_recipe(m) is not None:
            convs.update(id(c) for c in folded_recipe(m).folded_convs(m))
    return len(convs)
