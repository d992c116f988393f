"""What the test files share: rectangular masks, random valid sizes, seeds and the kernels' devices.

Seeds. Random tests take the ``random_seed`` fixture (tests/conftest.py, a ``Seed``): a per-test
seed derived deterministically (SHA-256, not Python's salted ``hash()``) from the session seed and
the test's node id, so every test, and every parametrization of it, draws its own stream, the same
on every run (``random_seed.generator()``, ``random_seed.rng()``). Every test also starts with the
global torch RNG seeded from it, so draws without a generator are reproducible too. The session
seed comes from the environment variable ``DETR_FAST_TEST_SEED``:

- unset or empty: ``DEFAULT_SEED``, a fixed integer (runs are reproducible by default);
- an integer: that seed, e.g. ``DETR_FAST_TEST_SEED=1234 pytest tests/sine/test_sine_kernel.py``;
- ``random``: a fresh seed for the session, drawn from the operating system.

The session seed is printed in pytest's header; the failure messages of random tests name both
seeds ("seed=<per-test> (DETR_FAST_TEST_SEED=<session>)"), and every failed test's report has a
"random seed" section, so a failure found with ``DETR_FAST_TEST_SEED=random`` is reproduced with
``DETR_FAST_TEST_SEED=<session> pytest '<node id>'``. Tests with literal seeds (parametrized
``seed`` values, ``manual_seed(3)``) keep them whatever the variable says.

Devices. ``INTERPRETED`` reads ``TRITON_INTERPRET`` when this module is first imported; conftest sets
that variable (without a GPU) before it imports this module, and before Triton decorates a kernel.
"""
import hashlib
import os
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import pytest
import torch
from torch import nn

# ---------------------------------------------------------------- kernel devices

# The repository's root (tests/ sits in it), for the tests that run its scripts or read its files.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def kernel_devices() -> List[str]:
    """Devices on which the Triton kernels can run here: CPU when interpreted, CUDA when present."""
    devices = []
    if INTERPRETED:
        devices.append("cpu")
    if HAS_CUDA:
        devices.append("cuda")
    return devices


# ---------------------------------------------------------------- seeds

SEED_ENV = "DETR_FAST_TEST_SEED"
DEFAULT_SEED = 20240917

_session_seed: Optional[int] = None


def session_seed() -> int:
    """The session's seed from DETR_FAST_TEST_SEED (see the module docstring); drawn once per
    process for ``random``."""
    global _session_seed
    if _session_seed is None:
        value = os.environ.get(SEED_ENV, "").strip()
        if not value:
            _session_seed = DEFAULT_SEED
        elif value.lower() == "random":
            _session_seed = random.SystemRandom().randrange(2 ** 31)
        else:
            try:
                _session_seed = int(value)
            except ValueError:
                raise ValueError(f"{SEED_ENV} must be an integer or 'random', got {value!r}") from None
    return _session_seed


def derive_seed(session: int, name: str) -> int:
    """A seed in [0, 2**31) for ``name`` (a test's node id) under the session seed, the same in
    every process."""
    digest = hashlib.sha256(f"{session}/{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Seed:
    """One test's seed. ``str(seed)`` is the text failure messages carry."""

    value: int
    session: int

    @classmethod
    def for_test(cls, node_id: str) -> "Seed":
        session = session_seed()
        return cls(derive_seed(session, node_id), session)

    def generator(self) -> torch.Generator:
        """A CPU torch.Generator seeded with this test's seed."""
        return torch.Generator().manual_seed(self.value)

    def rng(self) -> random.Random:
        """A Python random.Random seeded with this test's seed."""
        return random.Random(self.value)

    def __str__(self) -> str:
        return f"seed={self.value} ({SEED_ENV}={self.session})"


# ---------------------------------------------------------------- masks and sizes

def rect_mask(sizes: Sequence[Tuple[int, int]], height: int, width: int, device="cpu") -> torch.Tensor:
    """A B x height x width padding mask (True = padding) whose image b is valid on the top-left
    sizes[b] = (h, w) rectangle: what nested_tensor_from_tensor_list builds, written out."""
    mask = torch.ones((len(sizes), height, width), dtype=torch.bool, device=device)
    for b, (h, w) in enumerate(sizes):
        mask[b, :h, :w] = False
    return mask


def random_sizes(gen: torch.Generator, batch: int, height: int, width: int) -> List[Tuple[int, int]]:
    """Per-image valid sizes within height x width; some images full, some with all-padding rows or
    columns (0 extents)."""
    sizes = []
    for _ in range(batch):
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        if kind == 0:
            sizes.append((height, width))
        elif kind == 1:
            sizes.append((int(torch.randint(0, height + 1, (1,), generator=gen)), 0))
        else:
            sizes.append((int(torch.randint(0, height + 1, (1,), generator=gen)),
                          int(torch.randint(0, width + 1, (1,), generator=gen))))
    return sizes


class TinyBody(nn.Module):
    """Three strided convolutions named like ResNet layers (strides 2, 4, 8)."""

    def __init__(self):
        super().__init__()
        self.layer2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.layer3 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.layer4 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.layer4(self.layer3(self.layer2(x)))


def tiny_joiner(embedding: nn.Module) -> nn.Module:
    """detr_fast's Joiner over TinyBody (levels at strides 2, 4, 8) and ``embedding``, in eval mode."""
    from detr_fast.backbone import MaskedBackboneBase
    from detr_fast.joiner import JoinerBase

    torch.manual_seed(0)
    backbone = MaskedBackboneBase(TinyBody(), False, {"layer2": "0", "layer3": "1", "layer4": "2"})
    return JoinerBase(backbone, embedding).eval()
