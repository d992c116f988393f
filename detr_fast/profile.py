"""`python -m detr_fast profile`: the stage timed the way a user would check it.

Default (``--model joiner``): builds a reference Joiner (the reference path everywhere) and a
detr_fast Joiner with the same random, non-identity weights (detr_fast.stages), runs both on a
DETR-size batch and prints a per-stage table (pad, backbone, masks, pos, masks_pos = both as the
Joiner runs them, total = pad + Joiner), each stage's input being the previous stage's output of
the same implementation.

``--model detr|deformable-detr|rtdetr|dfine``: a whole transformers detector (detr_fast.model_zoo:
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
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import model_zoo, stages
from .convert import conversion_report
from .dispatch import env_backend

CPU_DEFAULT_SCALE = 0.5     # a 2-core CPU runs the full size in minutes, not about one
CPU_DEFAULT_REPS = 12       # the backbone and total take ~1.3 s a pair on 2 cores at scale 0.5
CUDA_DEFAULT_REPS = 30
MIN_STAGE_SECONDS = 0.5     # a cheap stage runs more pairs than --reps, for about this long ...
MAX_PAIRS = 100             # ... up to this many
TRUST_SPREAD = 0.10         # interquartile range of the ratios over their median above which a ratio is flagged
MIN_TRUSTED_RATIOS = 5      # fewer block ratios (2 pairs each) than this: no spread worth the name
DTYPES = stages.DTYPES
# The table's rows and the stage (detr_fast.stages) each one runs: "total" is pad + Joiner.
ROWS = (("pad", "pad"), ("backbone", "backbone"), ("masks", "masks"), ("pos", "pos"),
        ("masks_pos", "masks_pos"), ("total", "joiner"))
STAGES = tuple(row for row, _ in ROWS)


def log(msg: str) -> None:
    print(f"[detr_fast profile] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- measuring

@dataclass
class Pairs:
    """Times (ms) of two functions run in interleaved pairs, and each one's last output."""
    a_ms: List[float] = field(default_factory=list)
    b_ms: List[float] = field(default_factory=list)
    a_out: Any = None
    b_out: Any = None


def _timed_call(fn: Callable[[], Any], clock: Callable[[], float], sync: Callable[[], None]) -> Tuple[float, Any]:
    sync()
    start = clock()
    out = fn()
    sync()
    return (clock() - start) * 1e3, out


def interleave(a: Callable[[], Any], b: Callable[[], Any], reps: int, *, min_time: float = 0.0,
               max_pairs: int = MAX_PAIRS, clock: Callable[[], float] = time.perf_counter,
               sync: Callable[[], None] = lambda: None) -> Pairs:
    """Warm both up (one call each, b then a, not recorded), then time pairs of calls, alternating the
    order between pairs (a b, b a, a b, ...) so that a drift of the machine's speed weighs on both alike.

    Runs ``reps`` pairs, or more when a pair is cheap: as many as fit in ``min_time`` seconds
    (judged from the warm-up calls), at most ``max(reps, max_pairs)``; rounded up to an even
    number (whole blocks for block_ratios) beyond one. ``sync`` runs before and after every timed
    call (a CUDA synchronize), ``clock`` gives seconds.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    result = Pairs()
    # b then a: the first pair (a b) then finds a right after itself, as every later a b pair does.
    warm_b, result.b_out = _timed_call(b, clock, sync)
    warm_a, result.a_out = _timed_call(a, clock, sync)
    pair_seconds = (warm_a + warm_b) / 1e3
    wanted = max_pairs if pair_seconds <= 0 else math.ceil(min_time / pair_seconds - 1e-6)
    pairs = max(reps, min(wanted, max_pairs))
    pairs += pairs % 2 if pairs > 1 else 0  # whole A B B A blocks
    for i in range(pairs):
        if i % 2 == 0:
            t_a, result.a_out = _timed_call(a, clock, sync)
            t_b, result.b_out = _timed_call(b, clock, sync)
        else:
            t_b, result.b_out = _timed_call(b, clock, sync)
            t_a, result.a_out = _timed_call(a, clock, sync)
        result.a_ms.append(t_a)
        result.b_ms.append(t_b)
    return result


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of values, linearly interpolated (numpy's default)."""
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def block_ratios(reference_ms: Sequence[float], fast_ms: Sequence[float]) -> List[float]:
    """Speed-ups of interleaved pairs, one per block of two consecutive pairs (reference first, then
    detr_fast first: A B B A): sum of the reference's two times / sum of detr_fast's two. Within a
    block each side runs once right after the other side and once right after itself (warm caches,
    a reused allocation), and a steady drift of the machine's speed weighs on both alike; a lone last
    pair gives its own ratio."""
    if len(reference_ms) != len(fast_ms) or not reference_ms:
        raise ValueError("need two equally long, non-empty lists of paired times")
    ratios = []
    for i in range(0, len(reference_ms), 2):
        ref, fast = sum(reference_ms[i:i + 2]), sum(fast_ms[i:i + 2])
        ratios.append(ref / max(fast, 1e-9))
    return ratios


