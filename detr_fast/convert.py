"""convert(model): put detr_fast's backbone stage into a model built by the upstream code.

A backbone stage is recognised by its structure, not by where its classes come from:
- a Joiner: an nn.Sequential of exactly two modules, [0] a backbone and [1] a position embedding;
- a backbone: a module with a ``.body`` that is an IntermediateLayerGetter (torchvision's, which
  both DETR and Deformable-DETR use) — inside a Joiner or on its own;
- a sine position embedding: ``num_pos_feats``, ``temperature``, ``normalize`` and ``scale``.

For each stage found, in place:
1. every frozen BatchNorm of another class (upstream DETR's FrozenBatchNorm2d, torchvision.ops'
   one) becomes detr_fast's FrozenBatchNorm2d holding the same buffer tensors, after checking on a
   random input that both compute the same thing;
2. the body is folded (fold_frozen_bn);
3. the backbone's class becomes detr_fast's (Deformable-DETR conventions when it has ``strides`` or
   a list ``num_channels``, else DETR's) — its body, num_channels, strides and parameters (the
   same tensor objects, so an optimizer keeps working) are kept;
4. a sine embedding becomes detr_fast's PositionEmbeddingSine with the same parameters. The
   upstream DETR and Deformable-DETR classes have the same attributes, but Deformable-DETR
   subtracts 0.5 from the cumulative position: the offset is found by running the upstream module
   on a small probe mask and keeping the candidate (offset 0.0 or -0.5) that reproduces it;
5. the Joiner's class becomes detr_fast's Joiner (same two children, same attributes).
Finally the converted stage is run on a small probe batch and compared with what the original stage
returned on it; if the outputs differ, every change to that stage is undone and a warning says so.
Whatever cannot be converted is left as it was, with a warning saying why. Learned position
embeddings are kept as they are (they are not on the hot path).
"""
import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from . import backbone as deformable_conventions
from . import detr as detr_conventions
from .backbone import MaskedBackboneBase
from .folding import count_folded, fold, unfold_frozen_bn
from .frozen_bn import FrozenBatchNorm2d
from .joiner import JoinerBase
from .nested_tensor import NestedTensor
from .position_encoding import PositionEmbeddingSine

logger = logging.getLogger("detr_fast")

_BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
_OFFSET_CANDIDATES = (0.0, -0.5)  # DETR, Deformable-DETR


@dataclass
class ConversionReport:
    """What convert() did: ``swapped`` (one line per change), ``skipped`` (path, reason) pairs,
    ``folded`` (conv + BN pairs now running as one convolution)."""
    swapped: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    folded: int = 0

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        lines = [f"detr_fast.convert: {len(self.swapped)} change(s), {self.folded} conv+BN pairs folded"]
        lines += [f"  swapped: {line}" for line in self.swapped]
        lines += [f"  left as is: {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


def _is_body(module: Any) -> bool:
    return isinstance(module, IntermediateLayerGetter)


def _is_backbone(module: Any) -> bool:
    return isinstance(module, nn.Module) and _is_body(getattr(module, "body", None))


def _is_sine(module: Any) -> bool:
    return isinstance(module, nn.Module) and all(
        hasattr(module, a) for a in ("num_pos_feats", "temperature", "normalize", "scale"))


def _is_position_embedding(module: Any) -> bool:
    return _is_sine(module) or (hasattr(module, "row_embed") and hasattr(module, "col_embed"))


def _is_joiner(module: Any) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2 and _is_backbone(module[0])
            and _is_position_embedding(module[1]))


def _is_foreign_frozen_bn(module: nn.Module) -> bool:
    return (not isinstance(module, FrozenBatchNorm2d) and "frozenbatchnorm" in type(module).__name__.lower()
            and all(isinstance(module._buffers.get(b), Tensor) for b in _BN_BUFFERS)
            and next(module.parameters(recurse=False), None) is None)


def _tolerance(device: torch.device, dtype: torch.dtype) -> float:
    # Relative to the largest output magnitude. float32 on CPU: rounding only; CUDA may run the
    # reference's convolutions in TF32; reduced precision rounds at every layer.
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    return 1e-3 if device.type == "cpu" else 2e-2


def _flatten(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    if hasattr(value, "tensors") and hasattr(value, "mask"):
        return _flatten(value.tensors) + _flatten(value.mask)
    return []


def _same_outputs(before: Any, after: Any, tol: float) -> Optional[str]:
    """None when the two outputs agree, else why not."""
    a, b = _flatten(before), _flatten(after)
    if len(a) != len(b) or not a:
        return f"the output structure changed ({len(a)} tensors before, {len(b)} after)"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i} changed from {tuple(x.shape)} {x.dtype} to {tuple(y.shape)} {y.dtype}"
        if x.dtype == torch.bool:
            if not torch.equal(x, y):
                return f"output mask {i} differs"
            continue
        x, y = x.double(), y.double()
        err = (x - y).abs().max().item()
        if not math.isfinite(err) or err > tol * max(x.abs().max().item(), 1e-12):
            return f"output {i} differs (max abs error {err:.3g})"
    return None


