"""convert() for models built by the original code: facebookresearch/detr and Deformable-DETR, and
IDEA-Research's DINO family (DINO, DN-DETR, DAB-DETR, Mask DINO, Grounding DINO), which shares their layout.

A stage is recognised by its structure, not by where its classes come from:
- a backbone: a module with a ``.body`` that is torchvision's IntermediateLayerGetter (both DETR
  and Deformable-DETR use it), inside a Joiner or on its own;
- a Joiner: an nn.Sequential of exactly two modules, [0] such a backbone and [1] a position
  embedding (a sine one: ``num_pos_feats``, ``temperature`` — or DINO's ``temperatureH`` and
  ``temperatureW`` —, ``normalize``, ``scale``; or a learned one); or [0] any other module (DINO's
  Swin or ConvNeXt) and [1] a sine embedding: then only the embedding is converted.

Converting a backbone: other frozen BN classes become detr_fast's over the same buffers, the body
is folded, and the backbone's class becomes detr_fast's (Deformable-DETR conventions when it has
``strides``, DINO's when it has a list ``num_channels`` and no strides, else DETR's; its attributes
and parameters are kept).
Converting a Joiner also swaps an upstream sine embedding for PositionEmbeddingSine with the same
parameters — DETR's and Deformable-DETR's classes look alike, but Deformable-DETR subtracts 0.5
from the cumulative position, so the offset is found by running the upstream module on a probe
mask — and the Joiner's class for detr_fast's. DINO's PositionEmbeddingSineHW (any two temperatures,
read from ``temperatureH``/``temperatureW`` and confirmed on the probe mask) becomes
detr_fast.PositionEmbeddingSineHW. The NestedTensor class of the outputs stays the caller's.
Scripted, detr_fast's stages take any NestedTensor class with decompose() (NestedTensorLike): a
stage whose forward names a class TorchScript cannot take so is left as it was (script_input_problem).
"""
import inspect
import typing
import warnings
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter

from .. import backbone as deformable_conventions
from .. import detr as detr_conventions
from .. import dino as dino_conventions
from ..backbone import MaskedBackboneBase
from ..joiner import JoinerBase
from ..nested_tensor import NestedTensor, NestedTensorLike
from ..sine import PositionEmbeddingSine, PositionEmbeddingSineHW
from .machinery import (
    ConversionReport,
    LeaveAsIs,
    StageKind,
    Undo,
    fold_body,
    join_path,
    probe_images,
    replace_frozen_bns,
)

_OFFSET_CANDIDATES = (0.0, -0.5)  # DETR, Deformable-DETR


def is_backbone(module: Any) -> bool:
    return isinstance(module, nn.Module) and isinstance(getattr(module, "body", None), IntermediateLayerGetter)


def _is_hw(module: Any) -> bool:
    """DINO's PositionEmbeddingSineHW: a temperature per axis."""
    return hasattr(module, "temperatureH") and hasattr(module, "temperatureW")


def _is_sine(module: Any) -> bool:
    return isinstance(module, nn.Module) and all(hasattr(module, a) for a in ("num_pos_feats", "normalize", "scale")) \
        and (hasattr(module, "temperature") or _is_hw(module))


def _is_position_embedding(module: Any) -> bool:
    return _is_sine(module) or (hasattr(module, "row_embed") and hasattr(module, "col_embed"))


def is_joiner(module: Any) -> bool:
    if not (isinstance(module, nn.Sequential) and len(module) == 2):
        return False
    if is_backbone(module[0]):
        return _is_position_embedding(module[1])
    # A backbone whose body is not a ResNet (DINO's Swin, ConvNeXt): only its sine embedding is converted.
    return _is_sine(module[1])


def _probe_args(stage: nn.Module) -> Tuple[NestedTensor]:
    images, mask = probe_images(stage)
    # With the image sizes, as nested_tensor_from_tensor_list makes them, so that the probe runs
    # the converted stage's common path (rectangular masks) rather than the arbitrary-mask one.
    return (NestedTensor(images, mask, torch.tensor([[96, 128], [70, 90]])),)


