"""pytest-benchmark configuration: command-line options, parametrization and the measuring loop.

    pytest bench/ --benchmark-only [--bench-scale S] [--bench-batches 2,8] [--bench-dtypes ...]
                                   [--bench-impls ...] [--bench-device ...] [--bench-warmup N]
                                   [--bench-models detr,rtdetr] [--bench-model-scale S]

The same command runs on CPU and CUDA; the defaults follow the device (full DETR sizes and
float32 + bfloat16 on CUDA; a quarter of the size and float32 on a CPU, so that the whole run takes
minutes on two cores). The model stage (test_bench_model.py: whole transformers detectors) has
its own sizes and batch per detector (--bench-models, --bench-model-scale; see
measure.model_case). Each test module sets STAGE; every test is parametrized by the case
(level, dtype, batch, shape) and by the implementation, and its rows of a stage, level, dtype and
shape share a benchmark group, so the comparison table lines reference, detr_fast, compile and
onnxruntime up. What each row runs is defined once, in detr_fast.measure.stages (shared with
`python -m detr_fast profile` and tests/measure/test_bench_smoke.py).
"""
import signal
import threading
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

try:
    import pytest_benchmark  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise pytest.UsageError("bench/ needs pytest-benchmark: pip install -e '.[test]'") from err

from detr_fast import measure
from detr_fast.measure import model_zoo
from detr_fast.measure.timing import peak_memory
from detr_fast.measure.training import step_peak_memory

CPU_DEFAULT_SCALE = 0.25
CUDA_DEFAULT_SCALE = 1.0


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def pytest_configure(config):
    # A time limit (timeout(1) sends SIGTERM) stops the run the way Ctrl-C does: pytest finishes
    # the session, so pytest-benchmark still writes the rows measured so far to --benchmark-json
    # instead of nothing (bench/run_gpu.sh under a device's per-command limit).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_like_ctrl_c)


def pytest_addoption(parser):
    group = parser.getgroup("detr_fast benchmarks")
    group.addoption("--bench-device", default=None,
                    help="cuda, cuda:N or cpu (default: cuda when available, else cpu)")
    group.addoption("--bench-scale", type=float, default=None,
                    help=f"image size factor on DETR's 800x1066 and 750x1333 (default {CUDA_DEFAULT_SCALE} "
                         f"on CUDA, {CPU_DEFAULT_SCALE} on CPU)")
    group.addoption("--bench-batches", default="2,8",
                    help="comma-separated numbers of images, DETR's pair repeated (default 2,8)")
    group.addoption("--bench-dtypes", default=None,
                    help="comma-separated among float32, bfloat16, float16 (default float32,bfloat16 on "
                         "CUDA, float32 on CPU); reduced precision = autocast for backbone and joiner")
    group.addoption("--bench-light-scale", type=float, default=1.0,
                    help="image size factor for the cheap stages (pad, masks, pos, masks_pos); default "
                         "1.0 everywhere: at a reduced size their levels are a few pixels and the "
                         "numbers measure Python call overhead, not the work")
    group.addoption("--bench-impls", default=",".join(measure.IMPLS),
                    help=f"comma-separated among {', '.join(measure.IMPLS)} (default all)")
    group.addoption("--bench-models", default=",".join(measure.BENCH_MODELS),
                    help=f"the model stage's detectors (transformers, random weights, detr_fast.measure.model_zoo): "
                         f"comma-separated among {', '.join(model_zoo.MODELS)} (default "
                         f"{','.join(measure.BENCH_MODELS)})")
    group.addoption("--bench-model-scale", type=float, default=1.0,
                    help="image size factor of the model stage (default 1.0: on CUDA DETR's pair and 640x640; "
                         "on CPU two 400x600 images for the DETR family and 640x640 for rtdetr and dfine)")
    group.addoption("--bench-warmup", type=int, default=None,
                    help="untimed calls before measuring, after the first one (which compiles and is "
                         "checked against the reference); default 3 on CUDA, 0 on CPU")


