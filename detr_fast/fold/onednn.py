"""Folded convolutions on CPU through oneDNN: prepacked weights, fused epilogues, in-place residuals.

Measured on a 2-core Zen 4 VM (ResNet-50 body, two 400x666 images; docs/cpu-performance.md):
- Prepacked weights. Given a dense weight, oneDNN reorders it into its blocked format at every
  call (53 reorders, 94 MB per ResNet-50 forward). ``torch.ops.mkldnn._reorder_convolution_weight``
  does that once, for the format oneDNN's channels_last kernel wants for one input shape — the
  format depends on the shape, and a weight packed for another shape is correct but reordered
  again at every call (slowly), so weights are packed per input shape: a small LRU per conv, the
  packed tensors shared between shapes that want the same format. The packing follows the fold
  cache (cache.py): it is valid only for the folded weight tensor it was made from, which the
  fold cache replaces whenever a source tensor changes.
- Fused epilogues: bias (+ residual add) (+ ReLU) inside the convolution
  (``_convolution_pointwise`` / ``.binary``), the downsample convolutions included.
- In-place residuals: ``_convolution_pointwise_.binary`` writes relu(conv(x) + residual) into the
  residual's own memory. Callers allow it only for a tensor nobody else can see (a downsample
  output made in the same block, or a block input the layer knows to be private): a fresh output
  per block costs page faults (glibc serves tensors over 32 MiB with fresh pages), which measured
  ~10% of the body.
Each operation is checked once per dtype against F.conv2d on a small problem; where it is missing,
raises or disagrees, the caller falls back (fused_conv.py).
"""
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import CACHE_ATTRS, DerivedCache

_PACKED_ATTR = CACHE_ATTRS[1]
MAX_SHAPES = 4  # input shapes whose packed weights each conv keeps (multi-scale training/eval cycles a few)
_LOCK = threading.Lock()
_OK: Dict[Tuple[torch.dtype, str], bool] = {}  # (dtype, "packed" | "dense") -> usable


def _ops():
    return getattr(torch.ops, "mkldnn", None)


Geometry = Tuple[List[int], List[int], List[int], int]  # padding, stride, dilation, groups


def _geometry(conv: nn.Conv2d) -> Geometry:
    return [int(p) for p in conv.padding], list(conv.stride), list(conv.dilation), conv.groups


def _format_of(packed: Tensor) -> Optional[bytes]:
    serialize = getattr(_ops(), "_get_mkldnn_serialized_md", None)
    try:
        return bytes(serialize(packed).tolist()) if serialize is not None else None
    except RuntimeError:
        return None


def _shape_cache(conv: nn.Conv2d, weight: Tensor) -> "OrderedDict[tuple, Tuple[Optional[bytes], Any]]":
    """The conv's packed weights by input shape, valid for the folded dense ``weight`` only."""
    holder = conv.__dict__.get(_PACKED_ATTR)
    if holder is None or not holder.valid_for(None, (weight,)):
        holder = DerivedCache(None, OrderedDict(), (weight,))
        conv.__dict__[_PACKED_ATTR] = holder
    return holder.value


def _cached(conv: nn.Conv2d, weight: Tensor, key: tuple, pack: Callable[[], Tuple[Optional[bytes], Any]]) -> Any:
    """The entry for ``key`` (made by ``pack`` when missing): a small LRU of input shapes per conv."""
    shapes = _shape_cache(conv, weight)
    entry = shapes.get(key)
    if entry is not None:
        with _LOCK:  # least recently used: the shape seen every call stays
            if key in shapes:
                shapes.move_to_end(key)
        return entry[1]
    fmt, packed = pack()
    with _LOCK:
        # Another shape wanting the same blocked format shares its tensor (memory: weights x formats).
        packed = next((p for f, p in shapes.values() if fmt is not None and f == fmt), packed)
        shapes[key] = (fmt, packed)
        while len(shapes) > MAX_SHAPES:
            shapes.popitem(last=False)
    return packed


def _pack(conv: nn.Conv2d, weight: Tensor, input_shape: List[int]) -> Tensor:
    padding, stride, dilation, groups = _geometry(conv)
    return _ops()._reorder_convolution_weight(weight, padding, stride, dilation, groups, input_shape)


def _packed(conv: nn.Conv2d, weight: Tensor, x: Tensor) -> Tensor:
    """``weight`` (the folded dense weight) packed for ``x``'s shape."""
    def pack() -> Tuple[Optional[bytes], Tensor]:
        packed = _pack(conv, weight, list(x.shape))
        return _format_of(packed), packed
    return _cached(conv, weight, tuple(x.shape), pack)


def _packed_pieces(conv: nn.Conv2d, weight: Tensor, pieces: Sequence[Tensor]) -> Tuple[Tensor, ...]:
    """``weight``'s input-channel slices, one per piece of the (concatenated) input, each packed
    for its piece's shape."""
    def pack() -> Tuple[None, Tuple[Tensor, ...]]:
        bounds = [0]
        for x in pieces:
            bounds.append(bounds[-1] + x.shape[1])
        return None, tuple(_pack(conv, weight[:, a:b].contiguous(memory_format=torch.channels_last), list(x.shape))
                           for a, b, x in zip(bounds, bounds[1:], pieces))
    return _cached(conv, weight, ("pieces",) + tuple(tuple(x.shape) for x in pieces), pack)


