"""pytest hooks and fixtures for the whole suite; what the test files share is in tests/helpers.py.

Without a GPU the Triton kernels run under Triton's interpreter. The variable must be set before
Triton decorates any kernel, i.e. before detr_fast.kernels is first imported, which is why it is
set here, when pytest loads this file (before it imports any test module), and not inside a test.
tests.helpers is imported only after it, since it reads the variable on import.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests import helpers  # noqa: E402

# Re-exported for test files that still import these from here; new code imports tests.helpers.
from tests.helpers import HAS_CUDA, INTERPRETED, kernel_devices, requires_cuda  # noqa: E402, F401


def pytest_configure(config):
    try:
        helpers.session_seed()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_report_header(config):
    seed = helpers.session_seed()
    note = "" if os.environ.get(helpers.SEED_ENV, "").strip() else " (the default)"
    return f"{helpers.SEED_ENV}={seed}{note}: set it to rerun with these random inputs (or to 'random')"


@pytest.fixture
def random_seed(request) -> helpers.Seed:
    """This test's seed: fixed per test node id and session seed (DETR_FAST_TEST_SEED)."""
    return helpers.Seed.for_test(request.node.nodeid)


@pytest.fixture(autouse=True)
def _seeded_torch_rng(random_seed):
    """The global torch RNG too starts every test from the test's own seed: unseeded draws
    (torch.randn without a generator) are as reproducible as the seeded ones."""
    torch.manual_seed(random_seed.value)


@pytest.hookimpl(hookwrapper=True)  # the old-style wrapper: pluggy < 1.2 (older GPU images) has no wrapper=True
def pytest_runtest_makereport(item, call):
    # A failing random test names its seed even where an assertion carries no context.
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "funcargs", {}).get("random_seed")
    if report.failed and isinstance(seed, helpers.Seed):
        report.sections.append(("random seed", f"{seed}; reproduce with "
                                               f"{helpers.SEED_ENV}={seed.session} pytest '{item.nodeid}'"))


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests choose their backend explicitly; a DETR_FAST_BACKEND in the environment must not leak in."""
    monkeypatch.delenv("DETR_FAST_BACKEND", raising=False)
