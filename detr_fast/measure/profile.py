"""`python -m detr_fast profile`: the stage timed the way a user would check it.

Default (``--model joiner``): builds a reference Joiner (the reference path everywhere) and a
detr_fast Joiner with the same random, non-identity weights (detr_fast.measure.stages), runs both on a
DETR-size batch and prints a per-stage table (pad, backbone, masks, pos, masks_pos = both as the
Joiner runs them, total = pad + Joiner), each stage's input being the previous stage's output of
the same implementation.

``--model detr|deformable-detr|rtdetr|dfine``: a whole transformers detector (detr_fast.measure.model_zoo:
its default config, random weights) and ``detr_fast.convert`` of a deep copy of it, with the rows
backbone (the conv encoder), pos (the DETR family's sine embedding of the last level, on that
implementation's backbone output) and total (the full forward; its error = the relative errors of
logits and boxes), and the backbone's share of the forward on each side.

How it measures (../shared/DESIGN.md, "Measuring"): per stage, both implementations are warmed up,
then run in interleaved pairs whose order alternates (reference then detr_fast, detr_fast then
reference, ...) so that a machine getting slower or faster during the stage affects both alike.
The speed-up is the median of the ratios of blocks of two pairs (A B B A: each side once right
after the other and once right after itself), with their interquartile range; each side's time is
its median. A ratio whose spread is too large (or measured on too few blocks) is flagged.

For looking inside: on CUDA every timed call runs inside an NVTX range ("reference/backbone", ...),
so `nsys profile python -m detr_fast profile` shows the stages on the timeline; `--trace PATH` also
records one untimed pass of every stage with torch.profiler and writes a Chrome trace
(chrome://tracing or https://ui.perfetto.dev) whose ranges carry the same names.
"""
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..conversion import conversion_report
from ..dispatch import env_backend
from . import model_zoo
from .cases import DTYPES, MODEL_STAGE, Case, make_images
from .cases import STAGES as BENCH_STAGES
from .errors import detector_error, error, prediction_errors
from .implementations import (
    Detector,
    DetrFast,
    Implementation,
    Reference,
    build_reference_joiner,
    make_fast_joiner,
    make_fast_model,
)
from .machine import cpu_info, device_name
from .report import ALLOCATOR_VARIABLES, notes
from .timing import MIN_STAGE_SECONDS, in_range, interleave, nvtx_range, peak_memory, quantile, ratio_summary
from .training import PARTS, gradient_error, step_peak_memory, train_step

CPU_DEFAULT_SCALE = 0.5     # a 2-core CPU runs the full size in minutes, not about one
CPU_DEFAULT_REPS = 12       # the backbone and total take ~1.3 s a pair on 2 cores at scale 0.5
CUDA_DEFAULT_REPS = 30
# The table's rows and the stage (detr_fast.measure.stages) each one runs: "total" is pad + Joiner.
ROWS = (("pad", "pad"), ("backbone", "backbone"), ("masks", "masks"), ("pos", "pos"),
        ("masks_pos", "masks_pos"), ("total", "joiner"))
STAGES = tuple(row for row, _ in ROWS)


