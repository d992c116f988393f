"""convert() for transformers' DETR family: DETR, Conditional DETR, Deformable DETR, Table
Transformer, DAB-DETR, and the real-time DETRs (RT-DETR, RT-DETRv2, D-FINE).

Recognised by structure and by probing what a module computes, never by class name or version:
- a conv encoder: a module with a ``.model`` backbone and ``intermediate_channel_sizes`` whose
  forward takes (pixel_values, pixel_mask) — DetrConvEncoder, RTDetrConvEncoder, ... Its frozen
  BN (DetrFrozenBatchNorm2d, RTDetrFrozenBatchNorm2d, ...) becomes detr_fast's over the same
  buffers, the backbone is folded (timm's ResNet, transformers' ResNet, ResNet-vd, HGNetV2: see
  fold/recipes.py) and the encoder's class gets detr_fast's forward (channels_last inside for inference,
  the input's layout while training; features back in transformers' layout and dtype). A backbone
  with trainable nn.BatchNorm2d (RT-DETR's freeze_backbone_batch_norms=False) is left as it is:
  folding would change what training does.
- a sine embedding: a module without parameters, with ``temperature`` (or DAB-DETR's
  ``temperature_height``/``temperature_width``) and either call convention —
  ``forward(shape, device, dtype, mask=None)`` or ``forward(pixel_values, pixel_mask)``. Its
  parameters are read from its attributes under any of their names and confirmed by running it
  on probe masks: the candidate (offset 0 or Deformable DETR's -0.5; DETR's or DAB-DETR's rounding
  of the frequencies; DAB-DETR's two temperatures, equal or not) that reproduces it bit for bit in
  float32 replaces it. Learned embeddings
  and RT-DETR's mask-free, already cached embedding are left alone.

A stage whose class comes from a transformers older than TRANSFORMERS_FLOOR (the oldest release
the tests run on; setup.py's 'hf' extra declares the same floor) is left as it was, with the
reason in the report and a warning: detr_fast does not know what such a version computes.
"""
import inspect
import math
import re
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..fold import swapped_class, variant_of
from ..sine import FREQUENCY_RULES, SineParams, sine_embedding_reference
from .machinery import (
    ConversionReport,
    LeaveAsIs,
    StageKind,
    Undo,
    fold_body,
    join_path,
    probe_images,
    replace_frozen_bns,
    trainable_batch_norms,
)
from .transformers_modules import FAST_CONV_ENCODER, TransformersSineEmbedding, TransformersSineEmbeddingLegacy

_FEATURE_NAMES = ("num_position_features", "num_pos_feats", "embedding_dim")
_SIMPLE = (int, float, bool, str, type(None))

# The oldest transformers release detr_fast converts (and CI tests): the one source of this number.
# setup.py's 'hf' extra declares it too (tests/test_packaging.py checks that they agree)
# and .ci/run installs exactly this release for its second run of the transformers tests.
TRANSFORMERS_FLOOR = "5.17.0"