def conv(x: Tensor, weight: Tensor, bias: Tensor, module: nn.Conv2d, relu: bool, residual: Optional[Tensor],
         reuse_residual: bool) -> Tensor:
    """relu?(conv(x) + bias (+ residual)) with oneDNN. ``x`` and ``weight`` channels_last, of one
    dtype; ``reuse_residual``: write the result into ``residual`` (which must be private)."""
    w = _packed(module, weight, x) if usable(x.dtype, "packed") else weight
    return _run(x, w, bias, _geometry(module), relu, residual, reuse_residual)


def conv_pieces(pieces: Sequence[Tensor], weight: Tensor, bias: Tensor, module: nn.Conv2d, relu: bool) -> Tensor:
    """relu?(conv(torch.cat(pieces, 1)) + bias) without the concatenation: the convolution is linear
    in its input channels, so each piece is convolved with its slice of the weight, accumulated in
    place into one output (oneDNN's sum post-op), the ReLU in the last. ``pieces`` and ``weight``
    channels_last, of one dtype; groups 1; packed weights usable (``usable(dtype, "packed")``)."""
    packed = _packed_pieces(module, weight, pieces)
    geometry = _geometry(module)
    out = _run(pieces[0], packed[0], bias, geometry, relu and len(pieces) == 1, None, False)
    for i in range(1, len(pieces)):
        out = _run(pieces[i], packed[i], None, geometry, relu and i == len(pieces) - 1, out, True)
    return out


def _run(x: Tensor, w: Tensor, bias: Optional[Tensor], geometry: Geometry, relu: bool, residual: Optional[Tensor],
         reuse_residual: bool) -> Tensor:
    ops = _ops()
    padding, stride, dilation, groups = geometry
    if residual is None:
        return ops._convolution_pointwise(x, w, bias, padding, stride, dilation, groups,
                                          "relu" if relu else "none", [], None)
    unary = "relu" if relu else None
    if reuse_residual and groups == 1 and residual.is_contiguous(memory_format=torch.channels_last):
        return ops._convolution_pointwise_.binary(residual, x, w, bias, padding, stride, dilation, groups,
                                                  "add", None, unary, [], None)
    return ops._convolution_pointwise.binary(x, residual, w, bias, padding, stride, dilation, groups,
                                             "add", 1.0, unary, [], None)


def usable(dtype: torch.dtype, weights: str = "dense") -> bool:
    """Whether oneDNN's fused convolutions (with ``weights`` "dense" or "packed") run and agree
    with F.conv2d here, for ``dtype`` (checked once)."""
    key = (dtype, weights)
    ok = _OK.get(key)
    if ok is None:
        ok = _check(dtype, weights)
        _OK[key] = ok
    return ok


def _check(dtype: torch.dtype, weights: str) -> bool:
    ops = _ops()
    needed = ["_convolution_pointwise", "_convolution_pointwise_"]
    if weights == "packed":
        needed.append("_reorder_convolution_weight")
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available() or ops is None \
            or not all(hasattr(ops, name) for name in needed):
        return False
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    reason = "its result disagrees with F.conv2d"
    ok = True
    try:
        # (groups, relu, residual, written in place, bias): every way conv()/conv_pieces() call _run.
        for groups, relu, with_residual, reuse, with_bias in (
                (1, True, False, False, True), (1, False, False, False, True), (8, True, False, False, True),
                (1, True, True, False, True), (1, False, True, True, True), (1, True, True, True, True),
                (1, False, True, True, False), (1, True, True, True, False)):
            module = nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=groups, bias=False)
            x = torch.randn(2, 16, 13, 11, generator=gen).to(dtype).contiguous(memory_format=cl)
            w = (torch.randn(32, 16 // groups, 3, 3, generator=gen) * 0.1).to(dtype).contiguous(memory_format=cl)
            b = torch.randn(32, generator=gen).to(dtype) if with_bias else None
            z = torch.randn(2, 32, 7, 6, generator=gen).to(dtype).contiguous(memory_format=cl) if with_residual \
                else None
            with torch.no_grad():
                want = F.conv2d(x, w, b, module.stride, module.padding, module.dilation, groups)
                if z is not None:
                    want = want + z
                want = want.relu() if relu else want
                wt = _ops()._reorder_convolution_weight(w, [1, 1], [2, 2], [1, 1], groups, list(x.shape)) \
                    if weights == "packed" else w
                got = _run(x, wt, b, _geometry(module), relu, None if z is None else z.clone(), reuse)
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            ok = ok and got.shape == want.shape and bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
    except Exception as err:  # a missing kernel or an unsupported configuration in this build
        ok, reason = False, f"it raised {type(err).__name__}: {err}"
    if not ok:
        warnings.warn(f"detr_fast: oneDNN's fused convolutions ({weights} weights, {dtype}) are not used because "
                      f"{reason}; running the folded convolutions another way")
    return ok