def _backbone_class(backbone: nn.Module) -> type:
    if isinstance(backbone, MaskedBackboneBase):
        return type(backbone)
    if hasattr(backbone, "strides"):
        return deformable_conventions.BackboneBase
    if isinstance(getattr(backbone, "num_channels", None), list):
        return dino_conventions.BackboneBase
    return detr_conventions.BackboneBase


def _input_annotation(module: nn.Module) -> Any:
    """The annotation of forward's first argument after self (resolved when it can be), else None."""
    forward = getattr(type(module), "forward", None)
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if not params or params[0].annotation is inspect.Parameter.empty:
        return None
    try:
        return typing.get_type_hints(forward).get(params[0].name, params[0].annotation)
    except Exception:  # a forward reference that does not resolve here: unknown
        return params[0].annotation


def script_input_problem(module: nn.Module) -> Optional[str]:
    """Why detr_fast's stage, whose scripted forward takes a NestedTensorLike (any class with
    ``decompose() -> (Tensor, Optional[Tensor])``), could not take the place of ``module`` in a
    scripted model that passes it the NestedTensor class its forward names; None when it can (or
    when forward names no such class: then the model does not script with it as it is either)."""
    if isinstance(module, (JoinerBase, MaskedBackboneBase)):
        return None
    cls = _input_annotation(module)
    if not inspect.isclass(cls) or cls is NestedTensor or issubclass(cls, Tensor) or cls.__module__ == "builtins":
        return None
    name = f"{type(module).__name__}.forward takes {cls.__module__}.{cls.__qualname__}"
    if not callable(getattr(cls, "decompose", None)):
        return f"{name}, which has no decompose(): scripted, detr_fast's stage reads its input with decompose()"
    try:
        from torch._sources import fake_range
        from torch.jit.annotations import ann_to_type
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            accepted = ann_to_type(cls, fake_range()).isSubtypeOf(ann_to_type(NestedTensorLike, fake_range()))
    except AttributeError:  # another torch's TorchScript API: decompose() is all that can be checked
        return None
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        return f"{name}, which TorchScript cannot compile ({type(err).__name__}: {first_line})"
    if not accepted:
        return (f"{name}, whose decompose() TorchScript does not type as () -> Tuple[Tensor, Optional[Tensor]] "
                "(what detr_fast's scripted stage calls)")
    return None


def _check_scriptable_input(module: nn.Module) -> None:
    why = script_input_problem(module)
    if why is not None:
        raise LeaveAsIs(f"{why}, so a scripted model would not compile with the converted stage")


def convert_backbone(backbone: nn.Module, path: str, undo: Undo, report: ConversionReport) -> None:
    _check_scriptable_input(backbone)
    body_path = join_path(path, "body")
    replace_frozen_bns(backbone.body, body_path, undo, report)
    fold_body(backbone.body, body_path, undo, report)
    cls = _backbone_class(backbone)
    if type(backbone) is not cls:
        report.swapped.append(f"{join_path(path)}: {type(backbone).__name__} -> {cls.__module__}.{cls.__qualname__}")
        undo.class_swap(backbone, cls)


def _probe_mask() -> Tuple[torch.Tensor, NestedTensor]:
    mask = torch.zeros(2, 6, 9, dtype=torch.bool)
    mask[0, 4:, :] = True
    mask[1, :, 5:] = True
    return mask, NestedTensor(torch.zeros(2, 1, 6, 9), mask)


def _same(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want.float(), rtol=1e-5, atol=1e-5)


def _matching(pos: nn.Module, candidates: Callable[[], Iterator[PositionEmbeddingSine]]
              ) -> Optional[PositionEmbeddingSine]:
    """The first of detr_fast's ``candidates`` whose reference reproduces ``pos`` on a probe mask,
    else None (also when ``pos`` or a candidate raises: an unusual embedding, reported by the caller)."""
    mask, probe = _probe_mask()
    try:
        with torch.no_grad():
            want = pos(probe)
            for candidate in candidates():
                if _same(candidate.reference(mask), want):
                    return candidate
    except Exception:
        return None
    return None


