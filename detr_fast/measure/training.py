"""The training step as a measured stage ("train"): DETR's training configuration of the Joiner.

lr_backbone > 0: layers 2-4 of the ResNet-50 trainable, the stem and layer1 frozen, every BatchNorm
frozen (FrozenBatchNorm2d); one step = forward of the Joiner (pad, backbone, masks, pos) and
backward of a loss over all levels that reads the features and the position embeddings
(``train_loss``). Implementations: "reference" (the unfolded Joiner), "detr_fast" (a
``detr_fast.convert``-ed copy: the fold computed at every call for the trainable layers, its
weight rebuilt in the backward (fold/recomputed.py), cached and fused for the frozen stem and
layer1), "compile" (torch.compile of the reference's forward + loss, no freezing: the weights
train). Reduced precision = torch.autocast, float32 weights, as DETR's AMP users run it.

Also here: whether autocast or training in a dtype can run on a device (``autocast_unavailable_reason``,
``train_unavailable_reason``), and the peak memory of a call on CPU (``cpu_peak_memory``: the
profiler's memory events).
"""
import contextlib
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..backbone import Joiner
from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from ..sine import pad_images_reference
from .implementations import build_reference_joiner, compile_unavailable_reason, make_fast_joiner
from .machine import cpu_info
from .model_zoo import Unavailable
from .timing import peak_memory

TRAIN_STAGE = "train"
TRAIN_IMPLS = ("reference", "detr_fast", "compile")
PARTS = ("forward", "backward")

def _mkldnn_says(name: str) -> Optional[bool]:
    fn = getattr(getattr(torch.ops, "mkldnn", None), name, None)
    try:
        return bool(fn()) if fn is not None else None
    except Exception:
        return None


def autocast_unavailable_reason(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why autocast in ``dtype`` would not be hardware-supported on ``device`` (None: it is, or no
    autocast). On CPU, bf16 needs AVX512-BF16 or AMX-BF16 (oneDNN emulates it otherwise, slower than
    float32), fp16 needs AVX512-FP16 or AMX-FP16."""
    device = torch.device(device)
    if dtype is None or dtype == torch.float32:
        return None
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
        return None
    info = cpu_info()
    if dtype == torch.bfloat16:
        if info["bf16_flags"] or _mkldnn_says("_is_mkldnn_bf16_supported"):
            return None
        return (f"this CPU ({info['model_name']}) has no bfloat16 hardware (neither avx512_bf16 nor amx_bf16 in "
                "/proc/cpuinfo): bf16 autocast would be emulated, slower than float32")
    if dtype == torch.float16:
        if info["fp16_flags"] or _mkldnn_says("_is_mkldnn_fp16_supported"):
            return None
        return (f"this CPU ({info['model_name']}) has no float16 hardware (neither avx512_fp16 nor amx_fp16); "
                "use --autocast bfloat16")
    return f"autocast in {dtype} is not supported"


@functools.lru_cache(maxsize=None)
def train_unavailable_reason(device: str, dtype: str) -> Optional[str]:
    """Why a training step with weights and images in ``dtype`` cannot run on ``device``: a
    frozen-BN conv's forward and backward tried once on a tiny problem."""
    dev = torch.device(device)
    torch_dtype = getattr(torch, dtype)
    if dev.type == "cpu" and torch_dtype == torch.float16:
        reason = autocast_unavailable_reason(dev, torch.float16)
        if reason:
            return reason.replace("use --autocast bfloat16", "train in float32 (with --autocast bfloat16)")
    try:
        conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(dev, torch_dtype)
        x = torch.randn(1, 3, 8, 8, device=dev, dtype=torch_dtype)
        with torch.enable_grad():
            conv(x).square().mean().backward()
        if conv.weight.grad is None or not bool(torch.isfinite(conv.weight.grad).all()):
            return f"the {dtype} convolution's backward on {device} gives no finite gradient"
    except Exception as err:
        return f"a {dtype} convolution cannot train on {device}: {type(err).__name__}: {str(err)[:120]}"
    return None


# ---------------------------------------------------------------- the models and the loss

def build_train_joiner(variant: str = "layers2-4", seed: int = 0) -> Joiner:
    """The reference Joiner as DETR trains it (lr_backbone > 0): layers 2-4 trainable, the stem and
    layer1 frozen, frozen BN with random non-identity statistics; in train mode."""
    return build_reference_joiner(variant, seed, train_backbone=True).train()


@functools.lru_cache(maxsize=None)
def train_joiners(variant: str, device: str, dtype: str = "float32") -> Tuple[Joiner, Joiner]:
    """(reference, detr_fast) training Joiners with the same weights, built once."""
    reference = build_train_joiner(variant).to(device=torch.device(device), dtype=getattr(torch, dtype))
    return reference, make_fast_joiner(reference).train()


def train_loss(features: Sequence[Any], pos: Sequence[Tensor]) -> Tensor:
    """A loss over every level that reads the features and the position embeddings (as DETR's
    transformer adds pos to the projected features): mean(f^2) + mean(mean_c(f) * pos), in float32."""
    total = None
    for f, p in zip(features, pos):
        f = f.tensors if hasattr(f, "tensors") else f
        f = f.float()
        term = f.square().mean() + (f.mean(1, keepdim=True) * p.float()).mean()
        total = term if total is None else total + term
    assert total is not None
    return total


def trainable_grads(model: nn.Module) -> Dict[str, Tensor]:
    return {k: p.grad for k, p in model.named_parameters() if p.requires_grad and p.grad is not None}


# ---------------------------------------------------------------- the step

class TrainStep:
    """One training step of ``model``: ``forward(images) -> loss`` (under autocast when asked),
    ``backward(loss)``; calling it runs zero_grad, both, and returns the gradients. ``parts_ms``
    records each call's forward and backward times (CUDA-synchronized on CUDA)."""

    def __init__(self, name: str, model: nn.Module, device: torch.device, autocast: Optional[torch.dtype] = None,
                 compiled: bool = False):
        self.name = name
        self.model = model
        self.device = torch.device(device)
        self.autocast = autocast
        pad = (lambda images: pad_images_reference(images)) if name != "detr_fast" else nested_tensor_from_tensor_list
        self._pad = pad

        def forward(images: List[Tensor]) -> Tensor:
            padded = self._pad(images)
            nested = padded if name == "detr_fast" else _nested(padded)
            out, pos = model(nested)
            return train_loss(out, pos)
        self._forward = torch.compile(forward, dynamic=False) if compiled else forward
        self.parts_ms: Dict[str, List[float]] = {part: [] for part in PARTS}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, images: List[Tensor]) -> Tensor:
        context = (torch.autocast(self.device.type, dtype=self.autocast)
                   if self.autocast not in (None, torch.float32) else contextlib.nullcontext())
        with torch.enable_grad(), context:
            return self._forward(images)

    def backward(self, loss: Tensor) -> None:
        with torch.enable_grad():
            loss.backward()

    def __call__(self, images: List[Tensor]) -> Dict[str, Tensor]:
        self.model.zero_grad(set_to_none=True)
        self._sync()
        start = time.perf_counter()
        loss = self.forward(images)
        self._sync()
        middle = time.perf_counter()
        self.backward(loss)
        self._sync()
        end = time.perf_counter()
        self.parts_ms["forward"].append((middle - start) * 1e3)
        self.parts_ms["backward"].append((end - middle) * 1e3)
        return trainable_grads(self.model)