def _probe_batch(module: nn.Module) -> NestedTensor:
    """Two small images (the second padded) on the module's device and dtype, with their sizes."""
    p = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=gen).to(device, dtype)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool, device=device)
    mask[1, 70:, :] = True
    mask[1, :, 90:] = True
    images[1][:, mask[1]] = 0
    # With the image sizes, as nested_tensor_from_tensor_list makes them, so that the probe runs
    # the converted stage's common path (rectangular masks) rather than the arbitrary-mask one.
    return NestedTensor(images, mask, torch.tensor([[96, 128], [70, 90]]))


def _run_probe(stage: nn.Module, batch: NestedTensor) -> Any:
    modes = [(m, m.training) for m in stage.modules()]
    try:
        stage.eval()  # no running statistics may change because of a probe
        with torch.no_grad():
            return stage(batch)
    finally:
        for m, mode in modes:
            m.training = mode


class _Undo:
    def __init__(self) -> None:
        self.steps: List[Callable[[], None]] = []

    def class_swap(self, module: nn.Module, cls: type) -> None:
        old = module.__class__
        module.__class__ = cls
        self.steps.append(lambda: setattr(module, "__class__", old))

    def child_swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = new
        self.steps.append(lambda: parent._modules.__setitem__(name, old))

    def set_attr(self, module: nn.Module, name: str, value: Any) -> None:
        self.steps.append(lambda: module.__dict__.pop(name, None))
        setattr(module, name, value)

    def run(self) -> None:
        for step in reversed(self.steps):
            step()


def _replace_frozen_bns(body: nn.Module, path: str, undo: _Undo, report: ConversionReport) -> int:
    n = 0
    for parent_name, parent in list(body.named_modules()):
        for name, child in list(parent.named_children()):
            if not _is_foreign_frozen_bn(child):
                continue
            where = ".".join(p for p in (path, parent_name, name) if p)
            new = FrozenBatchNorm2d(child.weight.shape[0], eps=float(getattr(child, "eps", 1e-5)))
            for b in _BN_BUFFERS:
                setattr(new, b, child._buffers[b])  # the same tensors: nothing copied or detached
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(2, child.weight.shape[0], 3, 2, generator=gen).to(child.weight.device,
                                                                               child.weight.dtype)
            with torch.no_grad():
                why = _same_outputs(child(x), new(x), _tolerance(x.device, x.dtype) * 1e-1)
            if why is not None:
                report.skipped.append((where, f"{type(child).__name__} does not compute a frozen "
                                              f"BatchNorm ({why})"))
                continue
            undo.child_swap(parent, name, new)
            n += 1
    return n


def _backbone_class(backbone: nn.Module) -> type:
    if isinstance(backbone, MaskedBackboneBase):
        return type(backbone)
    if hasattr(backbone, "strides") or isinstance(getattr(backbone, "num_channels", None), list):
        return deformable_conventions.BackboneBase
    return detr_conventions.BackboneBase


def _convert_backbone(backbone: nn.Module, path: str, undo: _Undo, report: ConversionReport) -> None:
    n = _replace_frozen_bns(backbone.body, path + ".body" if path else "body", undo, report)
    if n:
        report.swapped.append(f"{path or '<model>'}: {n} frozen BatchNorm modules -> detr_fast.FrozenBatchNorm2d")
    folded = fold(backbone.body)
    undo.steps.append(lambda: unfold_frozen_bn(backbone.body))
    body_path = path + ".body" if path else "body"
    report.skipped += [(f"{body_path}.{where}", why) for where, why in folded.skipped]
    cls = _backbone_class(backbone)
    if type(backbone) is not cls:
        report.swapped.append(f"{path or '<model>'}: {type(backbone).__name__} -> "
                              f"{cls.__module__}.{cls.__qualname__} (folded body)")
        undo.class_swap(backbone, cls)
    else:
        report.swapped.append(f"{path or '<model>'}: folded the body of {type(backbone).__name__}")