@dataclass(frozen=True)
class Settings:
    device: torch.device
    scale: float
    light_scale: float
    batches: List[int]
    dtypes: List[str]
    impls: List[str]
    warmup: int
    models: List[str]
    model_scale: float
    # The train stage's dtypes: --bench-dtypes when given, else float32 and bfloat16 autocast on
    # every device (a CPU without bf16 hardware skips those rows with the reason).
    train_dtypes: List[str]

    def scale_of(self, stage: str) -> float:
        """--bench-scale for the network stages, --bench-light-scale for the cheap ones,
        --bench-model-scale for the model stage."""
        if stage == measure.MODEL_STAGE:
            return self.model_scale
        return self.scale if stage in measure.NETWORK_STAGES + (measure.TRAIN_STAGE,) else self.light_scale

    def cases(self, stage: str) -> List[measure.Case]:
        if stage == measure.MODEL_STAGE:
            return measure.model_cases(self.models, self.model_scale, self.dtypes, self.device)
        if stage == measure.TRAIN_STAGE:
            return measure.cases(stage, self.scale, self.batches, self.train_dtypes)
        return measure.cases(stage, self.scale_of(stage), self.batches, self.dtypes)

    def case(self, stage: str, level: str, dtype: str, batch: int) -> measure.Case:
        if stage == measure.MODEL_STAGE:
            return measure.model_case(level, dtype, self.device, self.model_scale)
        return measure.Case(stage, level, dtype, batch, self.scale_of(stage))


