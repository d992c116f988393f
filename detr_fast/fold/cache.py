"""The folded weights of a conv + frozen BN pair, derived at run time and cached on the conv.

w' = w * scale and b' = shift (+ conv.bias * scale), with (scale, shift) = bn.scale_and_shift() —
the one folding formula, owned by FrozenBatchNorm2d — computed in at least float32 and rounded
once to the dtype the convolution runs in.

- When autograd needs them (grad enabled and the conv's or BN's tensors require grad) the fold is
  computed from the parameters at every call, so training updates w and gradients match the
  reference: by recomputed.py for a trainable conv (the folded weight is rebuilt in the backward,
  not kept), differentiably here otherwise; under torch.compile it is traced into the graph.
- Otherwise they are cached on the conv module as a plain attribute (never a parameter or buffer,
  so the state_dict is untouched), keyed on the identity, storage pointer and version counter of
  every source tensor. load_state_dict, optimizer steps, .to() and any in-place edit change one of
  those, so the cache is rebuilt instead of going stale. Writes through ``tensor.data`` bypass the
  version counter: call clear_fold_cache() after them (docs/folding.md says so). Copies and pickles of
  the module drop the cache (it is rebuilt on the next call).
- Never cached while a CUDA graph is being captured: captured kernels run only when the graph
  replays, so a fold cached then would hold values never computed outside the graph. The fold is
  captured with the rest instead (one eager call before capturing caches it, as warm-up does).
"""
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..dispatch import capturing, compiling
from ..validation import check_module
from .frozen_bn import FrozenBatchNorm2d

CACHE_ATTRS = ("_detr_fast_fold_cache", "_detr_fast_packed")  # this cache, and oneDNN's packed weights


class DerivedCache:
    """A value derived from a module's tensors, kept on the module: dropped (None) by
    copy.deepcopy, pickle and torch.save, which rebuild it on the next call."""

    def __init__(self, key: Any, value: Any, sources: Tuple[Tensor, ...] = ()):
        self.key = key
        self.value = value
        # The tensors it was derived from, held so that their identities cannot be reused.
        self.sources = sources

    def valid_for(self, key: Any, sources: Tuple[Tensor, ...] = ()) -> bool:
        return self.key == key and len(self.sources) == len(sources) and all(
            a is b for a, b in zip(self.sources, sources))

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self):
        return (_dropped, ())


def _dropped() -> None:
    return None


def clear_fold_cache(module: nn.Module) -> None:
    """Drop every cached folded (and prepacked) weight under ``module``; needed only after writes
    through ``.data``, which no version counter sees."""
    check_module(module)
    for m in module.modules():
        for attr in CACHE_ATTRS:
            m.__dict__.pop(attr, None)


def fold_sources(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> List[Tensor]:
    """The tensors a fold is computed from."""
    tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        tensors.append(conv.bias)
    return tensors


def fold_needs_graph(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> bool:
    """Whether autograd needs the fold: grad enabled and a source tensor requiring grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in fold_sources(conv, bn))


def _stamp(tensors: List[Tensor]) -> Optional[Tuple]:
    # Inference tensors keep no version counter: their folds cannot be validated, so not cached.
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d, dtype: torch.dtype,
          memory_format: torch.memory_format) -> Tuple[Tensor, Tensor]:
    """The folded (weight, bias), computed in at least float32 and rounded once to ``dtype``."""
    scale, bias = fold_scale_and_bias(conv, bn)
    return fold_weight(conv.weight, scale, dtype, memory_format), bias.to(dtype)


def fold_scale_and_bias(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> Tuple[Tensor, Tensor]:
    """The per-channel scale the conv weight is multiplied by, and the folded bias
    (shift + conv.bias * scale), both in at least float32 (differentiable)."""
    scale, shift = bn.scale_and_shift()
    compute = torch.promote_types(conv.weight.dtype, torch.float32)
    scale = scale.to(compute)
    bias = shift.to(compute)
    if conv.bias is not None:
        bias = bias + conv.bias.to(compute) * scale
    return scale, bias


def fold_weight(weight: Tensor, scale: Tensor, dtype: torch.dtype, memory_format: torch.memory_format) -> Tensor:
    """``weight * scale`` per output channel, computed in at least float32 and rounded once to ``dtype``."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    folded = weight.to(compute) * scale.to(compute).reshape(-1, 1, 1, 1)
    return folded.to(dtype).contiguous(memory_format=memory_format)


def folded_weight_and_bias(conv: nn.Conv2d, bn: FrozenBatchNorm2d, dtype: Optional[torch.dtype] = None,
                           memory_format: torch.memory_format = torch.contiguous_format
                           ) -> Tuple[Tensor, Tensor]:
    """The folded (weight, bias) of ``bn(conv(.))`` in ``dtype`` (default: the conv weight's).

    Differentiable when grad is enabled and a source tensor requires grad; cached otherwise (the
    same tensor objects are returned while nothing changed).
    """
    if dtype is None:
        dtype = conv.weight.dtype
    if fold_needs_graph(conv, bn) or compiling():
        return _fold(conv, bn, dtype, memory_format)
    sources = fold_sources(conv, bn)
    stamp = _stamp(sources)
    key = (stamp, float(bn.eps), dtype, memory_format)
    cached = conv.__dict__.get(CACHE_ATTRS[0])
    if stamp is not None and cached is not None and cached.valid_for(key, tuple(sources)):
        return cached.value
    # Outside inference mode even when called in it: a cached inference tensor could not be saved
    # for backward by a later call with grad (e.g. a saliency map through frozen weights).
    with torch.inference_mode(False), torch.no_grad():
        folded = _fold(conv, bn, dtype, memory_format)
    if stamp is not None and not capturing(conv.weight.device):
        conv.__dict__[CACHE_ATTRS[0]] = DerivedCache(key, folded, tuple(sources))
    return folded
