"""One convolution with a frozen BatchNorm folded into it, and its epilogue fused where possible.

``conv_bn(x, conv, bn, relu=..., residual=...)`` computes ``relu(bn(conv(x)) + residual)`` as a
single convolution with the folded weights (cache.py: derived at run time, cached, never in
the state_dict; recomputed.py while training).

The epilogue (bias, residual add, ReLU) runs inside the convolution's own kernel when no autograd
graph is needed (and not while compiling or exporting, which trace the plain folded convolution):
- on CPU with channels_last tensors, oneDNN with prepacked weights (onednn.py), the residual
  written in place when the caller says it is private;
- on CUDA, cuDNN's fused ops (torch.cudnn_convolution_relu / cudnn_convolution_add_relu), and on
  CPU with NCHW tensors oneDNN with dense weights, for the ReLU epilogues.
Each fused op is checked once per (device type, dtype, memory format) against F.conv2d on a small
random problem; if it is missing, raises or disagrees, the unfused folded convolution runs instead
(and a warning says so once). A fused op that passed its check can still refuse one convolution
(cuDNN finds no engine for some shapes, depending on its version): that convolution then runs
unfused from then on, with a warning once. Elsewhere the folded convolution runs as F.conv2d.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import capturing, compiling, exporting
from . import onednn
from .cache import clear_fold_cache, fold_needs_graph, folded_weight_and_bias
from .frozen_bn import FrozenBatchNorm2d
from .recomputed import recomputable, recomputed_conv

__all__ = ["clear_fold_cache", "conv_bn", "conv_bn_pieces", "foldable", "folded_weight_and_bias", "memory_format_of"]

# glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with fresh pages, one
# page fault per 4 KiB, at every call: a concatenation that large costs more than convolving its
# pieces one by one into one output (docs/cpu-performance.md: HGNetV2's first stage at 640x640).
FRESH_PAGES_BYTES = 32 * 2**20

# (device type, dtype, memory format, epilogue) -> whether the fused op is usable there.
_FUSED_OK: Dict[Tuple[str, torch.dtype, torch.memory_format, str], bool] = {}
# The (device type, dtype, memory format, epilogue, convolution geometry) for which the fused op
# raised although its self-check passed: those run unfused without trying again.
_FUSED_REFUSED: Set[Tuple] = set()


def foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn(conv(x))`` can run as one folded convolution here."""
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and isinstance(bn, FrozenBatchNorm2d) and bn.weight.shape[0] == conv.out_channels)


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
    """The memory format a caller's tensor is in (NCHW when it is both, e.g. 1 x 1 maps)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _conv_format(x: Tensor) -> torch.memory_format:
    """The format a convolution runs in: channels_last whenever x's memory allows it — a 1 x 1
    map is contiguous in both, and running it NCHW between channels_last layers would make oneDNN
    convert the weights at every call."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
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
    return _epilogue(F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups), relu, residual)


