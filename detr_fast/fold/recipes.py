"""Fold recipes: how a residual block or conv unit of another library runs with its BN folded.

Each recipe is one table entry: it recognises a module by its structure (attribute names and
types, never the class's name or package), says why a matching module cannot be folded (or None),
lists the convolutions it folds and gives the methods that replace the module's own. folding.fold()
swaps a matching module's class for a subclass holding those methods (``folded_class``) and first
checks, on a random input, that the subclass computes what the original did.

The recipes cover timm's ResNet (Bottleneck, BasicBlock and the FeatureListNet stem, what
transformers' DETR family builds by default), transformers' own ResNet and RT-DETR's ResNet-vd
(residual layers of conv units) and HGNetV2 (conv units with a learnable affine after the
activation; its stem and basic layer convolve their concatenations piece by piece where they are
large). torchvision's blocks have static classes in folding.py (they must stay scriptable).
"""
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .class_swap import register_variant, swapped_class, variant_of
from .frozen_bn import FrozenBatchNorm2d
from .fused_conv import conv_bn, conv_bn_pieces, foldable
from .sequential import private_output
from .torchvision_blocks import shortcut


@dataclass(frozen=True)
class Recipe:
    name: str
    matches: Callable[[nn.Module], bool]
    why_not: Callable[[nn.Module], Optional[str]]
    folded_convs: Callable[[nn.Module], List[nn.Conv2d]]
    in_channels: Callable[[nn.Module], int]
    methods: Dict[str, Callable]
    kind: str = "block"  # what FoldResult counts it as: "block", "stem" or "unit"


def _is_identity(module: Optional[nn.Module]) -> bool:
    return module is None or type(module) is nn.Identity


def _pair_problem(conv: nn.Module, bn: nn.Module, where: str) -> Optional[str]:
    if foldable(conv, bn):
        return None
    if isinstance(bn, nn.BatchNorm2d):
        return f"{where}: its norm is a trainable nn.BatchNorm2d, not a frozen BatchNorm"
    if not isinstance(bn, FrozenBatchNorm2d):
        return f"{where}: its norm is {type(bn).__name__}, not a frozen BatchNorm"
    return f"{where}: {type(conv).__name__} is not a plain nn.Conv2d with zero padding"


def _downsample_problem(downsample: Optional[nn.Module]) -> Optional[str]:
    if downsample is None:
        return None
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2:
        return _pair_problem(downsample[0], downsample[1], "downsample")
    return f"downsample is {type(downsample).__name__}, not Sequential(conv, frozen BN)"


def _block_methods(folded_forward: Callable[..., Tensor]) -> Dict[str, Callable]:
    """A residual block's methods: forward, and folded_forward(x, owns_input) for FoldedSequential."""
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return folded_forward(self, x, False)
    return {"forward": forward, "folded_forward": folded_forward}


def _downsample_convs(downsample: Optional[nn.Module]) -> List[nn.Conv2d]:
    return [] if downsample is None else [downsample[0]]


# ---------------------------------------------------------------- timm's ResNet blocks

_TIMM_BLOCK_ATTRS = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "drop_block", "aa", "se", "drop_path",
                     "downsample")


def _timm_block_problem(block: nn.Module, pairs: Tuple[Tuple[str, str], ...]) -> Optional[str]:
    for conv, bn in pairs:
        problem = _pair_problem(getattr(block, conv), getattr(block, bn), conv)
        if problem:
            return problem
    for extra in ("drop_block", "aa", "se", "drop_path"):
        if not _is_identity(getattr(block, extra)):
            return f"{extra} is {type(getattr(block, extra)).__name__}, not absent"
    return _downsample_problem(block.downsample)


_TIMM_BOTTLENECK_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))
_TIMM_BASIC_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))


def _conv_act(x: Tensor, conv: nn.Conv2d, bn: nn.Module, act: Optional[nn.Module],
              residual: Optional[Tensor] = None, reuse_residual: bool = False) -> Tensor:
    """act(bn(conv(x)) (+ residual)): a ReLU in the convolution's epilogue, another activation
    as its own op after the folded convolution."""
    relu = type(act) is nn.ReLU
    y = conv_bn(x, conv, bn, relu=relu, residual=residual, reuse_residual=reuse_residual)
    return y if relu or _is_identity(act) else act(y)