def log(msg: str) -> None:
    print(f"[detr_fast profile] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the chained stages

@dataclass
class Step:
    """One row of the table: ``stage`` of every implementation, called on ``args(outputs)`` (the
    earlier stages' outputs of the same implementation, keyed by stage: the profile's chain);
    ``error(out, expected)`` is the detr_fast output's error against the reference's; ``same``: both
    sides run the same function here."""
    row: str
    stage: str
    args: Callable[[Dict[str, Any]], tuple]
    error: Callable[[Any, Any], float]
    same: bool = False


def stage_inputs(stage: str, images: List[Tensor], outputs: Dict[str, Any]) -> tuple:
    """The inputs of `stage` (detr_fast.measure.stages) from the earlier stages' ``outputs`` of the same
    implementation: the profile's chain."""
    if stage in ("pad", "joiner"):
        return (images,)
    nested = outputs["pad"]
    if stage == "backbone":
        return (nested.tensors,)
    features = list(outputs["backbone"].values())
    if stage == "masks":
        return (nested, [(int(f.shape[-2]), int(f.shape[-1])) for f in features])
    if stage == "pos":
        return (features, outputs["masks"])
    if stage == "masks_pos":
        return (nested, features)
    raise ValueError(f"stage must be one of {BENCH_STAGES}, got {stage!r}")


def joiner_steps(images: List[Tensor], fast: Implementation, device: torch.device,
                 dtype: torch.dtype) -> List[Step]:
    """The Joiner's rows (ROWS), each stage's input the previous stage's output."""
    steps = []
    for row, stage in ROWS:
        check_dtype = dtype if stage in ("pos", "masks_pos") else None
        steps.append(Step(row, stage, functools.partial(stage_inputs, stage, images),
                          functools.partial(_joiner_error, stage, check_dtype),
                          same=fast.same_as_reference(stage, device)))
    return steps


def _joiner_error(stage: str, check_dtype: Optional[torch.dtype], out: Any, expected: Any) -> float:
    return error(stage, out, expected, check_dtype)


def model_steps(model: str, inputs: Dict[str, Tensor]) -> List[Step]:
    """A detector's rows (detr_fast.measure.model_zoo): backbone (the conv encoder), pos (the DETR family's
    sine embedding of the last level, on that implementation's backbone output) and total (the
    full forward)."""
    backbone_args = model_zoo.backbone_inputs(inputs)
    steps = [Step("backbone", "backbone", lambda outputs: backbone_args,
                  functools.partial(detector_error, "backbone"))]
    if model_zoo.spec(model).has_pos:
        steps.append(Step("pos", "pos", lambda outputs: tuple(outputs["backbone"][-1]),
                          functools.partial(detector_error, "pos")))
    steps.append(Step("total", MODEL_STAGE, lambda outputs: (inputs,),
                      functools.partial(detector_error, MODEL_STAGE)))
    return steps


def measure_steps(steps: Sequence[Step], impls: Sequence[Implementation], reps: int, device: torch.device,
                  min_time: float = MIN_STAGE_SECONDS, on_step: Optional[Callable[[Optional[Step]], None]] = None
                  ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Any]]]:
    """Every step, reference (impls[0]) and detr_fast (impls[1]) in interleaved pairs (interleave);
    returns (rows, outputs): each row's summary (ratio_summary, error, memory) and each
    implementation's last output of each stage. ``on_step(step)`` runs before each step's timing,
    ``on_step(None)`` after it (before the memory measurement)."""
    outputs: Dict[str, Dict[str, Any]] = {impl.name: {} for impl in impls}
    rows: Dict[str, Dict[str, Any]] = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    on_step = on_step or (lambda step: None)
    for step in steps:
        calls = [functools.partial(impl.function(step.stage), *step.args(outputs[impl.name])) for impl in impls]
        on_step(step)
        log(f"{step.row}: reference and detr_fast, interleaved")
        pairs = interleave(in_range(calls[0], f"reference/{step.row}", device),
                           in_range(calls[1], f"detr_fast/{step.row}", device), reps, min_time=min_time, sync=sync)
        on_step(None)
        outputs[impls[0].name][step.stage], outputs[impls[1].name][step.stage] = pairs.a_out, pairs.b_out
        rows[step.row] = dict(stage=step.stage, **ratio_summary(pairs.a_ms, pairs.b_ms), same_function=step.same,
                              max_error=step.error(pairs.b_out, pairs.a_out),
                              reference_memory=peak_memory(calls[0], device),
                              detr_fast_memory=peak_memory(calls[1], device))
    return rows, outputs