def ratio_summary(reference_ms: Sequence[float], fast_ms: Sequence[float]) -> Dict[str, Any]:
    """Each side's median time, and the median and quartiles of the block ratios (block_ratios)."""
    ratios = block_ratios(reference_ms, fast_ms)
    median = quantile(ratios, 0.5)
    p25, p75 = quantile(ratios, 0.25), quantile(ratios, 0.75)
    spread = (p75 - p25) / max(median, 1e-12)
    return {"reference_ms": quantile(reference_ms, 0.5), "detr_fast_ms": quantile(fast_ms, 0.5),
            "speedup": median, "speedup_p25": p25, "speedup_p75": p75, "spread": spread,
            "pairs": len(reference_ms), "ratios": len(ratios),
            "trusted": len(ratios) >= MIN_TRUSTED_RATIOS and spread <= TRUST_SPREAD,
            "reference_times_ms": list(reference_ms), "detr_fast_times_ms": list(fast_ms)}


@contextlib.contextmanager
def _nvtx(name: str, device: torch.device) -> Iterator[None]:
    """An NVTX range on CUDA (visible in Nsight Systems); nothing elsewhere."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def _in_range(fn: Callable[[], Any], name: str, device: torch.device) -> Callable[[], Any]:
    if device.type != "cuda":
        return fn

    def call():
        with _nvtx(name, device):
            return fn()
    return call


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[Dict[str, int]]:
    """CUDA memory of one call of fn(): the peak allocated, and the peak over what was allocated
    before the call (the stage's own working memory and outputs). None off CUDA: the CPU
    allocator keeps no such statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return {"peak_bytes": int(peak), "stage_peak_bytes": int(peak - before)}


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
    """The inputs of `stage` (detr_fast.stages) from the earlier stages' ``outputs`` of the same
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
    raise ValueError(f"stage must be one of {stages.STAGES}, got {stage!r}")


def joiner_steps(images: List[Tensor], fast: stages.Implementation, device: torch.device,
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
    return stages.error(stage, out, expected, check_dtype)


def model_steps(model: str, inputs: Dict[str, Tensor]) -> List[Step]:
    """A detector's rows (detr_fast.model_zoo): backbone (the conv encoder), pos (the DETR family's
    sine embedding of the last level, on that implementation's backbone output) and total (the
    full forward)."""
    backbone_args = model_zoo.backbone_inputs(inputs)
    steps = [Step("backbone", "backbone", lambda outputs: backbone_args,
                  functools.partial(stages.detector_error, "backbone"))]
    if model_zoo.spec(model).has_pos:
        steps.append(Step("pos", "pos", lambda outputs: tuple(outputs["backbone"][-1]),
                          functools.partial(stages.detector_error, "pos")))
    steps.append(Step("total", stages.MODEL_STAGE, lambda outputs: (inputs,),
                      functools.partial(stages.detector_error, stages.MODEL_STAGE)))
    return steps


def measure_steps(steps: Sequence[Step], impls: Sequence[stages.Implementation], reps: int, device: torch.device,
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
        pairs = interleave(_in_range(calls[0], f"reference/{step.row}", device),
                           _in_range(calls[1], f"detr_fast/{step.row}", device), reps, min_time=min_time, sync=sync)
        on_step(None)
        outputs[impls[0].name][step.stage], outputs[impls[1].name][step.stage] = pairs.a_out, pairs.b_out
        rows[step.row] = dict(stage=step.stage, **ratio_summary(pairs.a_ms, pairs.b_ms), same_function=step.same,
                              max_error=step.error(pairs.b_out, pairs.a_out),
                              reference_memory=peak_memory(calls[0], device),
                              detr_fast_memory=peak_memory(calls[1], device))
    return rows, outputs


def write_trace(path: str, impls: Sequence[stages.Implementation], steps: Sequence[Step],
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
                with record_function(f"{impl.name}/{step.row}"), _nvtx(f"{impl.name}/{step.row} (trace)", device):
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
        "device_name": stages.device_name(device),
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


def _run_steps(steps: List[Step], impls: List[stages.Implementation], reps: int, device: torch.device,
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


def run_profile(device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                trace_path: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS) -> Dict:
    """The Joiner profile (--model joiner): the backbone stage of Deformable-DETR, stage by stage."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch_dtype = DTYPES[dtype]
    case = stages.Case("joiner", "layers2-4", dtype, 2 * batch, scale)
    images = stages.make_images(case, device, torch_dtype)
    reference_model = stages.build_reference_joiner("layers2-4").to(device=device, dtype=torch_dtype)
    impls = [stages.Reference(reference_model), stages.DetrFast(stages.make_fast_joiner(reference_model, log))]
    steps = joiner_steps(images, impls[1], device, torch_dtype)
    rows, _ = _run_steps(steps, impls, reps, device, min_time, trace_path)
    report = _report_header(device, dtype, [tuple(img.shape[1:]) for img in images], scale, reps, load_average,
                            trace_path)
    report.update(model=model_zoo.JOINER, stages=rows)
    report["notes"] = notes(report)
    return report