def _nested(padded):
    return NestedTensor(*padded)


def train_step(impl: str, variant: str, device: torch.device, autocast: Optional[torch.dtype] = None,
               dtype: str = "float32") -> TrainStep:
    """The training step of ``impl`` (TRAIN_IMPLS) over the cached training Joiners; raises
    Unavailable where it cannot run here."""
    if impl not in TRAIN_IMPLS:
        raise Unavailable(f"{impl} has no training step (training runs in PyTorch: {', '.join(TRAIN_IMPLS)})")
    device = torch.device(device)
    reason = train_unavailable_reason(str(device), dtype) or autocast_unavailable_reason(device, autocast)
    if reason is None and impl == "compile":
        reason = compile_unavailable_reason(device)
    if reason:
        raise Unavailable(reason)
    reference, fast = train_joiners(variant, str(device), dtype)
    if impl == "detr_fast":
        return TrainStep("detr_fast", fast, device, autocast)
    return TrainStep(impl, reference, device, autocast, compiled=impl == "compile")


def gradient_error(grads: Dict[str, Tensor], expected: Dict[str, Tensor]) -> float:
    """Norm-wise worst over parameters: max_k ||g_k - e_k|| / ||e_k|| (float64)."""
    if grads.keys() != expected.keys():
        return float("inf")
    worst = 0.0
    for k, e in expected.items():
        e = e.double()
        worst = max(worst, float((grads[k].double() - e).norm() / e.norm().clamp_min(1e-30)))
    return worst


def elementwise_gradient_error(grads: Dict[str, Tensor], expected: Dict[str, Tensor]) -> float:
    """Element-wise worst over parameters: max_k max|g_k - e_k| / max|e_k| (float64)."""
    worst = 0.0
    for k, e in expected.items():
        e = e.double()
        worst = max(worst, float((grads[k].double() - e).abs().max() / e.abs().max().clamp_min(1e-30)))
    return worst


# ---------------------------------------------------------------- memory

def cpu_peak_memory(fn: Callable[[], Any]) -> Optional[Dict[str, int]]:
    """Peak CPU bytes allocated by one call of fn() beyond what was allocated before it (outputs
    included), from torch.profiler's memory events (profile_memory=True): the running sum of
    allocations and frees in time order, its maximum. None where the profiler gives no events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None or not hasattr(results, "events"):
        return None
    events = sorted((e.start_ns(), e.nbytes()) for e in results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    if not events:
        return None
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return {"peak_bytes": int(peak), "stage_peak_bytes": int(peak)}


def step_peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[Dict[str, int]]:
    """The peak memory of one call: torch.cuda.max_memory_allocated on CUDA, the profiler's memory
    events on CPU."""
    device = torch.device(device)
    return peak_memory(fn, device) if device.type == "cuda" else cpu_peak_memory(fn)
