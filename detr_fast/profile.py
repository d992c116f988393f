"""`python -m detr_fast profile`: the stage timed the way a user would check it.

Builds a reference Joiner (the reference path everywhere) and a detr_fast Joiner with the same
random, non-identity weights (detr_fast.stages), runs both on a DETR-size batch and prints a
per-stage table (pad, backbone, masks, pos, masks_pos = both as the Joiner runs them, total =
pad + Joiner), each stage's input being the previous stage's output of the same implementation.

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
from torch import Tensor

from . import stages
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


def write_trace(path: str, impls: Sequence[stages.Implementation], images: List[Tensor],
                outputs: Dict[str, Dict[str, Any]], device: torch.device) -> None:
    """One untimed pass of every stage of every implementation under torch.profiler, as a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for impl in impls:
            for row, stage in ROWS:
                call = impl.function(stage)
                args = stage_inputs(stage, images, outputs[impl.name])
                with record_function(f"{impl.name}/{row}"), _nvtx(f"{impl.name}/{row} (trace)", device):
                    call(*args)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    prof.export_chrome_trace(path)


def run_profile(device: torch.device, batch: int, dtype: str, scale: float, reps: int,
                trace_path: Optional[str] = None, min_time: float = MIN_STAGE_SECONDS) -> Dict:
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    torch_dtype = DTYPES[dtype]
    case = stages.Case("joiner", "layers2-4", dtype, 2 * batch, scale)
    images = stages.make_images(case, device, torch_dtype)
    reference_model = stages.build_reference_joiner("layers2-4").to(device=device, dtype=torch_dtype)
    impls = [stages.Reference(reference_model), stages.DetrFast(stages.make_fast_joiner(reference_model, log))]
    outputs: Dict[str, Dict[str, Any]] = {impl.name: {} for impl in impls}
    rows: Dict[str, Dict[str, Any]] = {}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # no_grad as DETR evaluates, not inference_mode: inference tensors have no version counter,
    # which NestedTensor.image_sizes and the folded weights' cache rely on.
    with torch.no_grad():
        for row, stage in ROWS:
            calls = [functools.partial(impl.function(stage), *stage_inputs(stage, images, outputs[impl.name]))
                     for impl in impls]
            log(f"{row}: reference and detr_fast, interleaved")
            pairs = interleave(_in_range(calls[0], f"reference/{row}", device),
                               _in_range(calls[1], f"detr_fast/{row}", device), reps,
                               min_time=min_time, sync=sync)
            outputs["reference"][stage], outputs["detr_fast"][stage] = pairs.a_out, pairs.b_out
            check_dtype = torch_dtype if stage in ("pos", "masks_pos") else None
            rows[row] = dict(stage=stage, **ratio_summary(pairs.a_ms, pairs.b_ms),
                             same_function=impls[1].same_as_reference(stage, device),
                             max_error=stages.error(stage, pairs.b_out, pairs.a_out, check_dtype),
                             reference_memory=peak_memory(calls[0], device),
                             detr_fast_memory=peak_memory(calls[1], device))
        if trace_path:
            log(f"{trace_path}: tracing one pass of every stage")
            write_trace(trace_path, impls, images, outputs, device)
    report = {
        "device": str(device),
        "cpus": os.cpu_count(),
        "load_average": load_average,
        "device_name": stages.device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": dtype,
        "batch": len(images),
        "scale": scale,
        "image_sizes": [list(img.shape[1:]) for img in images],
        "reps": reps,
        "detr_fast_backend": env_backend(),
        "trace": trace_path,
        "stages": rows,
    }
    report["notes"] = notes(report)
    return report


# ---------------------------------------------------------------- the report

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
                     f"other processes compete with torch's {report.get('threads')} threads.")
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


def _mib(mem: Optional[Dict[str, int]]) -> str:
    return "-" if mem is None else f"{mem['stage_peak_bytes'] / 2 ** 20:.1f}"


def format_table(report: Dict) -> str:
    lines = [f"device: {report['device']} ({report['device_name']})  threads: {report['threads']}  "
             f"dtype: {report['dtype']}  batch: {report['batch']}  images: {report['image_sizes']}  "
             f"torch {report['torch']}",
             "reference and detr_fast run in interleaved pairs, order alternating; ms: each side's median; "
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
    lines.append("max error: pad = abs diff + mask mismatches, backbone = max relative error of the features, "
                 "total = that or pos abs (+ mask mismatches), masks = mismatching elements, pos = max abs "
                 "error, masks_pos = pos max abs error + mask mismatches")
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--batch", type=_positive_int, default=1,
                        help="repeat the two DETR-size images this many times (default 1: two images)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="the images' and weights' dtype (default float32)")
    parser.add_argument("--scale", type=_scale, default=None,
                        help=f"image size factor (default 1.0 on CUDA, {CPU_DEFAULT_SCALE} on CPU)")
    parser.add_argument("--reps", type=_positive_int, default=None,
                        help=f"interleaved reference/detr_fast pairs per stage (default {CUDA_DEFAULT_REPS} on CUDA, "
                             f"{CPU_DEFAULT_REPS} on CPU); a cheap stage runs more, for about "
                             f"{MIN_STAGE_SECONDS} s, at most {MAX_PAIRS}")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument("--trace", dest="trace_path", default=None,
                        help="also write a torch.profiler Chrome trace of one pass of every stage here")


def main(args: argparse.Namespace) -> int:
    device = args.device if args.device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    scale = args.scale if args.scale is not None else (1.0 if on_cuda else CPU_DEFAULT_SCALE)
    reps = args.reps if args.reps is not None else (CUDA_DEFAULT_REPS if on_cuda else CPU_DEFAULT_REPS)
    log(f"device {device}, dtype {args.dtype}, batch {2 * args.batch} images, scale {scale}, "
        f"{torch.get_num_threads()} threads")
    report = run_profile(device, args.batch, args.dtype, scale, reps, args.trace_path)
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json_path}")
    return 0
