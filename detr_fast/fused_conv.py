"""One convolution with a frozen BatchNorm folded into it, and its epilogue fused where possible.

``conv_bn(x, conv, bn, relu=..., residual=...)`` computes ``relu(bn(conv(x)) + residual)`` as a
single convolution with the folded weight w' = w * scale and bias b' = shift (+ conv.bias * scale),
where (scale, shift) = bn.scale_and_shift() — the one folding formula, owned by FrozenBatchNorm2d.

Where the folded weights come from:
- when autograd needs them (grad enabled and the conv's or BN's tensors require grad), the fold is
  recomputed differentiably at every call, so training updates w and gradients match the reference;
- otherwise they are cached on the conv module as a plain attribute (never a parameter or buffer,
  so the state_dict is untouched), keyed on the identity, storage pointer and version counter of
  every source tensor. load_state_dict, optimizer steps, .to() and any in-place edit change one of
  those, so the cache is rebuilt instead of going stale. One exception, documented in the README:
  writes through ``tensor.data`` bypass the version counter; call clear_fold_cache() after them.

The epilogue (bias, residual add, ReLU) is fused into the convolution's own kernel when no autograd
graph is needed and the platform offers it: cuDNN's fused ops on CUDA (torch.cudnn_convolution_relu
and torch.cudnn_convolution_add_relu), oneDNN's post-ops on CPU (torch.ops.mkldnn._convolution_
pointwise). Each fused op is checked once per (device type, dtype, memory format) against the
unfused computation on a small random problem; if it is missing, raises or disagrees, the unfused
folded convolution runs instead (and a warning says so once).
"""
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dispatch import compiling, exporting
from .frozen_bn import FrozenBatchNorm2d

_CACHE_ATTR = "_detr_fast_fold_cache"

# (device type, dtype, memory format, epilogue) -> whether the fused op is usable there.
_FUSED_OK: Dict[Tuple[str, torch.dtype, torch.memory_format, str], bool] = {}


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can run as one folded convolution here."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and isinstance(bn, FrozenBatchNorm2d) and bn.weight.shape[0] == conv.out_channels)


def clear_fold_cache(module: nn.Module) -> None:
    """Drop every cached folded weight under ``module`` (needed only after writes via ``.data``)."""
    for m in module.modules():
        m.__dict__.pop(_CACHE_ATTR, None)


def _sources(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> List[Tensor]:
    tensors = [conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    if conv.bias is not None:
        tensors.append(conv.bias)
    return tensors


def _stamp(tensors: List[Tensor]) -> Optional[Tuple]:
    # Inference tensors keep no version counter: their folds cannot be validated, so not cached.
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d, dtype: torch.dtype,
          memory_format: torch.memory_format) -> Tuple[Tensor, Tensor]:
    """The folded (weight, bias), computed in at least float32 and rounded once to ``dtype``."""
    scale, shift = bn.scale_and_shift()
    w = conv.weight
    compute = torch.promote_types(w.dtype, torch.float32)
    scale = scale.to(compute)
    weight = w.to(compute) * scale.reshape(-1, 1, 1, 1)
    bias = shift.to(compute)
    if conv.bias is not None:
        bias = bias + conv.bias.to(compute) * scale
    return weight.to(dtype).contiguous(memory_format=memory_format), bias.to(dtype)


def folded_weight_and_bias(conv: nn.Conv2d, bn: FrozenBatchNorm2d, dtype: Optional[torch.dtype] = None,
                           memory_format: torch.memory_format = torch.contiguous_format
                           ) -> Tuple[Tensor, Tensor]:
    """The folded (weight, bias) of ``bn(conv(.))`` in ``dtype`` (default: the conv weight's).

    Differentiable when grad is enabled and a source tensor requires grad; cached otherwise.
    """
    if dtype is None:
        dtype = conv.weight.dtype
    sources = _sources(conv, bn)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in sources)) or compiling():
        # Under torch.compile the fold is traced into the graph (storage pointers cannot be read
        # there), where the compiler can constant-fold or fuse it.
        return _fold(conv, bn, dtype, memory_format)
    stamp = _stamp(sources)
    key = (stamp, float(bn.eps), dtype, memory_format)
    cached = conv.__dict__.get(_CACHE_ATTR)
    if (stamp is not None and cached is not None and cached[0] == key
            and len(cached[1]) == len(sources) and all(a is b for a, b in zip(cached[1], sources))):
        return cached[2], cached[3]
    with torch.no_grad():
        weight, bias = _fold(conv, bn, dtype, memory_format)
    if stamp is not None:
        conv.__dict__[_CACHE_ATTR] = (key, sources, weight, bias)
    return weight, bias


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device_type``, or None. Works across torch versions."""
    if device_type not in ("cuda", "cpu"):
        return None
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # older torch: no device argument
        enabled = torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()
    if not enabled:
        return None
    get_dtype = getattr(torch, "get_autocast_dtype", None)
    if get_dtype is not None:
        return get_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


def memory_format_of(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _int_list(value) -> Optional[List[int]]:
    if isinstance(value, str):
        return None
    return [int(v) for v in value]


def _fused_call(x: Tensor, weight: Tensor, bias: Tensor, conv: nn.Conv2d,
                residual: Optional[Tensor]) -> Tensor:
    """The fused conv + bias (+ residual) + ReLU op of x's device. Raises if there is none."""
    stride, padding, dilation = list(conv.stride), _int_list(conv.padding), list(conv.dilation)
    if padding is None:
        raise RuntimeError("string padding has no fused kernel")
    if x.device.type == "cuda":
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, conv.groups)
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation,
                                                conv.groups)
    if x.device.type == "cpu":
        ops = torch.ops.mkldnn._convolution_pointwise
        if residual is None:
            return ops(x, weight, bias, padding, stride, dilation, conv.groups, "relu", [], None)
        return ops.binary(x, residual, weight, bias, padding, stride, dilation, conv.groups,
                          "add", 1.0, "relu", [], None)
    raise RuntimeError(f"no fused convolution epilogue on {x.device.type}")


