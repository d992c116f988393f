"""Backend selection: which implementation a module runs, decided explicitly and observably.

The user's vocabulary is the backend: "torch" is the reference path, "triton" the kernels, "auto"
picks the kernels for CUDA tensors when Triton imports and the PyTorch fallback otherwise (CPU,
TorchScript, ONNX export). The environment variable DETR_FAST_BACKEND, when set, replaces "auto"
(never an explicit choice). sine_path() turns a backend and a device into the path that runs.
"""
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "DETR_FAST_BACKEND"


def check_backend(backend: str) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def env_backend() -> str:
    """The value of DETR_FAST_BACKEND (default "auto"), validated."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def exporting() -> bool:
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    onnx = getattr(torch, "onnx", None)
    return bool(onnx is not None and hasattr(onnx, "is_in_onnx_export") and onnx.is_in_onnx_export())


@torch.jit.unused
def compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing the caller. Works across torch versions."""
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is None:  # older torch
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being recorded into a CUDA graph rather than run: nothing
    computed then may be cached for later eager calls (captured kernels run only at replay)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


PATHS = ("triton", "separable", "reference")


def sine_path(backend: str, device: torch.device) -> str:
    """The one decision of which implementation the masks/pos step runs for ``backend`` on
    ``device`` (validated on every call: a module's backend can be reassigned after __init__):

    - "triton": the kernels — backend "triton", or "auto" with CUDA tensors and Triton importable;
    - "reference": the reference formulas — backend "torch" (or DETR_FAST_BACKEND=torch replacing
      "auto"), TorchScript, tracing, ONNX export, and tracing by torch.compile off the kernels;
    - "separable": the PyTorch fallback for rectangular masks — "auto" everywhere else (CPU).
      Callers run the reference when the mask turns out not to be rectangular.
    """
    check_backend(backend)
    if exporting():
        return "reference"
    requested = env_backend() if backend == "auto" else backend
    if requested == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                             f"detr_fast.kernels is imported, to interpret the kernels), got tensors on {device}")
        return "triton"
    if requested == "auto" and device.type == "cuda" and triton_available():
        return "triton"
    if requested == "torch" or compiling():
        return "reference"
    return "separable"
