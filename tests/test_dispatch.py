"""Backend selection: validation, the DETR_FAST_BACKEND override of "auto", and the one decision
point, dispatch.sine_path (which implementation the masks/pos step runs)."""
import pytest
import torch

from detr_fast import dispatch
from detr_fast.dispatch import PATHS, check_backend, sine_path

CPU = torch.device("cpu")
# sine_path only looks at the device's type: a CUDA device object needs no GPU.
CUDA = torch.device("cuda")
# The documented name, written out: taking it from detr_fast.dispatch would test the code against itself.
ENV_VAR = "DETR_FAST_BACKEND"


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_check_backend_accepts_known_names(backend):
    assert check_backend(backend) == backend


@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, 1, "reference"])
def test_check_backend_rejects_unknown(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend(backend)


@pytest.mark.parametrize("backend", ["cuda", "Torch", None])
def test_sine_path_rejects_unknown_backends(backend):
    with pytest.raises(ValueError, match="backend must be one of"):
        sine_path(backend, CPU)


def test_auto_on_cpu_is_the_separable_fallback():
    assert sine_path("auto", CPU) == "separable"


def test_auto_on_cuda_follows_triton_availability(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert sine_path("auto", CUDA) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert sine_path("auto", CUDA) == "separable"  # CUDA without Triton: the PyTorch fallback


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("backend, path", [("torch", "reference"), ("triton", "triton")])
def test_explicit_choice_is_kept(backend, path, device):
    assert sine_path(backend, device) == path


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_env_overrides_auto(monkeypatch, device):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv(ENV_VAR, "triton")
    assert sine_path("auto", device) == "triton"
    monkeypatch.setenv(ENV_VAR, "torch")
    assert sine_path("auto", device) == "reference"


def test_env_value_is_normalized(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "  Triton ")
    assert sine_path("auto", CPU) == "triton"
    for value in ("", "auto", "AUTO"):
        monkeypatch.setenv(ENV_VAR, value)
        assert sine_path("auto", CPU) == "separable"


@pytest.mark.parametrize("explicit, path", [("torch", "reference"), ("triton", "triton")])
def test_env_never_overrides_an_explicit_choice(monkeypatch, explicit, path):
    other = "triton" if explicit == "torch" else "torch"
    monkeypatch.setenv(ENV_VAR, other)
    assert sine_path(explicit, CPU) == path
    # Not even an invalid value: it is only read for "auto".
    monkeypatch.setenv(ENV_VAR, "gpu")
    assert sine_path(explicit, CPU) == path


def test_invalid_env_value_raises(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match=ENV_VAR):
        sine_path("auto", CPU)


def test_tracing_always_takes_the_reference():
    seen = []

    def fn(x):
        seen.append(sine_path("triton", x.device))
        return x + 1

    # check_trace=False: the trace checker would also run fn eagerly, outside tracing.
    torch.jit.trace(fn, torch.zeros(2), check_trace=False)
    assert seen and set(seen) == {"reference"}
    assert sine_path("triton", CPU) == "triton"   # outside tracing the explicit choice holds


def test_scripting_resolves_sine_to_the_reference(monkeypatch):
    # Even with the environment asking for the kernels, a scripted module runs the reference path.
    from detr_fast import NestedTensor, PositionEmbeddingSine
    from tests.upstream_reference import UpstreamNestedTensor, UpstreamPositionEmbeddingSine

    monkeypatch.setenv(ENV_VAR, "triton")
    scripted = torch.jit.script(PositionEmbeddingSine(4, normalize=True))
    mask = torch.rand(1, 3, 5, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = UpstreamPositionEmbeddingSine(4, normalize=True)(UpstreamNestedTensor(torch.zeros(1, 1, 3, 5), mask))
    assert torch.equal(scripted(NestedTensor(torch.zeros(1, 1, 3, 5), mask)), expected)


def test_triton_available_says_whether_triton_imports():
    try:
        import triton  # noqa: F401
    except Exception:
        imports = False
    else:
        imports = True
    assert dispatch.triton_available() is imports


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        sine_path("triton", torch.device("cpu"))
    monkeypatch.setenv("DETR_FAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        sine_path("auto", torch.device("cpu"))


def test_sine_path_names_the_implementation(monkeypatch):
    """The one decision: the kernels, the reference (asked for, exported or compiled) or the
    separable fallback (auto without kernels)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert sine_path("auto", CPU) == "separable"
    assert sine_path("auto", CUDA) == "triton"
    assert sine_path("torch", CPU) == "reference" and sine_path("torch", CUDA) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert sine_path("auto", CUDA) == "separable"  # CUDA without Triton: the PyTorch fallback
    monkeypatch.setenv(ENV_VAR, "torch")
    assert sine_path("auto", CPU) == "reference"  # the environment asks for the reference
    assert sine_path("triton", CUDA) == "triton"  # ... but never overrides an explicit choice
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setattr(dispatch, "compiling", lambda: True)
    assert sine_path("auto", CPU) == "reference"  # torch.compile traces the reference
    monkeypatch.setattr(dispatch, "exporting", lambda: True)
    assert sine_path("triton", CUDA) == "reference"  # TorchScript / ONNX export
    with pytest.raises(ValueError, match="backend must be one of"):
        sine_path("fast", CPU)


def test_paths_lists_exactly_what_sine_path_returns(monkeypatch):
    """PATHS names every path sine_path can return, and only those (levels.py compares with them)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # "triton" on CPU is valid only when interpreted
    returned = set()
    for available in (True, False):
        monkeypatch.setattr(dispatch, "triton_available", lambda: available)
        for env in ("auto", "torch", "triton"):
            monkeypatch.setenv(ENV_VAR, env)
            for backend in ("auto", "torch", "triton"):
                for device in (CPU, CUDA):
                    returned.add(sine_path(backend, device))
    monkeypatch.setattr(dispatch, "compiling", lambda: True)
    returned.add(sine_path("auto", CPU))
    monkeypatch.setattr(dispatch, "exporting", lambda: True)
    returned.add(sine_path("triton", CUDA))
    assert returned == set(PATHS)