def _find_offset(pos: nn.Module) -> Optional[PositionEmbeddingSine]:
    """detr_fast's PositionEmbeddingSine reproducing ``pos`` on a probe mask, else None."""
    mask = torch.zeros(2, 6, 9, dtype=torch.bool)
    mask[0, 4:, :] = True
    mask[1, :, 5:] = True
    probe = NestedTensor(torch.zeros(2, 1, 6, 9), mask)
    try:
        with torch.no_grad():
            want = pos(probe)
        scale = float(pos.scale) if pos.scale is not None else None
        for offset in _OFFSET_CANDIDATES:
            candidate = PositionEmbeddingSine(int(pos.num_pos_feats), float(pos.temperature), bool(pos.normalize),
                                              scale if pos.normalize else None, offset=offset, backend="auto")
            got = candidate.reference(mask)
            if got.shape == want.shape and torch.allclose(got, want.float(), rtol=1e-5, atol=1e-5):
                return candidate
    except Exception:  # an unusual embedding: not convertible, reported by the caller
        return None
    return None


def _convert_joiner(joiner: nn.Sequential, path: str, undo: _Undo, report: ConversionReport) -> None:
    backbone, pos = joiner[0], joiner[1]
    _convert_backbone(backbone, f"{path}[0]" if path else "[0]", undo, report)
    where = f"{path}[1]" if path else "[1]"
    if isinstance(pos, PositionEmbeddingSine):
        pass
    elif _is_sine(pos):
        new = _find_offset(pos)
        if new is None:
            report.skipped.append((where, f"{type(pos).__name__} matches neither DETR's nor Deformable-DETR's "
                                          "sine embedding on a probe mask; kept"))
        else:
            undo.child_swap(joiner, "1", new)
            report.swapped.append(f"{where}: {type(pos).__name__} -> detr_fast.PositionEmbeddingSine "
                                  f"(offset={new.offset})")
    else:
        report.skipped.append((where, f"{type(pos).__name__} is not a sine embedding; kept as it is"))
    deformable = isinstance(joiner[0], deformable_conventions.BackboneBase)
    cls = deformable_conventions.Joiner if deformable else detr_conventions.Joiner
    if not isinstance(joiner, JoinerBase):
        if deformable:
            for attr in ("strides", "num_channels"):
                if attr not in joiner.__dict__:
                    undo.set_attr(joiner, attr, getattr(joiner[0], attr))
        undo.class_swap(joiner, cls)
        report.swapped.append(f"{path or '<model>'}: Joiner -> {cls.__module__}.{cls.__qualname__}")


def _find_stages(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    stages: List[Tuple[str, nn.Module]] = []
    inside: List[str] = []
    for name, m in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside):
            continue
        if _is_joiner(m) or _is_backbone(m):
            stages.append((name, m))
            inside.append(name)
            if name == "":
                break
    return stages


def convert(model: nn.Module) -> ConversionReport:
    """Swap every backbone stage in ``model`` for detr_fast's, in place; returns what it did.

    ``model``: an upstream DETR / Deformable-DETR model (anything holding a Joiner), a Joiner, a
    Backbone, or detr_fast's own (then the body is folded). Logged at INFO on "detr_fast".
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    stages = _find_stages(model)
    if not stages:
        warnings.warn("detr_fast.convert found no backbone stage (a Joiner: Sequential(backbone with a "
                      "torchvision IntermediateLayerGetter .body, position embedding), or such a "
                      "backbone) in the model; nothing was changed")
        report.skipped.append(("<model>", "no backbone stage found"))
        return report
    for path, stage in stages:
        undo = _Undo()
        before_report = (len(report.swapped), len(report.skipped))
        batch = _probe_batch(stage)
        try:
            expected = _run_probe(stage, batch)
        except Exception as err:
            why = f"it does not run on a probe batch ({type(err).__name__}: {err})"
            report.skipped.append((path or "<model>", why))
            warnings.warn(f"detr_fast.convert left {path or 'the model'} as it was: {why}")
            continue
        try:
            if _is_joiner(stage):
                _convert_joiner(stage, path, undo, report)
            else:
                _convert_backbone(stage, path, undo, report)
            why = _same_outputs(expected, _run_probe(stage, batch), _tolerance(batch.tensors.device,
                                                                              batch.tensors.dtype))
        except Exception as err:
            why = f"the converted stage raised {type(err).__name__}: {err}"
        if why is not None:
            undo.run()
            del report.swapped[before_report[0]:]
            report.skipped.append((path or "<model>", f"conversion undone: on a probe batch {why}"))
            warnings.warn(f"detr_fast.convert left {path or 'the model'} as it was: on a probe batch {why}")
            continue
        report.folded += count_folded(stage)
    for path, why in report.skipped[:]:
        if "conversion undone" not in why and "does not run" not in why:
            warnings.warn(f"detr_fast.convert: {path}: {why}")
    logger.info("%s", report)
    return report
