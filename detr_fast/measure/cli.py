"""`python -m detr_fast profile`: the command line (flags, usage errors, defaults) around profile.py."""
import argparse
import json
import sys
from typing import Optional

import torch

from . import model_zoo
from .profile import (
    CPU_DEFAULT_REPS,
    CPU_DEFAULT_SCALE,
    CUDA_DEFAULT_REPS,
    DTYPES,
    log,
    run_model_profile,
    run_profile,
    run_train_profile,
)
from .report import format_table
from .timing import MAX_PAIRS, MIN_STAGE_SECONDS
from .training import autocast_unavailable_reason, train_unavailable_reason

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
    if value not in model_zoo.JOINER_VARIANTS:
        reason = model_zoo.unavailable_reason(value)
        if reason:
            raise argparse.ArgumentTypeError(f"{value} cannot run here: {reason}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=_model, default=model_zoo.JOINER, metavar="{" + ",".join(model_zoo.NAMES) + "}",
                        help="what to profile: joiner (default) = the backbone stage alone, stage by stage (pad, "
                             "backbone, masks, pos, masks_pos, total; Deformable-DETR's layers 2-4); dino-4scale = "
                             "the same for DINO-4scale's Joiner (PositionEmbeddingSineHW, temperatures 20/20); "
                             "a transformers detector built from its "
                             "default config with random weights (detr, deformable-detr, rtdetr, dfine; needs the "
                             "'hf' extra) = its backbone, pos (DETR family) and full forward (total)")
    parser.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--batch", type=_positive_int, default=1,
                        help="repeat the images this many times (default 1: DETR's two images for the Joiner and "
                             "the DETR family, one 640x640 image for rtdetr and dfine)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="casts the weights and the images to this dtype (default float32); for mixed precision "
                             "as users run it (float32 weights, reduced-precision compute) use --autocast")
    parser.add_argument("--autocast", choices=("bfloat16", "float16"), default=None,
                        help="run the Joiner under torch.autocast in this dtype (weights and images stay in --dtype): "
                             "what AMP training and bf16 CPU inference do; on CPU it needs the hardware (bf16: "
                             "avx512_bf16/amx_bf16, fp16: avx512_fp16/amx_fp16), a usage error otherwise")
    parser.add_argument("--train", action="store_true",
                        help="time one training step of the Joiner (DETR's lr_backbone > 0: layers 2-4 trainable, "
                             "frozen BN) instead of inference: rows forward, backward and step, gradient errors, "
                             "peak memory of a step; the Joiner only")
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
    if device.type == "cuda" or (model not in model_zoo.JOINER_VARIANTS and model_zoo.spec(model).family == "realtime"):
        return 1.0
    return CPU_DEFAULT_SCALE


def usage_error(message: str) -> int:
    print(f"python -m detr_fast profile: error: {message}", file=sys.stderr)
    return 2


def check_precision(args: argparse.Namespace, device: torch.device, model: str) -> Optional[str]:
    """Why --autocast / --train cannot run as asked on ``device`` (a usage error), or None."""
    autocast = getattr(args, "autocast", None)
    train = getattr(args, "train", False)
    if autocast:
        if model not in model_zoo.JOINER_VARIANTS:
            return f"--autocast applies to the Joiner profiles (--model {'|'.join(model_zoo.JOINER_VARIANTS)}) only"
        reason = autocast_unavailable_reason(device, DTYPES[autocast])
        if reason:
            return f"--autocast {autocast} on {device}: {reason}"
    if train:
        if model not in model_zoo.JOINER_VARIANTS:
            return ("--train times the Joiner's training step: use it with --model "
                    f"{'|'.join(model_zoo.JOINER_VARIANTS)} (joiner is the default)")
        if getattr(args, "trace_path", None):
            return "--trace is for the inference profile; use torch.profiler around a step for --train"
        reason = train_unavailable_reason(str(device), args.dtype)
        if reason:
            return f"--train --dtype {args.dtype} on {device}: {reason}"
        if args.dtype != "float32":
            return (f"--train --dtype {args.dtype}: DETR trains float32 weights (reduced-precision weights lose "
                    "the SGD/AdamW updates); for mixed precision use --dtype float32 --autocast bfloat16|float16")
    return None


def main(args: argparse.Namespace) -> int:
    device = args.device if args.device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    model = getattr(args, "model", model_zoo.JOINER)
    scale = args.scale if args.scale is not None else default_scale(model, device)
    reps = args.reps if args.reps is not None else (CUDA_DEFAULT_REPS if on_cuda else CPU_DEFAULT_REPS)
    problem = check_precision(args, device, model)
    if problem:
        return usage_error(problem)
    autocast = getattr(args, "autocast", None)
    variant = model_zoo.JOINER_VARIANTS.get(model)
    if variant and getattr(args, "train", False):
        log(f"training step: device {device}, dtype {args.dtype}, autocast {autocast or 'off'}, batch "
            f"{2 * args.batch} images, scale {scale}, {torch.get_num_threads()} threads")
        report = run_train_profile(device, args.batch, args.dtype, scale, reps, autocast, variant=variant)
    elif variant:
        log(f"device {device}, dtype {args.dtype}, batch {2 * args.batch} images, scale {scale}, "
            f"{torch.get_num_threads()} threads")
        report = run_profile(device, args.batch, args.dtype, scale, reps, args.trace_path, autocast=autocast,
                             variant=variant)
    else:
        tiny = bool(getattr(args, "tiny", False))
        images = model_zoo.image_sizes(model, scale, args.batch)
        log(f"model {model} ({model_zoo.describe(model, tiny)}), device {device}, dtype {args.dtype}, "
            f"{len(images)} image(s) {images}, {torch.get_num_threads()} threads")
        try:
            report = run_model_profile(model, device, args.batch, args.dtype, scale, reps, args.trace_path,
                                       tiny=tiny)
        except model_zoo.Unavailable as why:
            return usage_error(str(why))
    print(format_table(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
        log(f"wrote {args.json_path}")
    return 0
