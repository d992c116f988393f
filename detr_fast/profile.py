"""`python -m detr_fast profile`: the stage timed the way a user would check it.

Builds a reference Joiner (the reference path everywhere) and a detr_fast Joiner with the same
random, non-identity weights, runs both on a DETR-size batch and prints a per-stage table
(pad, backbone, masks, pos, masks_pos = both as the Joiner runs them, total) with times, speed-ups,
peak memory (CUDA) and the largest errors.

For looking inside: on CUDA every stage runs inside an NVTX range ("reference/backbone", ...), so
`nsys profile python -m detr_fast profile` shows the stages on the timeline; `--trace PATH` also
records one untimed pass of every stage with torch.profiler and writes a Chrome trace
(chrome://tracing or https://ui.perfetto.dev) whose ranges carry the same names.
"""
import argparse
import contextlib
import copy
import json
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .backbone import Backbone, Joiner
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .position_encoding import PositionEmbeddingSine
from .reference import downsample_mask_reference, pad_images_reference

DETR_IMAGE_SIZES = ((800, 1066), (750, 1333))
CPU_DEFAULT_SCALE = 0.5  # a 2-core CPU runs the full size in minutes, not about one
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("pad", "backbone", "masks", "pos", "masks_pos", "total")


def log(msg: str) -> None:
    print(f"[detr_fast profile] {msg}", file=sys.stderr, flush=True)


def randomize_frozen_bn(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every FrozenBatchNorm2d non-identity statistics, so that folding is really tested."""
    for name, buf in model.named_buffers():
        if name.endswith(("weight", "running_var")):
            buf.copy_(torch.rand(buf.shape, generator=generator) * 0.5 + 0.75)
        elif name.endswith(("bias", "running_mean")):
            buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)


def build_reference_joiner(seed: int = 0, return_interm_layers: bool = True) -> Joiner:
    """A Deformable-DETR-style Joiner (ResNet-50, sine embedding) on the reference path."""
    torch.manual_seed(seed)
    backbone = Backbone("resnet50", False, return_interm_layers, False, pretrained=False)
    randomize_frozen_bn(backbone, torch.Generator().manual_seed(seed))
    return Joiner(backbone, PositionEmbeddingSine(128, normalize=True, backend="torch")).eval()


def make_fast_joiner(reference: Joiner) -> Joiner:
    """The detr_fast Joiner: a copy of ``reference`` with the same weights, converted the way a user
    converts a model (detr_fast.convert: folded backbone, fused masks and pos)."""
    from .convert import convert

    fast = copy.deepcopy(reference)
    log(str(convert(fast)))
    # convert() keeps a detr_fast PositionEmbeddingSine as it is; the reference one runs "torch".
    if hasattr(fast[1], "backend"):
        fast[1].backend = "auto"
    return fast


def make_images(scale: float, batch: int, dtype: torch.dtype, device: torch.device, seed: int) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in DETR_IMAGE_SIZES]
    sizes = sizes * batch
    return [torch.randn(3, h, w, generator=g).to(device=device, dtype=dtype) for h, w in sizes]


@dataclass
class Impl:
    """The stage functions of one implementation."""
    name: str
    joiner: Joiner
    pad: Callable[[List[Tensor]], NestedTensor]

    def backbone(self, nt: NestedTensor) -> Dict[str, Tensor]:
        return self.joiner[0].body(nt.tensors)

    def masks(self, nt: NestedTensor, features: Dict[str, Tensor]) -> List[Tensor]:
        assert nt.mask is not None
        return [downsample_mask_reference(nt.mask, [f.shape[-2], f.shape[-1]]) for f in features.values()]

    def pos(self, nt: NestedTensor, features: Dict[str, Tensor], masks: List[Tensor]) -> List[Tensor]:
        return [self.joiner[1](NestedTensor(f, m)).to(f.dtype) for f, m in zip(features.values(), masks)]

    def masks_pos(self, nt: NestedTensor, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Both steps as the Joiner runs them: one fused step per level where the Joiner has one."""
        fused = getattr(self.joiner, "masks_and_pos", None)
        if self.name != "reference" and fused is not None:
            return fused(nt, list(features.values()))
        masks = self.masks(nt, features)
        return masks, self.pos(nt, features, masks)

    def total(self, images: List[Tensor]):
        return self.joiner(self.pad(images))


def _reference_pad(images: List[Tensor]) -> NestedTensor:
    return NestedTensor(*pad_images_reference(images))


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


def _timed(fn: Callable[[], Any], device: torch.device, reps: int, label: str) -> Tuple[float, Any]:
    """Median wall time (ms) of fn() over reps runs after one warm-up run."""
    with _nvtx(f"{label} (warm-up)", device):
        result = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with _nvtx(label, device):
            result = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], result


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


def _stage_calls(impl: "Impl", images: List[Tensor], nt: NestedTensor, feats: Dict[str, Tensor],
                 masks: List[Tensor]) -> Dict[str, Callable[[], Any]]:
    return {"pad": lambda: impl.pad(images), "backbone": lambda: impl.backbone(nt),
            "masks": lambda: impl.masks(nt, feats), "pos": lambda: impl.pos(nt, feats, masks),
            "masks_pos": lambda: impl.masks_pos(nt, feats), "total": lambda: impl.total(images)}