def release(version: str) -> Tuple[int, ...]:
    """The release numbers a version string starts with: "5.17.0.dev0" -> (5, 17, 0), padded to
    three numbers; () where it starts with none."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(version))
    if not match:
        return ()
    numbers = tuple(int(n) for n in match.group(1).split("."))
    return numbers + (0,) * (3 - len(numbers))


def _transformers_version(module: nn.Module) -> Optional[str]:
    """The installed transformers' version where ``module``'s class (or a class it derives from,
    as detr_fast's swapped classes do) is defined in transformers, else None."""
    if not any(c.__module__.split(".")[0] == "transformers" for c in type(module).__mro__):
        return None
    library = sys.modules.get("transformers")
    return str(getattr(library, "__version__", "unknown"))


def unsupported_version(module: nn.Module) -> Optional[str]:
    """Why ``module`` is not converted because of its transformers version, or None."""
    version = _transformers_version(module)
    if version is None:
        return None
    installed = release(version)
    if installed and installed >= release(TRANSFORMERS_FLOOR):
        return None
    what = f"older than {TRANSFORMERS_FLOOR}" if installed else "a version detr_fast cannot read"
    return (f"{type(module).__name__} comes from transformers {version}, {what}; detr_fast converts transformers "
            f">= {TRANSFORMERS_FLOOR} (pip install 'transformers>={TRANSFORMERS_FLOOR}')")


def _forward_parameters(module: nn.Module) -> List[str]:
    try:
        return list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return []


# ---------------------------------------------------------------- conv encoders

def is_conv_encoder(module: Any) -> bool:
    return (isinstance(module, nn.Module) and isinstance(getattr(module, "model", None), nn.Module)
            and hasattr(module, "intermediate_channel_sizes")
            and _forward_parameters(module)[:2] == ["pixel_values", "pixel_mask"])


def _encoder_probe_args(encoder: nn.Module) -> Tuple[Tensor, Tensor]:
    images, padding = probe_images(encoder)
    return images, (~padding).long()  # transformers' image processors give int64 masks, 1 = valid


def convert_conv_encoder(encoder: nn.Module, path: str, undo: Undo, report: ConversionReport) -> None:
    body, body_path = encoder.model, join_path(path, "model")
    trainable = trainable_batch_norms(body)
    if trainable:
        raise LeaveAsIs(f"its backbone has {trainable} trainable nn.BatchNorm2d (e.g. built with "
                        "freeze_backbone_batch_norms=False); folding them would change what training does")
    replace_frozen_bns(body, body_path, undo, report)
    folded = fold_body(body, body_path, undo, report)
    if folded.pairs == 0:
        raise LeaveAsIs(f"its backbone ({type(body).__name__}) has no conv + frozen BatchNorm pair detr_fast can fold")
    if variant_of(encoder) != FAST_CONV_ENCODER:
        undo.class_swap(encoder, swapped_class(type(encoder), FAST_CONV_ENCODER))
        report.swapped.append(f"{join_path(path)}: {type(encoder).__name__} runs its folded backbone in channels_last")


# ---------------------------------------------------------------- sine embeddings

def _convention(module: nn.Module) -> str:
    names = _forward_parameters(module)
    if names[:3] == ["shape", "device", "dtype"] and "mask" in names:
        return "shape"
    if names[:2] == ["pixel_values", "pixel_mask"]:
        return "pixel"
    return ""


def is_sine_embedding(module: Any) -> bool:
    return (isinstance(module, nn.Module) and not isinstance(module, (TransformersSineEmbedding,
                                                                      TransformersSineEmbeddingLegacy))
            and next(module.parameters(), None) is None and next(module.buffers(), None) is None
            and (hasattr(module, "temperature") or hasattr(module, "temperature_height"))
            and _convention(module) != "")


def _probe_masks() -> List[Tensor]:
    """Masks True on valid pixels: rectangles per image (as padding makes) and arbitrary ones."""
    rect = torch.ones(2, 7, 11, dtype=torch.bool)
    rect[0, 5:, :] = False
    rect[1, :, 6:] = False
    holes = torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    return [rect, holes]


def _call(module: nn.Module, convention: str, mask: Tensor) -> Tensor:
    if convention == "shape":
        return module(torch.Size([mask.shape[0], 1, *mask.shape[1:]]), mask.device, torch.float32, mask)
    return module(torch.zeros(mask.shape[0], 1, *mask.shape[1:]), mask)


def _candidates(module: nn.Module) -> Iterator[SineParams]:
    feats = next((getattr(module, n) for n in _FEATURE_NAMES if hasattr(module, n)), None)
    temperature_w = None
    if hasattr(module, "temperature"):
        temperature = module.temperature
    else:
        temperature = module.temperature_height
        if module.temperature_width != temperature:
            temperature_w = float(module.temperature_width)  # DAB-DETR: pos_x with its own temperature
    normalize = bool(getattr(module, "normalize", True))  # DAB-DETR always normalizes
    scale = getattr(module, "scale", None)
    scale = 2 * math.pi if scale is None or not normalize else float(scale)
    if feats is None or float(feats) != int(feats):
        return
    for offset in ((0.0, -0.5) if normalize else (0.0,)):
        for rule in FREQUENCY_RULES:
            try:
                yield SineParams(int(feats), float(temperature), normalize, scale, offset, 1e-6, rule, temperature_w)
            except ValueError:
                return


def find_sine_params(module: nn.Module) -> Tuple[Optional[SineParams], str]:
    """The SineParams reproducing ``module`` bit for bit in float32 on probe masks, else (None, why)."""
    convention = _convention(module)
    masks = _probe_masks()
    try:
        with torch.no_grad():
            wanted = [_call(module, convention, m) for m in masks]
    except Exception as err:
        return None, f"it does not run on a probe mask ({type(err).__name__}: {err})"
    for params in _candidates(module):
        got = [sine_embedding_reference(~m, params) for m in masks]
        if all(g.shape == w.shape and torch.equal(g, w.float()) for g, w in zip(got, wanted)):
            return params, ""
    return None, "no sine embedding detr_fast knows reproduces it on probe masks"


def _sine_probe_args(module: nn.Module) -> Tuple:
    mask = _probe_masks()[0]
    if _convention(module) == "shape":
        return torch.Size([2, 1, 7, 11]), mask.device, torch.float32, mask
    return torch.zeros(2, 1, 7, 11), mask


def convert_sine_embedding(module: nn.Module, path: str, undo: Undo, report: ConversionReport) -> None:
    params, why = find_sine_params(module)
    if params is None:
        report.skipped.append((join_path(path), f"{type(module).__name__}: {why}; kept as it is"))
        return
    attributes: Dict[str, Any] = {k: v for k, v in vars(module).items()
                                  if not k.startswith("_") and k != "training" and isinstance(v, _SIMPLE)}
    cls = TransformersSineEmbedding if _convention(module) == "shape" else TransformersSineEmbeddingLegacy
    new = cls(params, "auto", attributes)
    new.train(module.training)
    undo.replace_module(path, new)
    report.swapped.append(f"{join_path(path)}: {type(module).__name__} -> detr_fast.{cls.__name__} ({params})")


KINDS = (
    StageKind("transformers conv encoder", is_conv_encoder, _encoder_probe_args, convert_conv_encoder,
              unsupported_version),
    StageKind("transformers sine embedding", is_sine_embedding, _sine_probe_args, convert_sine_embedding,
              unsupported_version),
)