def write_trace(path: str, impls: Sequence[Implementation], steps: Sequence[Step],
                outputs: Dict[str, Dict[str, Any]], device: torch.device) -> None:
    """One untimed pass of every step of every implementation under torch.profiler, as a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for impl in impls:
            for step in steps:
                call = impl.function(step.stage)
                args = step.args(outputs[impl.name])
                with record_function(f"{impl.name}/{step.row}"), nvtx_range(f"{impl.name}/{step.row} (trace)", device):
                    call(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    prof.export_chrome_trace(path)


def _report_header(device: torch.device, dtype: str, images: Sequence[Tuple[int, int]], scale: float, reps: int,
                   load_average: Optional[float], trace_path: Optional[str]) -> Dict[str, Any]:
    return {
        "device": str(device),
        "cpus": os.cpu_count(),
        "load_average": load_average,
        "device_name": device_name(device),
        "cpu": cpu_info(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": dtype,
        "batch": len(images),
        "scale": scale,
        "image_sizes": [list(hw) for hw in images],
        "reps": reps,
        "detr_fast_backend": env_backend(),
        "allocator_settings": {k: os.environ[k] for k in ALLOCATOR_VARIABLES if k in os.environ},
        "trace": trace_path,
    }


def _run_steps(steps: List[Step], impls: List[Implementation], reps: int, device: torch.device,
               min_time: float, trace_path: Optional[str],
               on_step: Optional[Callable[[Optional[Step]], None]] = None
               ) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict]]:
    # no_grad as DETR evaluates, not inference_mode: inference tensors have no version counter,
    # which NestedTensor.image_sizes and the folded weights' cache rely on.
    with torch.no_grad():
        rows, outputs = measure_steps(steps, impls, reps, device, min_time, on_step)
        if trace_path:
            log(f"{trace_path}: tracing one pass of every stage")
            write_trace(trace_path, impls, steps, outputs, device)
    return rows, outputs


def _profile_name(variant: str) -> str:
    return next(name for name, v in model_zoo.JOINER_VARIANTS.items() if v == variant)


def run_train_profile(device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                      autocast: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS,
                      variant: str = "layers2-4") -> Dict:
    """--train: one training step of the Joiner (detr_fast.measure.training: layers 2-4 trainable,
    frozen BN), reference and detr_fast in interleaved pairs; rows forward, backward (each step's
    own parts) and step (the whole step), errors = norm-wise worst relative gradient error."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    case = Case("joiner", variant, dtype, 2 * batch, scale)
    images = make_images(case, device, DTYPES[dtype])
    amp = DTYPES[autocast] if autocast else None
    steps = [train_step(name, variant, device, amp, dtype) for name in ("reference", "detr_fast")]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    log("step: reference and detr_fast, interleaved (forward + backward)")
    pairs = interleave(lambda: steps[0](images), lambda: steps[1](images), reps, min_time=min_time, sync=sync)
    error = gradient_error(pairs.b_out, pairs.a_out)
    memory = [step_peak_memory(lambda s=s: s(images), device) for s in steps]
    rows: Dict[str, Dict[str, Any]] = {}
    n = len(pairs.a_ms)
    for part in PARTS:
        rows[part] = dict(stage=f"train_{part}", **ratio_summary(steps[0].parts_ms[part][-n - 1:-1],
                                                                 steps[1].parts_ms[part][-n - 1:-1]),
                          same_function=False, max_error=error if part == "backward" else 0.0,
                          reference_memory=None, detr_fast_memory=None)
    rows["step"] = dict(stage="train", **ratio_summary(pairs.a_ms, pairs.b_ms), same_function=False,
                        max_error=error, reference_memory=memory[0], detr_fast_memory=memory[1])
    report = _report_header(device, dtype, [tuple(img.shape[1:]) for img in images], scale, reps, load_average, None)
    report.update(model=_profile_name(variant), train=True, autocast=autocast, stages=rows)
    report["notes"] = notes(report)
    return report


