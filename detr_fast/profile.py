"""`python -m detr_fast profile`: the stage timed the way a user would check it.

Builds a reference Joiner (the reference path everywhere) and a detr_fast Joiner with the same
random, non-identity weights, runs both on a DETR-size batch and prints a per-stage table
(pad, backbone, masks, pos, total) with times, speed-ups and the largest errors.
"""
import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from .backbone import Backbone, Joiner
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from .position_encoding import PositionEmbeddingSine
from .reference import downsample_mask_reference, pad_images_reference

DETR_IMAGE_SIZES = ((800, 1066), (750, 1333))
CPU_DEFAULT_SCALE = 0.5  # a 2-core CPU runs the full size in minutes, not about one
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("pad", "backbone", "masks", "pos", "total")


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
    """The detr_fast Joiner: the same weights, the kernels wherever they apply."""
    fast = copy.deepcopy(reference)
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

    def total(self, images: List[Tensor]):
        return self.joiner(self.pad(images))


def _reference_pad(images: List[Tensor]) -> NestedTensor:
    return NestedTensor(*pad_images_reference(images))


def _timed(fn: Callable[[], object], device: torch.device, reps: int) -> (float, object):
    """Median wall time (ms) of fn() over reps runs after one warm-up run."""
    result = fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[len(times) // 2], result


def _max_abs(a: List[Tensor], b: List[Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(a, b))


def _max_rel(a: List[Tensor], b: List[Tensor]) -> float:
    return max(float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
               for x, y in zip(a, b))


def run_profile(device: torch.device, batch: int, dtype: torch.dtype, scale: float, reps: int) -> Dict:
    images = make_images(scale, batch, dtype, device, seed=1)
    reference_joiner = build_reference_joiner().to(device=device, dtype=dtype)
    impls = [Impl("reference", reference_joiner, _reference_pad),
             Impl("detr_fast", make_fast_joiner(reference_joiner), nested_tensor_from_tensor_list)]
    times: Dict[str, Dict[str, float]] = {}
    outputs: Dict[str, Dict[str, object]] = {}
    with torch.inference_mode():
        for impl in impls:
            t, o = {}, {}
            log(f"{impl.name}: pad")
            t["pad"], o["pad"] = _timed(lambda: impl.pad(images), device, reps)
            nt = o["pad"]
            log(f"{impl.name}: backbone")
            t["backbone"], o["backbone"] = _timed(lambda: impl.backbone(nt), device, reps)
            feats = o["backbone"]
            log(f"{impl.name}: masks")
            t["masks"], o["masks"] = _timed(lambda: impl.masks(nt, feats), device, reps)
            log(f"{impl.name}: pos")
            t["pos"], o["pos"] = _timed(lambda: impl.pos(nt, feats, o["masks"]), device, reps)
            log(f"{impl.name}: total")
            t["total"], o["total"] = _timed(lambda: impl.total(images), device, reps)
            times[impl.name], outputs[impl.name] = t, o
    ref, fast = outputs["reference"], outputs["detr_fast"]
    errors = {
        "pad": max(_max_abs([fast["pad"].tensors], [ref["pad"].tensors]),
                   float((fast["pad"].mask != ref["pad"].mask).sum())),
        "backbone": _max_rel(list(fast["backbone"].values()), list(ref["backbone"].values())),
        "masks": float(sum(int((a != b).sum()) for a, b in zip(fast["masks"], ref["masks"]))),
        "pos": _max_abs(fast["pos"], ref["pos"]),
        "total": max(_max_rel([x.tensors for x in fast["total"][0]], [x.tensors for x in ref["total"][0]]),
                     _max_abs(fast["total"][1], ref["total"][1])),
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": len(images),
        "image_sizes": [list(img.shape[1:]) for img in images],
        "reps": reps,
        "stages": {s: {"reference_ms": times["reference"][s], "detr_fast_ms": times["detr_fast"][s],
                       "speedup": times["reference"][s] / max(times["detr_fast"][s], 1e-9),
                       "max_error": errors[s]} for s in STAGES},
    }


def format_table(report: Dict) -> str:
    lines = [f"device: {report['device']}  dtype: {report['dtype']}  batch: {report['batch']}  "
             f"images: {report['image_sizes']}  torch {report['torch']}  (median of {report['reps']})",
             f"{'stage':<10}{'reference ms':>14}{'detr_fast ms':>14}{'speed-up':>10}{'max error':>12}"]
    for stage, row in report["stages"].items():
        lines.append(f"{stage:<10}{row['reference_ms']:>14.3f}{row['detr_fast_ms']:>14.3f}"
                     f"{row['speedup']:>9.2f}x{row['max_error']:>12.2e}")
    lines.append("max error: pad = abs diff + mask mismatches, backbone/total = max relative error of "
                 "features (total also pos abs), masks = mismatching elements, pos = max abs error")
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
    log(f"device {device}, dtype {args.dtype}, batch {2 * args.batch} images, scale {scale}")
    report = run_profile(device, args.batch, DTYPES[args.dtype], scale, reps)
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json_path}")
    return 0