def _reference_conv_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d, relu: bool,
                       residual: Optional[Tensor]) -> Tensor:
    y = bn(conv(x))
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _unfused(x: Tensor, weight: Tensor, bias: Tensor, conv: nn.Conv2d, relu: bool,
             residual: Optional[Tensor]) -> Tensor:
    y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if residual is not None:
        # In place on the conv's fresh output, as torchvision's blocks do (`out += identity`).
        y += residual
    if relu:
        y = F.relu(y, inplace=True)
    return y


def _fused_supported(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format,
                     epilogue: str) -> bool:
    """Check once, on a small random problem, that the fused op exists and agrees with F.conv2d."""
    key = (device.type, dtype, memory_format, epilogue)
    ok = _FUSED_OK.get(key)
    if ok is not None:
        return ok
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        ok = False  # neither cuDNN's nor oneDNN's fused ops take other dtypes
    elif device.type == "cuda" and not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
                                      and hasattr(torch, "cudnn_convolution_relu")):
        ok = False
    elif device.type == "cpu" and not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        ok = False
    elif device.type not in ("cuda", "cpu"):
        ok = False
    else:
        ok = _self_check(device, dtype, memory_format, epilogue)
    _FUSED_OK[key] = ok
    return ok


def _self_check(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format,
                epilogue: str) -> bool:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 16, 13, 11, generator=gen).to(device, dtype).contiguous(memory_format=memory_format)
    w = torch.randn(32, 16, 3, 3, generator=gen).mul_(0.1).to(device, dtype).contiguous(memory_format=memory_format)
    b = torch.randn(32, generator=gen).to(device, dtype)
    z = None
    if epilogue == "add_relu":
        z = torch.randn(2, 32, 7, 6, generator=gen).to(device, dtype).contiguous(memory_format=memory_format)
    try:
        with torch.no_grad():
            got = _fused_call(x, w, b, conv, z)
            want = _unfused(x, w, b, conv, True, z)
        tol = 1e-2 if dtype == torch.float32 else 5e-2  # TF32 / bf16 rounding, not layout bugs
        ok = got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
        reason = "its result disagrees with F.conv2d"
    except Exception as err:  # a missing kernel or an unsupported configuration in this build
        ok, reason = False, f"it raised {type(err).__name__}: {err}"
    if not ok:
        warnings.warn(f"detr_fast: the fused conv+{epilogue} op on {device.type} ({dtype}, {memory_format}) "
                      f"is not used because {reason}; running the folded convolution unfused")
    return ok


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d, relu: bool = False,
            residual: Optional[Tensor] = None) -> Tensor:
    """``relu?(bn(conv(x)) (+ residual))`` as one folded convolution, epilogue fused when possible."""
    dtype = None
    amp = autocast_dtype(x.device.type)
    if amp is None and x.dtype != conv.weight.dtype:
        # Behave as the reference: its convolution raises for an input whose dtype is not its
        # weight's (e.g. float64 images into a float32 model), rather than casting silently.
        return _reference_conv_bn(x, conv, bn, relu, residual)
    if amp is not None and conv.weight.dtype == torch.float32:
        # Fold straight into the autocast dtype: autocast would otherwise recast the (non-leaf)
        # folded weight at every call.
        dtype = amp
    memory_format = memory_format_of(x)
    weight, bias = folded_weight_and_bias(conv, bn, dtype, memory_format)
    needs_graph = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                               or (residual is not None and residual.requires_grad))
    if relu and not compiling() and not exporting() and not needs_graph:
        epilogue = "relu" if residual is None else "add_relu"
        # String padding ("same") has no fused kernel: the unfused folded conv handles it.
        if not isinstance(conv.padding, str) and _fused_supported(x.device, weight.dtype, memory_format, epilogue):
            # The fused ops know nothing of autocast: cast the inputs as autocast would.
            xin = x.to(weight.dtype).contiguous(memory_format=memory_format)
            z = None if residual is None else residual.to(weight.dtype).contiguous(memory_format=memory_format)
            return _fused_call(xin, weight, bias, conv, z)
    return _unfused(x, weight, bias, conv, relu, residual)