def _timm_bottleneck_forward(self: nn.Module, x: Tensor, owns_input: bool = False) -> Tensor:
    residual, private = shortcut(self.downsample, x, owns_input)
    out = _conv_act(x, self.conv1, self.bn1, self.act1)
    out = _conv_act(out, self.conv2, self.bn2, self.act2)
    return _conv_act(out, self.conv3, self.bn3, self.act3, residual, private)


def _timm_basic_forward(self: nn.Module, x: Tensor, owns_input: bool = False) -> Tensor:
    residual, private = shortcut(self.downsample, x, owns_input)
    out = _conv_act(x, self.conv1, self.bn1, self.act1)
    return _conv_act(out, self.conv2, self.bn2, self.act2, residual, private)


TIMM_BOTTLENECK = Recipe(
    "timm_bottleneck",
    matches=lambda m: all(hasattr(m, a) for a in _TIMM_BLOCK_ATTRS + ("conv3", "bn3", "act3")),
    why_not=lambda m: _timm_block_problem(m, _TIMM_BOTTLENECK_PAIRS),
    folded_convs=lambda m: [m.conv1, m.conv2, m.conv3] + _downsample_convs(m.downsample),
    in_channels=lambda m: m.conv1.in_channels,
    methods=_block_methods(_timm_bottleneck_forward),
)

TIMM_BASIC = Recipe(
    "timm_basic",
    matches=lambda m: all(hasattr(m, a) for a in _TIMM_BLOCK_ATTRS) and not hasattr(m, "conv3"),
    why_not=lambda m: _timm_block_problem(m, _TIMM_BASIC_PAIRS),
    folded_convs=lambda m: [m.conv1, m.conv2] + _downsample_convs(m.downsample),
    in_channels=lambda m: m.conv1.in_channels,
    methods=_block_methods(_timm_basic_forward),
)


# ---------------------------------------------------------------- timm's feature extractor stem

def _is_feature_net(m: nn.Module) -> bool:
    return (isinstance(m, nn.ModuleDict) and isinstance(getattr(m, "return_layers", None), dict)
            and callable(getattr(m, "_collect", None)) and list(m.keys())[:3] == ["conv1", "bn1", "act1"])


def _feature_net_problem(m: nn.Module) -> Optional[str]:
    if getattr(m, "grad_checkpointing", False):
        return "gradient checkpointing is on"
    if any(name in m.return_layers for name in ("conv1", "bn1")):
        return "the stem's convolution or BN is a returned layer"
    return _pair_problem(m["conv1"], m["bn1"], "conv1")


def _feature_net_collect(self: nn.ModuleDict, x: Tensor) -> Dict[str, Tensor]:
    out: Dict[str, Tensor] = OrderedDict()
    for name, module in self.items():
        if name in ("bn1", "act1"):
            continue  # consumed by the folded stem convolution
        x = _conv_act(x, self["conv1"], self["bn1"], self["act1"]) if name == "conv1" else module(x)
        if name in self.return_layers:
            out[self.return_layers[name]] = x
    return out


TIMM_FEATURE_NET = Recipe(
    "timm_feature_net",
    matches=_is_feature_net,
    why_not=_feature_net_problem,
    folded_convs=lambda m: [m["conv1"]],
    in_channels=lambda m: m["conv1"].in_channels,
    methods={"_collect": _feature_net_collect},
    kind="stem",
)


# ---------------------------------------------------------------- conv units and residual layers
# transformers' ResNetConvLayer / ResNetShortCut, RT-DETR's RTDetrResNetConvLayer / ShortCut and
# HGNetV2's ConvLayer: `convolution`, `normalization`, optionally `activation` and then `lab`.

_UNIT_CHILDREN = {"convolution", "normalization", "activation", "lab"}


def _is_conv_unit(m: nn.Module) -> bool:
    children = {name for name, _ in m.named_children()}
    return ({"convolution", "normalization"} <= children <= _UNIT_CHILDREN
            and isinstance(m.convolution, nn.Conv2d))


def _conv_unit_on_pieces(unit: nn.Module, pieces: List[Tensor]) -> Tensor:
    """A folded conv unit applied to torch.cat(pieces, dim=1) (see conv_bn_pieces)."""
    act = getattr(unit, "activation", None)
    relu = type(act) is nn.ReLU
    y = conv_bn_pieces(pieces, unit.convolution, unit.normalization, relu=relu)
    if not relu and not _is_identity(act):
        y = act(y)
    lab = getattr(unit, "lab", None)
    return y if _is_identity(lab) else lab(y)