def run_model_profile(model: str, device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                      trace_path: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS,
                      tiny: bool = False) -> Dict:
    """The profile of a whole detector (detr_fast.model_zoo): backbone, pos (DETR family), total."""
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch_dtype = DTYPES[dtype]
    sizes = model_zoo.image_sizes(model, scale, batch)
    reference_model = model_zoo.build(model, tiny=tiny).to(device=device, dtype=torch_dtype)
    why = model_zoo.query_check(reference_model, model, sizes)
    if why:
        raise model_zoo.Unavailable(why)
    fast_model = stages.make_fast_model(reference_model)
    conversion = str(conversion_report(fast_model))  # formatted once: logged now, kept in the report
    log(conversion)
    impls: List[stages.Implementation] = [stages.Detector("reference", reference_model),
                                          stages.Detector("detr_fast", fast_model)]
    inputs = model_zoo.inputs(model, sizes, device, torch_dtype)
    steps = model_steps(model, inputs)
    timers = {impl.name: BackboneTimer(model_zoo.backbone_of(impl.model), device) for impl in impls}

    def on_step(step: Optional[Step]) -> None:
        for timer in timers.values():
            timer.active = step is not None and step.stage == stages.MODEL_STAGE

    try:
        rows, outputs = _run_steps(steps, impls, reps, device, min_time, trace_path, on_step)
    finally:
        for timer in timers.values():
            timer.remove()
    total = rows["total"]
    total["errors"] = stages.prediction_errors(outputs["detr_fast"][stages.MODEL_STAGE],
                                               outputs["reference"][stages.MODEL_STAGE])
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


# ---------------------------------------------------------------- the report

# Environment variables that change how the CPU allocator reuses memory (see the README's CPU section).
ALLOCATOR_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                       "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "MALLOC_CONF", "LD_PRELOAD")