def _split(value: str, option: str, allowed=None) -> List[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise pytest.UsageError(f"{option} must name at least one value, got {value!r}")
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise pytest.UsageError(f"{option}: {bad} not among {list(allowed)}")
    return items


def settings(config) -> Settings:
    cached = getattr(config, "_detr_fast_bench_settings", None)
    if cached is not None:
        return cached
    name = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--bench-device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--bench-device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise pytest.UsageError(f"--bench-device must be cpu or cuda[:N], got {name!r}")
    on_cuda = device.type == "cuda"
    scale = config.getoption("--bench-scale")
    scale = scale if scale is not None else (CUDA_DEFAULT_SCALE if on_cuda else CPU_DEFAULT_SCALE)
    if not 0 < scale <= 4:
        raise pytest.UsageError(f"--bench-scale must be in (0, 4], got {scale}")
    light_scale = config.getoption("--bench-light-scale")
    if not 0 < light_scale <= 4:
        raise pytest.UsageError(f"--bench-light-scale must be in (0, 4], got {light_scale}")
    try:
        batches = [int(b) for b in _split(config.getoption("--bench-batches"), "--bench-batches")]
    except ValueError as err:
        raise pytest.UsageError(f"--bench-batches must be comma-separated ints: {err}") from err
    if any(b < 1 for b in batches):
        raise pytest.UsageError(f"--bench-batches must be >= 1, got {batches}")
    dtypes = config.getoption("--bench-dtypes") or ("float32,bfloat16" if on_cuda else "float32")
    train_dtypes = config.getoption("--bench-dtypes") or "float32,bfloat16"
    warmup = config.getoption("--bench-warmup")
    warmup = warmup if warmup is not None else (3 if on_cuda else 0)
    if warmup < 0:
        raise pytest.UsageError(f"--bench-warmup must be >= 0, got {warmup}")
    model_scale = config.getoption("--bench-model-scale")
    if not 0 < model_scale <= 4:
        raise pytest.UsageError(f"--bench-model-scale must be in (0, 4], got {model_scale}")
    result = Settings(device, scale, light_scale, batches, _split(dtypes, "--bench-dtypes", measure.DTYPES),
                      _split(config.getoption("--bench-impls"), "--bench-impls", measure.IMPLS), warmup,
                      _split(config.getoption("--bench-models"), "--bench-models", model_zoo.MODELS), model_scale,
                      _split(train_dtypes, "--bench-dtypes", measure.DTYPES))
    config._detr_fast_bench_settings = result
    return result


def pytest_generate_tests(metafunc):
    stage = getattr(metafunc.module, "STAGE", None)
    if stage is None or "case" not in metafunc.fixturenames:
        return
    s = settings(metafunc.config)
    all_cases = s.cases(stage)
    # Plain values, not Case objects, so that the benchmark JSON's "params" hold them (the shape
    # included) and rows from different runs pair up; the `case` fixture rebuilds the Case.
    metafunc.parametrize(("level", "dtype", "batch", "shape"),
                         [(c.level, c.dtype, c.batch, c.shape) for c in all_cases], ids=[c.id for c in all_cases])
    metafunc.parametrize("impl", s.impls)


@pytest.fixture
def case(request, level, dtype, batch, shape) -> measure.Case:
    stage = request.module.STAGE
    result = settings(request.config).case(stage, level, dtype, batch)
    assert result.shape == shape and result.batch == batch
    return result


def _synchronized(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)  # the measured time is the device's, not the launch's
        return out
    return call


def _peak_memory(fn, device: torch.device, train: bool = False) -> Optional[dict]:
    """Peak bytes allocated by one call (CUDA; on CPU for the train stage only, from the profiler's
    memory events: the CPU allocator keeps no statistics)."""
    mem = step_peak_memory(fn, device) if train else peak_memory(fn, device)
    if mem is None:
        return None
    return {"peak_memory_bytes": mem["peak_bytes"], "peak_memory_over_inputs_bytes": mem["stage_peak_bytes"]}


@pytest.fixture
def run_stage(benchmark, request):
    """run_stage(case, impl): build, warm up (compilation included), check, then measure."""
    s = settings(request.config)

    def run(case: measure.Case, impl: str) -> None:
        benchmark.group = case.group
        benchmark.extra_info.update({
            "stage": case.stage, "impl": impl, "device": str(s.device), "device_name": measure.device_name(s.device),
            "dtype": case.dtype, "batch": case.batch, "shape": case.shape, "level": case.level,
            "scale": case.scale, "image_sizes": [list(hw) for hw in case.image_sizes],
            "threads": torch.get_num_threads(), "cpu": measure.cpu_label(),
        })
        if case.stage == measure.MODEL_STAGE:
            benchmark.extra_info["model"] = model_zoo.describe(case.level, case.tiny)
        try:
            runner = measure.build(case, impl, s.device)
        except measure.NotMeasured as why:
            pytest.skip(f"{impl} not measured for this stage: {why}")
        except measure.Unavailable as why:
            pytest.skip(f"{impl} unavailable: {why}")
        fn = _synchronized(runner.fn, s.device)
        with torch.no_grad():
            try:
                out = fn()  # the first call compiles (torch.compile, Triton autotuning): not timed
            except Exception as err:
                if impl != "compile":
                    raise
                pytest.skip(f"torch.compile failed here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            benchmark.extra_info["max_error"] = runner.error(out)
            del out
            for _ in range(s.warmup):
                fn()
            memory = _peak_memory(fn, s.device, train=case.stage == measure.TRAIN_STAGE)
            if memory:
                benchmark.extra_info.update(memory)
            benchmark(fn)
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what produced the numbers: the device and the versions. (The commit is in the JSON's
    commit_info already; keeping it out of machine_info lets --benchmark-compare compare commits
    on one machine without a "machine_info is different" warning.)"""
    s = settings(config)
    info = {"device": str(s.device), "device_name": measure.device_name(s.device), "torch": torch.__version__,
            "cuda": torch.version.cuda, "scale": s.scale, "light_scale": s.light_scale, "warmup": s.warmup,
            "model_scale": s.model_scale, "threads": torch.get_num_threads(), "cpu": measure.cpu_info()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except Exception:
        info["transformers"] = None
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if s.device.type == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        major, minor = torch.cuda.get_device_capability(s.device)
        info["capability"] = f"{major}.{minor}"
    machine_info["detr_fast_bench"] = info