def run_profile(device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                trace_path: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS,
                autocast: Optional[str] = None, variant: str = "layers2-4") -> Dict:
    """The Joiner profile (--model joiner: the backbone stage of Deformable-DETR; dino-4scale:
    DINO-4scale's, temperatures 20/20), stage by stage."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch_dtype = DTYPES[dtype]
    case = Case("joiner", variant, dtype, 2 * batch, scale)
    images = make_images(case, device, torch_dtype)
    reference_model = build_reference_joiner(variant).to(device=device, dtype=torch_dtype)
    amp = DTYPES[autocast] if autocast else None
    impls = [Reference(reference_model, amp), DetrFast(make_fast_joiner(reference_model, log), amp)]
    steps = joiner_steps(images, impls[1], device, torch_dtype)
    rows, _ = _run_steps(steps, impls, reps, device, min_time, trace_path)
    report = _report_header(device, dtype, [tuple(img.shape[1:]) for img in images], scale, reps, load_average,
                            trace_path)
    report.update(model=_profile_name(variant), autocast=autocast, stages=rows)
    report["notes"] = notes(report)
    return report


def run_model_profile(model: str, device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                      trace_path: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS,
                      tiny: bool = False) -> Dict:
    """The profile of a whole detector (detr_fast.measure.model_zoo): backbone, pos (DETR family), total."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch_dtype = DTYPES[dtype]
    sizes = model_zoo.image_sizes(model, scale, batch)
    reference_model = model_zoo.build(model, tiny=tiny).to(device=device, dtype=torch_dtype)
    why = model_zoo.query_check(reference_model, model, sizes)
    if why:
        raise model_zoo.Unavailable(why)
    fast_model = make_fast_model(reference_model)
    conversion = str(conversion_report(fast_model))  # formatted once: logged now, kept in the report
    log(conversion)
    impls: List[Implementation] = [Detector("reference", reference_model),
                                          Detector("detr_fast", fast_model)]
    inputs = model_zoo.inputs(model, sizes, device, torch_dtype)
    steps = model_steps(model, inputs)
    timers = {impl.name: BackboneTimer(model_zoo.backbone_of(impl.model), device) for impl in impls}

    def on_step(step: Optional[Step]) -> None:
        for timer in timers.values():
            timer.active = step is not None and step.stage == MODEL_STAGE

    try:
        rows, outputs = _run_steps(steps, impls, reps, device, min_time, trace_path, on_step)
    finally:
        for timer in timers.values():
            timer.remove()
    total = rows["total"]
    total["errors"] = prediction_errors(outputs["detr_fast"][MODEL_STAGE],
                                               outputs["reference"][MODEL_STAGE])
    report = _report_header(device, dtype, sizes, scale, reps, load_average, trace_path)
    report.update(model=model, model_description=model_zoo.describe(model, tiny), tiny=tiny,
                  padded=model_zoo.spec(model).family == "detr", conversion=conversion, stages=rows,
                  backbone_in_forward={side: backbone_share(timers[side].times_ms(), total[f"{side}_times_ms"])
                                       for side in ("reference", "detr_fast")})
    report["backbone_share"] = {side: share["share"] for side, share in report["backbone_in_forward"].items()}
    report["notes"] = notes(report)
    return report


class BackboneTimer:
    """The conv encoder's own time inside every full forward, from forward hooks on it (CUDA
    events on CUDA, so nothing is synchronized inside the forward): the backbone's share of the
    very calls the total row times, rather than of two rows timed one after the other. Records
    only while ``active``."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.device = device
        self.active = False
        self._start: Any = None
        self._spans: List[Tuple[Any, Any]] = []
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _now(self) -> Any:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: Any) -> None:
        if self.active:
            self._start = self._now()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.active and self._start is not None:
            self._spans.append((self._start, self._now()))
            self._start = None

    def times_ms(self) -> List[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [start.elapsed_time(end) for start, end in self._spans]
        return [(end - start) * 1e3 for start, end in self._spans]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def backbone_share(backbone_ms: Sequence[float], total_ms: Sequence[float]) -> Dict[str, Any]:
    """The backbone's share of each timed forward (the last len(total_ms) backbone times: the
    earlier ones are the warm-up's), as medians: share, backbone ms and the rest (ms)."""
    if not total_ms or len(backbone_ms) < len(total_ms):
        raise ValueError(f"need a backbone time per forward: {len(backbone_ms)} for {len(total_ms)} forwards")
    inside = list(backbone_ms[-len(total_ms):])
    return {"share": quantile([b / max(t, 1e-9) for b, t in zip(inside, total_ms)], 0.5),
            "backbone_ms": quantile(inside, 0.5),
            "rest_ms": quantile([t - b for b, t in zip(inside, total_ms)], 0.5)}