def notes(report: Dict) -> List[str]:
    """What a reader must know to trust (or not) the table: flagged ratios, rows that are
    the same function on both sides, times that do not add up."""
    rows = report["stages"]
    lines = []
    noisy = [f"{name} ({100 * row['spread']:.0f}%)" for name, row in rows.items()
             if not row["trusted"] and row["ratios"] >= MIN_TRUSTED_RATIOS]
    if noisy:
        lines.append(f"! NOISY, do not trust these speed-ups: {', '.join(noisy)}: the ratios spread (interquartile "
                     f"range) over more than {100 * TRUST_SPREAD:.0f}% of their median: the machine's speed, or "
                     "the stage's own time, varied from run to run. Rerun on an idle machine or with more --reps.")
    few = [name for name, row in rows.items() if not row["trusted"] and row["ratios"] < MIN_TRUSTED_RATIOS]
    if few:
        lines.append(f"! NOISY: {', '.join(few)}: fewer than {2 * MIN_TRUSTED_RATIOS} pairs, no spread to judge "
                     "the ratio by; use a larger --reps.")
    load = report.get("load_average")
    cpus = report.get("cpus")
    if load is not None and cpus and load > 0.5 * cpus:
        lines.append(f"! the machine was busy: 1-minute load average {load:.1f} on {cpus} CPUs before the run; "
                     f"other processes compete with torch's {report.get('threads')} threads (a run that just "
                     "ended, e.g. a previous profile run back to back, counts in this average too).")
    if report["device"] == "cpu":
        settings = report.get("allocator_settings") or {}
        if settings:
            lines.append("allocator: " + " ".join(f"{k}={v}" for k, v in settings.items()))
        else:
            lines.append("allocator: glibc's defaults: large tensors get fresh pages at every allocation, and those "
                         "page faults are part of both sides' times (more of the reference's, which allocates more). "
                         "How many there are depends on the process's heap history, so the speed-up can move "
                         "between runs of this command by more than its p25-p75 shows (10-15% on the project's "
                         "2-core VM; more for code that allocates more): compare several runs. With "
                         "memory-keeping settings both run faster, and the speed-up is smaller and stable "
                         "(README, CPU).")
    if report.get("model", model_zoo.JOINER) != model_zoo.JOINER:
        return lines + _model_notes(report)
    masks = rows.get("masks")
    if masks is not None and masks["same_function"]:
        lines.append("masks: the same function on both sides (~1.0x by construction): here detr_fast computes the "
                     "masks fused with pos, see masks_pos.")
    elif masks is not None:
        lines.append("masks: detr_fast computes each level's mask from the image sizes (nested_tensor_from_tensor_"
                     "list records them; the full-size mask is not read); in the Joiner they are fused with pos "
                     "(masks_pos).")
    if "total" in rows and "backbone" in rows:
        for side in ("reference", "detr_fast"):
            key = f"{side}_ms"
            total, backbone = rows["total"][key], rows["backbone"][key]
            parts = sum(rows[r][key] for r in ("pad", "backbone", "masks_pos") if r in rows)
            if total < backbone:
                lines.append(f"! {side}: total {total:.1f} ms < backbone {backbone:.1f} ms although the total runs "
                             "the backbone: the machine was faster while the total was timed (stages are timed one "
                             "after the other); compare the ratios, each measured in interleaved pairs, not "
                             "absolute times across rows.")
            elif abs(total - parts) > 0.10 * parts:
                lines.append(f"! {side}: total {total:.1f} ms vs pad + backbone + masks_pos = {parts:.1f} ms "
                             f"({100 * (total - parts) / parts:+.0f}%): the machine's speed changed between stages; "
                             "compare the ratios, not absolute times across rows.")
    if report.get("detr_fast_backend", "auto") != "auto":
        lines.append(f"DETR_FAST_BACKEND={report['detr_fast_backend']} is set: it replaces detr_fast's "
                     "backend='auto'.")
    return lines


