"""Test configuration shared by the whole suite.

Without a GPU the Triton kernels run under Triton's interpreter. The variable must be set before
Triton decorates any kernel, i.e. before detr_fast.kernels is first imported, which is why it is
set here, at collection time, and not inside a test.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def kernel_devices():
    """Devices on which the Triton kernels can run here: CPU when interpreted, CUDA when present."""
    devices = []
    if INTERPRETED:
        devices.append("cpu")
    if HAS_CUDA:
        devices.append("cuda")
    return devices


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose their backend explicitly; a DETR_FAST_BACKEND in the environment must not leak in."""
    monkeypatch.delenv("DETR_FAST_BACKEND", raising=False)