def _epilogue(y: Tensor, relu: bool, residual: Optional[Tensor]) -> Tensor:
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
    if capturing(device):
        # The check copies to the device and synchronizes, which a CUDA graph capture forbids: run
        # unfused (capturable) now, and decide at the first call outside a capture.
        return False
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
            residual: Optional[Tensor] = None, reuse_residual: bool = False) -> Tensor:
    """``relu?(bn(conv(x)) (+ residual))`` as one folded convolution, epilogue fused when possible.

    ``reuse_residual``: the caller owns ``residual`` (nothing else holds it), so the result may be
    written into its memory instead of a new tensor.
    """
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
    memory_format = _conv_format(x)
    if fold_needs_graph(conv, bn) and recomputable(conv, bn) and not (compiling() or exporting()):
        # Training: the folded weight is recomputed in the backward rather than saved (recomputed.py).
        y = recomputed_conv(x, conv, bn, dtype or conv.weight.dtype, memory_format)
        return _epilogue(y, relu, residual)
    weight, bias = folded_weight_and_bias(conv, bn, dtype, memory_format)
    needs_graph = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                               or (residual is not None and residual.requires_grad))
    # String padding ("same") has no fused kernel: the unfused folded conv handles it.
    if needs_graph or compiling() or exporting() or isinstance(conv.padding, str):
        return _unfused(x, weight, bias, conv, relu, residual)
    # The fused ops know nothing of autocast: cast the inputs as autocast would.
    xin = x.to(weight.dtype).contiguous(memory_format=memory_format)
    z = None if residual is None else residual.to(weight.dtype).contiguous(memory_format=memory_format)
    if x.device.type == "cpu" and memory_format == torch.channels_last and onednn.usable(weight.dtype):
        # A residual that had to be cast or made contiguous is a copy of ours: reusable.
        reuse = z is not None and (reuse_residual or z is not residual)
        return onednn.conv(xin, weight, bias, conv, relu, z, reuse)
    epilogue = "relu" if residual is None else "add_relu"
    if relu and _fused_supported(x.device, weight.dtype, memory_format, epilogue):
        refusal_key = (x.device.type, weight.dtype, memory_format, epilogue, _geometry_key(conv))
        if refusal_key not in _FUSED_REFUSED:
            try:
                return _fused_call(xin, weight, bias, conv, z)
            except RuntimeError as err:
                refusal = err
            # A wrong input (e.g. its channels) raises here too, as the reference would; only a
            # convolution that runs unfused marks the fused op as refusing it.
            out = _unfused(x, weight, bias, conv, relu, residual)
            _FUSED_REFUSED.add(refusal_key)
            warnings.warn(f"detr_fast: the fused conv+{epilogue} op on {x.device.type} ({weight.dtype}, "
                          f"{memory_format}) refused {conv} ({type(refusal).__name__}: {str(refusal)[:200]}); "
                          "that convolution runs unfused from now on")
            return out
    return _unfused(x, weight, bias, conv, relu, residual)


def _geometry_key(conv: nn.Conv2d) -> Tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups)


def conv_bn_pieces(pieces: Sequence[Tensor], conv: nn.Conv2d, bn: FrozenBatchNorm2d, relu: bool = False) -> Tensor:
    """``conv_bn(torch.cat(pieces, dim=1), conv, bn, relu)``. On CPU, for float32 inference, when
    that concatenation would take FRESH_PAGES_BYTES or more, computed from the pieces without it
    (onednn.conv_pieces: a convolution per piece, accumulated into one output)."""
    if _pieces_path_applies(pieces, conv, bn):
        weight, bias = folded_weight_and_bias(conv, bn, None, torch.channels_last)
        return onednn.conv_pieces(pieces, weight, bias, conv, relu)
    return conv_bn(pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=1), conv, bn, relu=relu)


def _pieces_path_applies(pieces: Sequence[Tensor], conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> bool:
    if len(pieces) < 2:
        return False
    first = pieces[0]
    needs_graph = fold_needs_graph(conv, bn) or (torch.is_grad_enabled() and any(p.requires_grad for p in pieces))
    # float32 only: in bf16 the partial sums would round once per piece (measured: 2-2.5x the
    # error of one convolution over the concatenation).
    return (conv.weight.dtype == torch.float32 and conv.groups == 1
            and not isinstance(conv.padding, str) and not needs_graph
            and sum(p.shape[1] if p.dim() == 4 else 0 for p in pieces) == conv.in_channels
            and sum(p.numel() for p in pieces) * first.element_size() >= FRESH_PAGES_BYTES
            and all(p.device.type == "cpu" and p.dtype == torch.float32 and p.dim() == 4
                    and p.shape[:1] + p.shape[2:] == first.shape[:1] + first.shape[2:]
                    and _conv_format(p) == torch.channels_last for p in pieces)
            and autocast_dtype("cpu") is None and not (compiling() or exporting())
            and onednn.usable(torch.float32, "packed"))