def _model_notes(report: Dict) -> List[str]:
    rows, lines = report["stages"], []
    for side in ("reference", "detr_fast"):
        total, backbone = rows["total"][f"{side}_ms"], rows["backbone"][f"{side}_ms"]
        if total < backbone:
            lines.append(f"! {side}: total {total:.1f} ms < backbone {backbone:.1f} ms although the forward runs the "
                         "backbone: the machine was faster while the total was timed (stages are timed one after the "
                         "other); compare the ratios, each measured in interleaved pairs, not absolute times across "
                         "rows (the backbone's share below is measured inside the same forwards).")
    inside = report.get("backbone_in_forward")
    if inside:
        sides = [f"{side} {100 * s['share']:.0f}% ({s['backbone_ms']:.1f} ms; the rest {s['rest_ms']:.1f} ms)"
                 for side, s in inside.items()]
        lines.append("backbone share of the forward (the conv encoder's time inside each timed forward, by forward "
                     "hooks; medians): " + ", ".join(sides))
    errors = rows["total"].get("errors")
    if errors:
        lines.append("total errors (relative: max abs difference / max magnitude of the reference's): "
                     + ", ".join(f"{key} {value:.2e}" for key, value in errors.items()))
    return lines


def _mib(mem: Optional[Dict[str, int]]) -> str:
    return "-" if mem is None else f"{mem['stage_peak_bytes'] / 2 ** 20:.1f}"


def format_table(report: Dict) -> str:
    model = report.get("model", model_zoo.JOINER)
    lines = [f"device: {report['device']} ({report['device_name']})  threads: {report['threads']}  "
             f"dtype: {report['dtype']}  batch: {report['batch']}  images: {report['image_sizes']}  "
             f"torch {report['torch']}"]
    if model != model_zoo.JOINER:
        padding = "padded, with a pixel_mask" if report.get("padded") else "unpadded, no pixel_mask"
        lines.append(f"model: {model} = {report.get('model_description', '')}; images {padding}")
    lines += ["reference and detr_fast run in interleaved pairs, order alternating; ms: each side's median; "
              "speed-up: median of the ratios of blocks of 2 pairs (A B B A); p25-p75: their interquartile range",
              f"{'stage':<10}{'reference ms':>14}{'detr_fast ms':>14}{'speed-up':>10}{'p25-p75':>15}{'pairs':>7}"
              f"  {'trust':<6}{'max error':>11}{'ref MiB':>9}{'fast MiB':>10}"]
    for stage, row in report["stages"].items():
        spread = f"{row['speedup_p25']:.2f}-{row['speedup_p75']:.2f}x"
        trust = "ok" if row["trusted"] else "NOISY"
        if row.get("same_function"):
            trust = "same"
        lines.append(f"{stage:<10}{row['reference_ms']:>14.3f}{row['detr_fast_ms']:>14.3f}"
                     f"{row['speedup']:>9.2f}x{spread:>15}{row['pairs']:>7}  {trust:<6}{row['max_error']:>11.2e}"
                     f"{_mib(row['reference_memory']):>9}{_mib(row['detr_fast_memory']):>10}")
    lines += report.get("notes", [])
    lines.append(f"trust: ok = interquartile range of the ratios <= {100 * TRUST_SPREAD:.0f}% of their median over "
                 f">= {2 * MIN_TRUSTED_RATIOS} pairs; NOISY = not; same = the same function on both sides")
    if model == model_zoo.JOINER:
        lines.append("max error: pad = abs diff + mask mismatches, backbone = max relative error of the features, "
                     "total = that or pos abs (+ mask mismatches), masks = mismatching elements, pos = max abs "
                     "error, masks_pos = pos max abs error + mask mismatches")
    else:
        lines.append("rows: backbone = the conv encoder, model.model.backbone(pixel_values, pixel_mask); pos = the "
                     "sine embedding of the last level (DETR family); total = the full forward, model(**inputs)")
        lines.append("max error: backbone = max relative error of the features (+ mask mismatches), pos = max abs "
                     "error, total = the larger relative error of logits and pred_boxes")
    lines.append("MiB: peak CUDA memory allocated during the stage beyond what was allocated before it "
                 "(its working memory and outputs); '-' off CUDA")
    if report.get("trace"):
        lines.append(f"trace: {report['trace']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command line

def _device(value: str) -> torch.device:
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"not a device: {value!r} ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {value!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return number


def _scale(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 4], got {value!r}") from None
    if not 0 < number <= 4:
        raise argparse.ArgumentTypeError(f"must be in (0, 4], got {value}")
    return number


def _model(value: str) -> str:
    """A --model name whose model can be built here (a usage error otherwise, with the reason)."""
    if value not in model_zoo.NAMES:
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(model_zoo.NAMES)})")
    if value != model_zoo.JOINER:
        reason = model_zoo.unavailable_reason(value)
        if reason:
            raise argparse.ArgumentTypeError(f"{value} cannot run here: {reason}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_model, default=model_zoo.JOINER, metavar="{" + ",".join(model_zoo.NAMES) + "}",
                        help="what to profile: joiner (default) = the backbone stage alone, stage by stage (pad, "
                             "backbone, masks, pos, masks_pos, total); a transformers detector built from its "
                             "default config with random weights (detr, deformable-detr, rtdetr, dfine; needs the "
                             "'hf' extra) = its backbone, pos (DETR family) and full forward (total)")
    parser.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--batch", type=_positive_int, default=1,
                        help="repeat the images this many times (default 1: DETR's two images for the Joiner and "
                             "the DETR family, one 640x640 image for rtdetr and dfine)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the images' and weights' dtype (default float32)")
    parser.add_argument("--scale", type=_scale, default=None,
                        help=f"image size factor (default 1.0 on CUDA, {CPU_DEFAULT_SCALE} on CPU for DETR's "
                             "image sizes, 1.0 for rtdetr's and dfine's 640x640)")
    parser.add_argument("--reps", type=_positive_int, default=None,
                        help=f"interleaved reference/detr_fast pairs per stage (default {CUDA_DEFAULT_REPS} on CUDA, "
                             f"{CPU_DEFAULT_REPS} on CPU); a cheap stage runs more, for about "
                             f"{MIN_STAGE_SECONDS} s, at most {MAX_PAIRS}")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument("--trace", dest="trace_path", default=None,
                        help="also write a torch.profiler Chrome trace of one pass of every stage here")
    # For the tests: --model's detector with a small head and backbone (model_zoo.build(tiny=True)).
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)


