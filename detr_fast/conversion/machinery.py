"""The machinery convert() uses for every model family: the report, undo, probes, frozen BN swaps.

A family is a list of StageKinds (upstream.py, transformers.py): how to recognise one of its
stages by structure, what input to probe it with, and how to convert it in place (recording every
change on an Undo). api.py runs them all the same way.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..fold import FoldResult, FrozenBatchNorm2d, fold

BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


@dataclass
class ConversionReport:
    """What convert() did: ``swapped`` (one line per change), ``skipped`` (path, reason) pairs,
    ``folded`` (conv + BN pairs that this call made run as one convolution)."""
    swapped: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    folded: int = 0
    # How many backbone stages convert() found: with no change, no fold and nothing left, they were
    # all detr_fast's already.
    stages: int = 0

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        if self.stages and not self.swapped and not self.folded and not self.skipped:
            return (f"detr_fast.convert: already converted: the {self.stages} stage(s) found are detr_fast's already; "
                    "nothing changed")
        lines = [f"detr_fast.convert: {len(self.swapped)} change(s), {self.folded} conv+BN pairs folded"]
        lines += [f"  swapped: {line}" for line in self.swapped]
        lines += [f"  left as is: {path}: {why}" for path, why in self.skipped]
        return "\n".join(lines)


class Undo:
    """Every change made to a stage of ``root``, in order, so that all of them can be taken back."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.steps: List[Callable[[], None]] = []

    def class_swap(self, module: nn.Module, cls: type) -> None:
        old = module.__class__
        module.__class__ = cls
        self.steps.append(lambda: setattr(module, "__class__", old))

    def child_swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = new
        self.steps.append(lambda: parent._modules.__setitem__(name, old))

    def replace_module(self, path: str, new: nn.Module) -> None:
        """Put ``new`` where the module at ``path`` (dotted, under root) is."""
        if not path:
            raise ValueError("the model itself cannot be replaced in place")
        parent_path, _, name = path.rpartition(".")
        self.child_swap(self.root.get_submodule(parent_path) if parent_path else self.root, name, new)

    def set_attr(self, module: nn.Module, name: str, value: Any) -> None:
        self.steps.append(lambda: module.__dict__.pop(name, None))
        setattr(module, name, value)

    def fold(self, body: nn.Module) -> FoldResult:
        result = fold(body)
        self.steps.append(result.undo)
        return result

    def run(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


class LeaveAsIs(Exception):
    """Raised by a StageKind's convert: undo what it did to the stage, and report this reason."""


def _supported(module: nn.Module) -> Optional[str]:
    return None


@dataclass(frozen=True)
class StageKind:
    """One kind of stage of one family: ``matches(module)`` by structure, ``probe_args(module)``
    the inputs of a probe call, ``convert(module, path, undo, report)`` in place.
    ``unsupported(module)``: why this stage is not converted at all (e.g. a version of its library
    older than detr_fast knows), or None; checked before anything runs or changes."""
    name: str
    matches: Callable[[nn.Module], bool]
    probe_args: Callable[[nn.Module], Tuple]
    convert: Callable[[nn.Module, str, "Undo", ConversionReport], None]
    unsupported: Callable[[nn.Module], Optional[str]] = _supported


def join_path(*parts: str) -> str:
    return ".".join(p for p in parts if p) or "<model>"


def tolerance(device: torch.device, dtype: torch.dtype) -> float:
    """Relative to the largest output magnitude. float32 on CPU: rounding only; CUDA may run the
    reference's convolutions in TF32; reduced precision rounds at every layer."""
    if dtype in (torch.float16, torch.bfloat16):
        return 5e-2
    return 1e-3 if device.type == "cpu" else 2e-2


def flatten(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten(v)]
    if hasattr(value, "tensors") and hasattr(value, "mask"):
        return flatten(value.tensors) + flatten(value.mask)
    if hasattr(value, "feature_maps"):
        return flatten(value.feature_maps)
    return []


def same_outputs(before: Any, after: Any, tol: float) -> Optional[str]:
    """None when the two outputs agree (same structure, shapes, dtypes, layouts; masks equal;
    values within ``tol`` of the largest magnitude), else why not."""
    a, b = flatten(before), flatten(after)
    if len(a) != len(b) or not a:
        return f"the output structure changed ({len(a)} tensors before, {len(b)} after)"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"output {i} changed from {tuple(x.shape)} {x.dtype} to {tuple(y.shape)} {y.dtype}"
        if x.stride() != y.stride():
            return f"output {i} changed its strides from {x.stride()} to {y.stride()}"
        if x.dtype == torch.bool:
            if not torch.equal(x, y):
                return f"output mask {i} differs"
            continue
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        err = (x - y).abs().max().item()
        if not math.isfinite(err) or err > tol * max(x.abs().max().item(), 1e-12):
            return f"output {i} differs (max abs error {err:.3g})"
    return None


def first_float(module: nn.Module) -> Tuple[torch.device, torch.dtype]:
    """The device and dtype of the module's first floating-point parameter or buffer."""
    t = next((t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()), None)
    return (t.device, t.dtype) if t is not None else (torch.device("cpu"), torch.float32)


def probe_images(module: nn.Module) -> Tuple[Tensor, Tensor]:
    """Two small images on the module's device and dtype, the second padded at the bottom and
    right, and their padding mask (True = padding)."""
    device, dtype = first_float(module)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 96, 128, generator=gen).to(device, dtype)
    mask = torch.zeros(2, 96, 128, dtype=torch.bool, device=device)
    mask[1, 70:, :] = True
    mask[1, :, 90:] = True
    images[1][:, mask[1]] = 0
    return images, mask