def write_trace(path: str, impls: List["Impl"], images: List[Tensor], inputs: Dict[str, Tuple],
                device: torch.device) -> None:
    """One untimed pass of every stage of every implementation under torch.profiler, as a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for impl in impls:
            for stage, call in _stage_calls(impl, images, *inputs[impl.name]).items():
                with record_function(f"{impl.name}/{stage}"), _nvtx(f"{impl.name}/{stage} (trace)", device):
                    call()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    prof.export_chrome_trace(path)


def max_abs_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest absolute difference over pairs of tensors (0 for empty ones)."""
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def max_rel_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``, over pairs."""
    return max((float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
                for x, y in zip(a, b) if x.numel()), default=0.0)


def run_profile(device: torch.device, batch: int, dtype: torch.dtype, scale: float, reps: int,
                trace_path: Optional[str] = None) -> Dict:
    images = make_images(scale, batch, dtype, device, seed=1)
    reference_joiner = build_reference_joiner().to(device=device, dtype=dtype)
    impls = [Impl("reference", reference_joiner, _reference_pad),
             Impl("detr_fast", make_fast_joiner(reference_joiner), nested_tensor_from_tensor_list)]
    times: Dict[str, Dict[str, float]] = {}
    memory: Dict[str, Dict[str, Optional[Dict[str, int]]]] = {}
    outputs: Dict[str, Dict[str, object]] = {}
    inputs: Dict[str, Tuple] = {}
    # no_grad as DETR evaluates, not inference_mode: inference tensors have no version counter,
    # which NestedTensor.image_sizes and the folded weights' cache rely on.
    with torch.no_grad():
        for impl in impls:
            t, o, m = {}, {}, {}
            for stage in STAGES:
                # Each stage's inputs are the previous stages' outputs of the same implementation.
                nt, feats, masks = o.get("pad"), o.get("backbone"), o.get("masks")
                call = _stage_calls(impl, images, nt, feats, masks)[stage]
                log(f"{impl.name}: {stage}")
                t[stage], o[stage] = _timed(call, device, reps, f"{impl.name}/{stage}")
                m[stage] = peak_memory(call, device)
            times[impl.name], outputs[impl.name], memory[impl.name] = t, o, m
            inputs[impl.name] = (o["pad"], o["backbone"], o["masks"])
        if trace_path:
            log(f"{trace_path}: tracing one pass of every stage")
            write_trace(trace_path, impls, images, inputs, device)
    ref, fast = outputs["reference"], outputs["detr_fast"]
    errors = {
        "pad": max(max_abs_error([fast["pad"].tensors], [ref["pad"].tensors]),
                   float((fast["pad"].mask != ref["pad"].mask).sum())),
        "backbone": max_rel_error(list(fast["backbone"].values()), list(ref["backbone"].values())),
        "masks": float(sum(int((a != b).sum()) for a, b in zip(fast["masks"], ref["masks"]))),
        "pos": max_abs_error(fast["pos"], ref["pos"]),
        "masks_pos": max_abs_error(fast["masks_pos"][1], ref["masks_pos"][1])
        + float(sum(int((a != b).sum()) for a, b in zip(fast["masks_pos"][0], ref["masks_pos"][0]))),
        "total": max(max_rel_error([x.tensors for x in fast["total"][0]], [x.tensors for x in ref["total"][0]]),
                     max_abs_error(fast["total"][1], ref["total"][1])),
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": len(images),
        "image_sizes": [list(img.shape[1:]) for img in images],
        "reps": reps,
        "trace": trace_path,
        "stages": {s: {"reference_ms": times["reference"][s], "detr_fast_ms": times["detr_fast"][s],
                       "speedup": times["reference"][s] / max(times["detr_fast"][s], 1e-9),
                       "max_error": errors[s],
                       "reference_memory": memory["reference"][s],
                       "detr_fast_memory": memory["detr_fast"][s]} for s in STAGES},
    }


def _mib(mem: Optional[Dict[str, int]]) -> str:
    return "-" if mem is None else f"{mem['stage_peak_bytes'] / 2 ** 20:.1f}"


def format_table(report: Dict) -> str:
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  batch: {report['batch']}  "
             f"images: {report['image_sizes']}  torch {report['torch']}  (median of {report['reps']})",
             f"{'stage':<10}{'reference ms':>14}{'detr_fast ms':>14}{'speed-up':>10}{'max error':>12}"
             f"{'ref MiB':>10}{'fast MiB':>10}"]
    for stage, row in report["stages"].items():
        lines.append(f"{stage:<10}{row['reference_ms']:>14.3f}{row['detr_fast_ms']:>14.3f}"
                     f"{row['speedup']:>9.2f}x{row['max_error']:>12.2e}"
                     f"{_mib(row['reference_memory']):>10}{_mib(row['detr_fast_memory']):>10}")
    lines.append("max error: pad = abs diff + mask mismatches, backbone/total = max relative error of "
                 "features (total also pos abs), masks = mismatching elements, pos = max abs error, "
                 "masks_pos = pos max abs error + mask mismatches")
    lines.append("MiB: peak CUDA memory allocated during the stage beyond what was allocated before it "
                 "(its working memory and outputs); '-' off CUDA")
    if report.get("trace"):
        lines.append(f"trace: {report['trace']}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--batch", type=int, default=1,
                        help="repeat the two DETR-size images this many times (default 1: two images)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--scale", type=float, default=None,
                        help=f"image size factor (default 1.0 on CUDA, {CPU_DEFAULT_SCALE} on CPU)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per stage (default 10 CUDA, 3 CPU)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    parser.add_argument("--trace", dest="trace_path", default=None,
                        help="also write a torch.profiler Chrome trace of one pass of every stage here")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else CPU_DEFAULT_SCALE)
    if not 0 < scale <= 4:
        raise ValueError(f"--scale must be in (0, 4], got {scale}")
    reps = args.reps if args.reps is not None else (10 if device.type == "cuda" else 3)
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    log(f"device {device}, dtype {args.dtype}, batch {2 * args.batch} images, scale {scale}")
    report = run_profile(device, args.batch, DTYPES[args.dtype], scale, reps, args.trace_path)
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json_path}")
    return 0