def _conv_unit_forward(self: nn.Module, x: Tensor) -> Tensor:
    return _conv_unit_on_pieces(self, [x])


CONV_UNIT = Recipe(
    "conv_unit",
    matches=_is_conv_unit,
    why_not=lambda m: _pair_problem(m.convolution, m.normalization, "convolution"),
    folded_convs=lambda m: [m.convolution],
    in_channels=lambda m: m.convolution.in_channels,
    methods={"forward": _conv_unit_forward},
    kind="unit",
)


def _is_residual_layer(m: nn.Module) -> bool:
    layer = getattr(m, "layer", None)
    return (isinstance(getattr(m, "shortcut", None), nn.Module)
            and isinstance(getattr(m, "activation", None), nn.Module)
            and isinstance(layer, nn.Sequential) and len(layer) > 0 and all(_is_conv_unit(u) for u in layer))


def _residual_layer_problem(m: nn.Module) -> Optional[str]:
    last = m.layer[-1]
    if not _is_identity(getattr(last, "activation", None)) or not _is_identity(getattr(last, "lab", None)):
        return "its last conv unit has an activation before the residual add"
    return _pair_problem(last.convolution, last.normalization, "layer's last convolution")


def _residual_layer_forward(self: nn.Module, hidden_state: Tensor, owns_input: bool = False) -> Tensor:
    residual = self.shortcut(hidden_state)
    # A one-unit layer's last convolution reads the block input: never write into what it reads.
    private = (owns_input and len(self.layer) > 1) if residual is hidden_state else private_output(self.shortcut)
    for unit in self.layer[:-1]:
        hidden_state = unit(hidden_state)
    last = self.layer[-1]
    # The residual add (and a ReLU) in the last convolution's epilogue.
    return _conv_act(hidden_state, last.convolution, last.normalization, self.activation, residual, private)


RESIDUAL_LAYER = Recipe(
    "residual_layer",
    matches=_is_residual_layer,
    why_not=_residual_layer_problem,
    folded_convs=lambda m: [m.layer[-1].convolution],
    in_channels=lambda m: m.layer[0].convolution.in_channels,
    methods=_block_methods(_residual_layer_forward),
)

# ---------------------------------------------------------------- HGNetV2's stem
# transformers' HGNetV2Embeddings: stem1, then two branches over its zero-padded output (stem2a ->
# pad -> stem2b, and a 2x2 max pool), concatenated into stem3 -> stem4. Its conv units fold as
# CONV_UNIT; the recipe runs stem3 on the two branches without their concatenation where it would
# be large (conv_bn_pieces; from batch 2 at 640x640).

_HGNET_STEM_UNITS = ("stem1", "stem2a", "stem2b", "stem3", "stem4")


def _is_hgnet_stem(m: nn.Module) -> bool:
    units = [getattr(m, name, None) for name in _HGNET_STEM_UNITS]
    return (all(isinstance(u, nn.Module) and _is_conv_unit(u) for u in units)
            and isinstance(getattr(m, "pool", None), nn.Module)
            and isinstance(getattr(m, "num_channels", None), int))


def _hgnet_stem_problem(m: nn.Module) -> Optional[str]:
    for name in _HGNET_STEM_UNITS:
        unit = getattr(m, name)
        problem = _pair_problem(unit.convolution, unit.normalization, name)
        if problem:
            return problem
    return None


def _hgnet_stem_forward(self: nn.Module, pixel_values: Tensor) -> Tensor:
    if pixel_values.shape[1] != self.num_channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels; the configuration expects "
                         f"{self.num_channels}")
    embedding = F.pad(self.stem1(pixel_values), (0, 1, 0, 1))
    branch = self.stem2b(F.pad(self.stem2a(embedding), (0, 1, 0, 1)))
    return self.stem4(_unit_on_concatenation(self.stem3, [self.pool(embedding), branch]))