def default_scale(model: str, device: torch.device) -> float:
    """1.0 on CUDA; on CPU, DETR's image sizes are halved (the Joiner and the DETR family), the
    real-time DETRs' 640x640 is kept."""
    if device.type == "cuda" or (model != model_zoo.JOINER and model_zoo.spec(model).family == "realtime"):
        return 1.0
    return CPU_DEFAULT_SCALE


def main(args: argparse.Namespace) -> int:
    device = args.device if args.device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    model = getattr(args, "model", model_zoo.JOINER)
    scale = args.scale if args.scale is not None else default_scale(model, device)
    reps = args.reps if args.reps is not None else (CUDA_DEFAULT_REPS if on_cuda else CPU_DEFAULT_REPS)
    if model == model_zoo.JOINER:
        log(f"device {device}, dtype {args.dtype}, batch {2 * args.batch} images, scale {scale}, "
            f"{torch.get_num_threads()} threads")
        report = run_profile(device, args.batch, args.dtype, scale, reps, args.trace_path)
    else:
        tiny = bool(getattr(args, "tiny", False))
        images = model_zoo.image_sizes(model, scale, args.batch)
        log(f"model {model} ({model_zoo.describe(model, tiny)}), device {device}, dtype {args.dtype}, "
            f"{len(images)} image(s) {images}, {torch.get_num_threads()} threads")
        try:
            report = run_model_profile(model, device, args.batch, args.dtype, scale, reps, args.trace_path,
                                       tiny=tiny)
        except model_zoo.Unavailable as why:
            print(f"python -m detr_fast profile: error: {why}", file=sys.stderr)
            return 2
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json_path}")
    return 0