def _find_hw(pos: nn.Module) -> Optional[PositionEmbeddingSineHW]:
    """detr_fast's PositionEmbeddingSineHW reproducing DINO's ``pos`` on a probe mask, else None."""
    def candidates() -> Iterator[PositionEmbeddingSine]:
        normalize = bool(pos.normalize)
        scale = float(pos.scale) if normalize and pos.scale is not None else None
        yield PositionEmbeddingSineHW(int(pos.num_pos_feats), float(pos.temperatureH), float(pos.temperatureW),
                                      normalize, scale)
    return _matching(pos, candidates)


def _find_offset(pos: nn.Module) -> Optional[PositionEmbeddingSine]:
    """detr_fast's PositionEmbeddingSine reproducing ``pos`` on a probe mask (DETR's or
    Deformable-DETR's offset), else None."""
    def candidates() -> Iterator[PositionEmbeddingSine]:
        scale = float(pos.scale) if pos.scale is not None else None
        for offset in _OFFSET_CANDIDATES:
            yield PositionEmbeddingSine(int(pos.num_pos_feats), float(pos.temperature), bool(pos.normalize),
                                        scale if pos.normalize else None, offset=offset, backend="auto")
    return _matching(pos, candidates)


def _convert_embedding(joiner: nn.Sequential, path: str, undo: Undo, report: ConversionReport) -> None:
    pos, where = joiner[1], join_path(path) + "[1]"
    if isinstance(pos, PositionEmbeddingSine):
        return
    if not _is_sine(pos):
        report.skipped.append((where, f"{type(pos).__name__} is not a sine embedding; kept as it is"))
        return
    if _is_hw(pos):
        hw = _find_hw(pos)
        if hw is None:
            report.skipped.append((where, f"{type(pos).__name__} does not match DINO's sine embedding with its "
                                          f"temperatureH={pos.temperatureH!r}, temperatureW={pos.temperatureW!r} "
                                          "on a probe mask; kept"))
            return
        hw.train(pos.training)
        undo.child_swap(joiner, "1", hw)
        report.swapped.append(f"{where}: {type(pos).__name__} -> detr_fast.PositionEmbeddingSineHW (temperatures "
                              f"{hw.temperatureH:g}, {hw.temperatureW:g})")
        return
    new = _find_offset(pos)
    if new is None:
        report.skipped.append((where, f"{type(pos).__name__} matches neither DETR's nor Deformable-DETR's "
                                      "sine embedding on a probe mask; kept"))
        return
    new.train(pos.training)
    undo.child_swap(joiner, "1", new)
    report.swapped.append(f"{where}: {type(pos).__name__} -> detr_fast.PositionEmbeddingSine (offset={new.offset})")


def convert_joiner(joiner: nn.Sequential, path: str, undo: Undo, report: ConversionReport) -> None:
    _check_scriptable_input(joiner)
    backbone_path = f"{path}[0]" if path else "[0]"
    if not is_backbone(joiner[0]):
        # Its own forward (masks included) is kept, and so is the Joiner's: only [1] is replaced.
        report.skipped.append((backbone_path, f"{type(joiner[0]).__name__} has no ResNet body (a torchvision "
                                              "IntermediateLayerGetter) for detr_fast to fold; kept as it is"))
        _convert_embedding(joiner, path, undo, report)
        return
    convert_backbone(joiner[0], backbone_path, undo, report)
    _convert_embedding(joiner, path, undo, report)
    deformable = isinstance(joiner[0], deformable_conventions.BackboneBase)
    if deformable:
        cls = deformable_conventions.Joiner
    elif isinstance(joiner[0], dino_conventions.BackboneBase):
        cls = dino_conventions.Joiner
    else:
        cls = detr_conventions.Joiner
    if not isinstance(joiner, JoinerBase):
        if deformable:
            for attr in ("strides", "num_channels"):
                if attr not in joiner.__dict__:
                    undo.set_attr(joiner, attr, getattr(joiner[0], attr))
        undo.class_swap(joiner, cls)
        report.swapped.append(f"{join_path(path)}: Joiner -> {cls.__module__}.{cls.__qualname__}")


KINDS = (
    StageKind("DETR / Deformable-DETR / DINO Joiner", is_joiner, _probe_args, convert_joiner),
    StageKind("DETR / Deformable-DETR backbone", is_backbone, _probe_args, convert_backbone),
)