def _unit_on_concatenation(unit: nn.Module, pieces: List[Tensor]) -> Tensor:
    """``unit(torch.cat(pieces, dim=1))``; the unit's computation on the pieces (no concatenation
    when it would be large, see conv_bn_pieces) unless a hook would see its input."""
    if folded_recipe(unit) is CONV_UNIT and private_output(unit):  # still the folded unit it was
        return _conv_unit_on_pieces(unit, pieces)
    return unit(torch.cat(pieces, dim=1))


HGNET_STEM = Recipe(
    "hgnet_stem",
    matches=_is_hgnet_stem,
    why_not=_hgnet_stem_problem,
    folded_convs=lambda m: [],  # its conv units fold as CONV_UNIT
    in_channels=lambda m: m.num_channels,
    methods={"forward": _hgnet_stem_forward},
    kind="stem",
)

# ---------------------------------------------------------------- HGNetV2's basic layer
# transformers' HGNetV2BasicLayer: its conv units in a chain, then all their outputs and its input
# concatenated into the aggregation's squeeze (1x1) and excitation units, then the residual add.
# Its conv units fold as CONV_UNIT; the recipe runs the squeeze on the pieces, without the
# concatenation where it would be large (conv_bn_pieces; at 640x640 the first stage's, 34 MB).

def _is_hgnet_layer(m: nn.Module) -> bool:
    layers, aggregation = getattr(m, "layers", None), getattr(m, "aggregation", None)
    return (isinstance(layers, nn.ModuleList) and len(layers) > 0
            and any(isinstance(c, nn.Conv2d) for c in layers[0].modules())
            and isinstance(aggregation, nn.Sequential) and len(aggregation) == 2
            and all(_is_conv_unit(u) for u in aggregation)
            and isinstance(getattr(m, "residual", None), bool) and isinstance(getattr(m, "drop_path", None), nn.Module))


def _hgnet_layer_problem(m: nn.Module) -> Optional[str]:
    for i, unit in enumerate(m.aggregation):
        problem = _pair_problem(unit.convolution, unit.normalization, f"aggregation.{i}")
        if problem:
            return problem
    return None


def _hgnet_layer_forward(self: nn.Module, hidden_state: Tensor) -> Tensor:
    identity = hidden_state
    outputs = [hidden_state]
    for layer in self.layers:
        hidden_state = layer(hidden_state)
        outputs.append(hidden_state)
    if len(self.aggregation) == 2 and private_output(self.aggregation):
        hidden_state = self.aggregation[1](_unit_on_concatenation(self.aggregation[0], outputs))
    else:
        hidden_state = self.aggregation(torch.cat(outputs, dim=1))
    if self.residual:
        hidden_state = self.drop_path(hidden_state) + identity
    return hidden_state


HGNET_LAYER = Recipe(
    "hgnet_layer",
    matches=_is_hgnet_layer,
    why_not=_hgnet_layer_problem,
    folded_convs=lambda m: [],  # its conv units fold as CONV_UNIT
    in_channels=lambda m: next(c for c in m.layers[0].modules() if isinstance(c, nn.Conv2d)).in_channels,
    methods={"forward": _hgnet_layer_forward},
)

RECIPES = (TIMM_BOTTLENECK, TIMM_BASIC, TIMM_FEATURE_NET, RESIDUAL_LAYER, HGNET_STEM, HGNET_LAYER, CONV_UNIT)
_BY_VARIANT = {register_variant(f"folded {r.name}", r.methods): r for r in RECIPES}


def recipe_for(module: nn.Module) -> Optional[Recipe]:
    """The first recipe whose structure ``module`` has (folded or not), else None."""
    return next((r for r in RECIPES if r.matches(module)), None)


def folded_recipe(module: nn.Module) -> Optional[Recipe]:
    """The recipe ``module`` runs folded with, or None when it is not folded by a recipe."""
    return _BY_VARIANT.get(variant_of(module))


def folded_class(base: type, recipe: Recipe) -> type:
    """The subclass of ``base`` running ``recipe``'s methods."""
    return swapped_class(base, f"folded {recipe.name}")


def probe_input(module: nn.Module, recipe: Recipe) -> Tensor:
    """A small random input for checking ``module`` folded against itself unfolded: a few pixels
    (odd and even sides, so strides and padding are exercised) keep the check cheap next to the
    weights' size."""
    weight = next(module.parameters())
    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, recipe.in_channels(module), 6, 5, generator=gen).to(weight.device, weight.dtype)