def run_probe(stage: nn.Module, args: Tuple) -> Any:
    """``stage(*args)`` in eval mode without grad, every module's mode restored afterwards."""
    modes = [(m, m.training) for m in stage.modules()]
    try:
        stage.eval()  # no running statistics may change because of a probe
        with torch.no_grad():
            return stage(*args)
    finally:
        for m, mode in modes:
            m.training = mode


def is_foreign_frozen_bn(module: nn.Module) -> bool:
    """Another library's frozen BatchNorm: four buffers, no parameters, "FrozenBatchNorm" in the name."""
    return (not isinstance(module, FrozenBatchNorm2d) and "frozenbatchnorm" in type(module).__name__.lower()
            and all(isinstance(module._buffers.get(b), Tensor) for b in BN_BUFFERS)
            and next(module.parameters(recurse=False), None) is None)


def replace_frozen_bns(body: nn.Module, path: str, undo: Undo, report: ConversionReport) -> int:
    """Swap every other frozen BN class under ``body`` for detr_fast's FrozenBatchNorm2d holding the
    same buffer tensors, after checking on a random input that both compute the same thing."""
    n = 0
    for parent_name, parent in list(body.named_modules()):
        for name, child in list(parent.named_children()):
            if not is_foreign_frozen_bn(child):
                continue
            where = join_path(path, parent_name, name)
            new = FrozenBatchNorm2d(child.weight.shape[0], eps=float(getattr(child, "eps", 1e-5)))
            for b in BN_BUFFERS:
                setattr(new, b, child._buffers[b])  # the same tensors: nothing copied or detached
            new.train(child.training)
            gen = torch.Generator().manual_seed(1)
            x = torch.randn(2, child.weight.shape[0], 3, 2, generator=gen).to(child.weight.device,
                                                                               child.weight.dtype)
            with torch.no_grad():
                # Rounding only: float32 differs in the last bits (addcmul rounds once), reduced
                # precision by an ulp of its own.
                tol = tolerance(x.device, x.dtype) * (1e-1 if x.dtype in (torch.float32, torch.float64) else 1.0)
                why = same_outputs(child(x), new(x), tol)
            if why is not None:
                report.skipped.append((where, f"{type(child).__name__} does not compute a frozen "
                                              f"BatchNorm ({why})"))
                continue
            undo.child_swap(parent, name, new)
            n += 1
    if n:
        report.swapped.append(f"{join_path(path)}: {n} frozen BatchNorm modules -> detr_fast.FrozenBatchNorm2d")
    return n


def fold_body(body: nn.Module, path: str, undo: Undo, report: ConversionReport) -> FoldResult:
    """Fold ``body`` (recorded on ``undo``), reporting what was folded and what was left."""
    result = undo.fold(body)
    report.skipped += [(join_path(path, where), why) for where, why in result.skipped]
    if result.changes:
        structures = result.describe_structures()  # empty when the fold only undid earlier ones
        report.swapped.append(f"{join_path(path)}: folded {result.pairs} conv+BN pairs"
                              + (f" ({structures})" if structures else ""))
    return result


def trainable_batch_norms(body: nn.Module) -> int:
    """How many ordinary (trainable) nn.BatchNorm2d the body holds: they cannot be folded."""
    return sum(type(m) is nn.BatchNorm2d for m in body.modules())
