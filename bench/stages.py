"""What the benchmarks run: every stage's inputs and implementations, at any size.

Shared by the suites (bench/test_bench_*.py) and the smoke test (tests/test_bench_smoke.py), so the
functions CI checks for correctness are exactly the ones the benchmarks time.

A `Case` is one stage at one size, dtype and level; `build(case, impl, device)` returns a `Runner`
whose `fn()` is the measured call and whose `error(out)` compares an output with the float32
reference path on the same input. Implementations:

- "reference": the reference path (PositionEmbeddingSine(backend="torch"), the unfolded ResNet with
  FrozenBatchNorm2d, pad_images_reference, downsample_mask_reference);
- "detr_fast": what a detr_fast user runs (nested_tensor_from_tensor_list, backend="auto", and the
  converted/folded backbone when detr_fast.convert / fold_frozen_bn exist);
- "compile": torch.compile of the reference (static shapes, a fresh compilation per case).

Reduced precision (bfloat16, float16) means what a user would do: the backbone and the Joiner run
under torch.autocast with float32 weights and images; pad copies images of that dtype; pos is cast
to that dtype, as the Joiner casts it to the features' dtype.
"""
import contextlib
import functools
import math
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import detr_fast
from detr_fast.joiner import JoinerBase
from detr_fast.nested_tensor import NestedTensor, nested_tensor_from_tensor_list
from detr_fast.position_encoding import PositionEmbeddingSine
from detr_fast.profile import DETR_IMAGE_SIZES, build_reference_joiner, make_fast_joiner, max_abs_error, max_rel_error
from detr_fast.reference import downsample_mask_reference, pad_images_reference

STAGES = ("pad", "masks", "pos", "masks_pos", "backbone", "joiner")
IMPLS = ("reference", "detr_fast", "compile")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STRIDES = (8, 16, 32)                   # the levels of Deformable-DETR (layers 2-4)
VARIANTS = ("layer4", "layers2-4")      # DETR's detection backbone; Deformable-DETR's
# Which dtypes a stage is parametrized over: masks are bool whatever the features' dtype.
STAGE_DTYPES = {"pad": True, "masks": False, "pos": True, "masks_pos": True, "backbone": True, "joiner": True}
LEVEL_STAGES = ("masks", "pos", "masks_pos")
NETWORK_STAGES = ("backbone", "joiner")  # the ResNet runs: what --bench-scale shrinks on CPU


class Unavailable(Exception):
    """An implementation that cannot run here (the reason says why); benchmarks skip on it."""


@dataclass(frozen=True)
class Case:
    """One stage at one size: `batch` images (DETR's pair repeated), scaled by `scale`.

    `level` is "s8"/"s16"/"s32" for masks, pos and masks_pos, "layer4"/"layers2-4" for backbone and
    joiner, "images" for pad.
    """
    stage: str
    level: str
    dtype: str
    batch: int
    scale: float

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")

    @property
    def image_sizes(self) -> List[Tuple[int, int]]:
        pair = [(max(1, round(h * self.scale)), max(1, round(w * self.scale))) for h, w in DETR_IMAGE_SIZES]
        return [pair[i % 2] for i in range(self.batch)]

    @property
    def padded_size(self) -> Tuple[int, int]:
        sizes = self.image_sizes
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    @property
    def stride(self) -> int:
        return int(self.level[1:])

    @property
    def level_size(self) -> Tuple[int, int]:
        # Every stride-2 layer of the ResNet (7x7 stem, max pool, 3x3 and 1x1 convs, all padded)
        # rounds up, so a level of stride s is ceil(H / s) x ceil(W / s).
        h, w = self.padded_size
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    @property
    def shape(self) -> str:
        """The shape that identifies the case: the output for pad, masks and pos, else the input."""
        b = self.batch
        if self.stage in LEVEL_STAGES:
            h, w = self.level_size
            return f"{b}x{h}x{w}" if self.stage == "masks" else f"{b}x{POS_CHANNELS}x{h}x{w}"
        h, w = self.padded_size
        return f"{b}x3x{h}x{w}"

    @property
    def id(self) -> str:
        return f"{self.level}-{self.dtype}-b{self.batch}-{self.shape}"

    @property
    def group(self) -> str:
        """Rows with the same group are the same work done by different implementations."""
        return f"{self.stage} {self.level} {self.dtype} {self.shape}"


POS_FEATS = 128                # hidden_dim 256 / 2, as DETR and Deformable-DETR
POS_CHANNELS = 2 * POS_FEATS


def cases(stage: str, scale: float, batches: Sequence[int], dtypes: Sequence[str]) -> List[Case]:
    """Every case of a stage for the given sizes and dtypes."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage in LEVEL_STAGES:
        levels = [f"s{s}" for s in STRIDES]
    else:
        levels = ["images"] if stage == "pad" else list(VARIANTS)
    stage_dtypes = list(dtypes) if STAGE_DTYPES[stage] else ["float32"]
    return [Case(stage, level, dtype, batch, scale)
            for dtype in stage_dtypes for batch in batches for level in levels]


@dataclass
class Runner:
    """fn() is the measured call; error(out) its largest error against the float32 reference."""
    fn: Callable[[], Any]
    error: Callable[[Any], float]


# ---------------------------------------------------------------- inputs and models (cached)

def make_images(case: Case, device: torch.device, dtype: torch.dtype = torch.float32) -> List[Tensor]:
    g = torch.Generator().manual_seed(case.batch * 1000 + 7)
    return [torch.randn(3, h, w, generator=g).to(device=device, dtype=dtype) for h, w in case.image_sizes]


@functools.lru_cache(maxsize=None)
def reference_joiner(variant: str, device: str) -> torch.nn.Module:
    """A ResNet-50 Joiner on the reference path with random, non-identity frozen BN statistics."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return build_reference_joiner(seed=0, return_interm_layers=variant == "layers2-4").to(device)


@functools.lru_cache(maxsize=None)
def fast_joiner(variant: str, device: str) -> torch.nn.Module:
    return make_fast_joiner(reference_joiner(variant, device))


def _padded(case: Case, device: torch.device) -> NestedTensor:
    return nested_tensor_from_tensor_list(make_images(case, device))


def _level_nested(case: Case, device: torch.device, dtype: torch.dtype) -> NestedTensor:
    """What a level of the Joiner holds: a feature map (only its shape and dtype matter to pos;
    one channel keeps the memory small) and the downsampled mask."""
    padded = _padded(case, device)
    assert padded.mask is not None
    mask = downsample_mask_reference(padded.mask, list(case.level_size))
    h, w = case.level_size
    return NestedTensor(torch.zeros(case.batch, 1, h, w, device=device, dtype=dtype), mask)


_LAST_EXPECTED: Dict[Tuple[Case, str], Any] = {}


def _last_expected(case: Case, device: torch.device, compute: Callable[[], Any]) -> Any:
    """The float32 reference output of `case`, computed once for all its implementations (they
    run one after the other); only the last case is kept, the outputs can be large."""
    key = (case, str(device))
    if key not in _LAST_EXPECTED:
        _LAST_EXPECTED.clear()
        _LAST_EXPECTED[key] = compute()
    return _LAST_EXPECTED[key]


# ---------------------------------------------------------------- torch.compile

def compile_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on `device` here, or None."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile's inductor backend is not supported on Windows by every torch version"
    if device.type == "cuda":
        if not detr_fast.dispatch.triton_available():
            return "torch.compile on CUDA needs Triton, which does not import here"
        return None
    compiler = os.environ.get("CXX")
    if compiler and shutil.which(compiler):
        return None
    if any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return None
    return "torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX); none was found"


def compiled(fn: Callable, device: torch.device) -> Callable:
    reason = compile_unavailable_reason(device)
    if reason:
        raise Unavailable(reason)
    # Each case compiles afresh with static shapes: no recompilation limit is hit across the
    # cases of a session, and no case is timed with dynamic-shape code made for another size.
    dynamo = getattr(torch, "_dynamo", None)
    if dynamo is not None and hasattr(dynamo, "reset"):
        dynamo.reset()
    return torch.compile(fn, dynamic=False)


# ---------------------------------------------------------------- errors

def _check_shapes(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise AssertionError(f"{what}: shapes {[tuple(x.shape) for x in a]} != reference "
                             f"{[tuple(y.shape) for y in b]}")


def _mask_mismatches(a: Sequence[Tensor], b: Sequence[Tensor]) -> int:
    _check_shapes(a, b, "masks")
    return sum(int((x != y).sum()) for x, y in zip(a, b))


# ---------------------------------------------------------------- the stages

def _autocast(device: torch.device, dtype: torch.dtype):
    """Autocast for reduced precision, no context at all for float32 (autocast warns about it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _build_pad(case: Case, impl: str, device: torch.device) -> Runner:
    images = make_images(case, device, DTYPES[case.dtype])
    expected = pad_images_reference(images)

    def as_pair(out) -> Tuple[Tensor, Tensor]:
        return (out.tensors, out.mask) if isinstance(out, NestedTensor) else out

    def error(out) -> float:
        tensors, mask = as_pair(out)
        _check_shapes([tensors, mask], list(expected), "pad")
        # Padding copies: the values must be bit-exact and the mask identical.
        return max_abs_error([tensors], [expected[0]]) + float((mask != expected[1]).sum())

    if impl == "reference":
        return Runner(lambda: pad_images_reference(images), error)
    if impl == "detr_fast":
        return Runner(lambda: nested_tensor_from_tensor_list(images), error)
    pad = compiled(pad_images_reference, device)
    return Runner(lambda: pad(images), error)


def _build_masks(case: Case, impl: str, device: torch.device) -> Runner:
    mask = _padded(case, device).mask
    size = list(case.level_size)
    expected = downsample_mask_reference(mask, size)

    def error(out) -> float:
        return float(_mask_mismatches([out], [expected]))

    if impl == "reference":
        return Runner(lambda: downsample_mask_reference(mask, size), error)
    if impl == "detr_fast":
        raise Unavailable("detr_fast has no separate mask step: the Joiner computes each level's mask "
                          "and pos in one fused step, measured by the masks_pos benchmarks")
    down = compiled(downsample_mask_reference, device)
    return Runner(lambda: down(mask, size), error)


def _build_pos(case: Case, impl: str, device: torch.device) -> Runner:
    dtype = DTYPES[case.dtype]
    nested = _level_nested(case, device, dtype)
    reference = PositionEmbeddingSine(POS_FEATS, normalize=True, backend="torch")
    assert nested.mask is not None
    expected = reference.reference(nested.mask)

    def error(out) -> float:
        _check_shapes([out], [expected], "pos")
        if out.dtype != dtype:
            raise AssertionError(f"pos: dtype {out.dtype}, expected {dtype}")
        return max_abs_error([out], [expected])

    # The Joiner casts pos to the features' dtype; the cast is part of the stage.
    if impl == "reference":
        return Runner(lambda: reference(nested).to(dtype), error)
    if impl == "detr_fast":
        fast = PositionEmbeddingSine(POS_FEATS, normalize=True, backend="auto")
        if dtype == torch.float32 or not hasattr(fast, "embed"):
            return Runner(lambda: fast(nested).to(dtype), error)
        # detr_fast writes reduced precision directly (computed in float32, rounded once).
        mask = nested.mask
        return Runner(lambda: fast.embed(mask, None, dtype), error)
    pos = compiled(reference, device)
    return Runner(lambda: pos(nested).to(dtype), error)


def _build_masks_pos(case: Case, impl: str, device: torch.device) -> Runner:
    """One level of the Joiner after the backbone: the padded batch's mask downsampled to the
    level, and the position embedding of that mask in the features' dtype."""
    dtype = DTYPES[case.dtype]
    padded = _padded(case, device)
    h, w = case.level_size
    feature = torch.zeros(case.batch, 1, h, w, device=device, dtype=dtype)
    reference = PositionEmbeddingSine(POS_FEATS, normalize=True, backend="torch")

    def reference_step(nt: NestedTensor, f: Tensor) -> Tuple[Tensor, Tensor]:
        assert nt.mask is not None
        m = downsample_mask_reference(nt.mask, [int(f.shape[-2]), int(f.shape[-1])])
        return m, reference(NestedTensor(f, m)).to(f.dtype)

    exp_mask, _ = reference_step(padded, feature)
    exp_pos = reference.reference(exp_mask)

    def error(out) -> float:
        m, p = out
        _check_shapes([p], [exp_pos], "masks_pos pos")
        if p.dtype != dtype:
            raise AssertionError(f"masks_pos: pos dtype {p.dtype}, expected {dtype}")
        return max_abs_error([p], [exp_pos]) + _mask_mismatches([m], [exp_mask])

    if impl == "reference":
        return Runner(lambda: reference_step(padded, feature), error)
    if impl == "detr_fast":
        joiner = JoinerBase(torch.nn.Identity(), PositionEmbeddingSine(POS_FEATS, normalize=True, backend="auto"))
        if not hasattr(joiner, "masks_and_pos"):
            raise Unavailable("this checkout's Joiner has no masks_and_pos step")

        def fast_step() -> Tuple[Tensor, Tensor]:
            masks, pos = joiner.masks_and_pos(padded, [feature])
            return masks[0], pos[0]
        return Runner(fast_step, error)
    step = compiled(reference_step, device)
    return Runner(lambda: step(padded, feature), error)


def _build_backbone(case: Case, impl: str, device: torch.device) -> Runner:
    dtype = DTYPES[case.dtype]
    x = _padded(case, device).tensors
    ref_body = reference_joiner(case.level, str(device))[0].body
    expected = _last_expected(case, device, lambda: list(ref_body(x).values()))

    def error(out: Dict[str, Tensor]) -> float:
        values = list(out.values())
        _check_shapes(values, expected, "backbone")
        return max_rel_error(values, expected)

    if impl == "reference":
        body = ref_body
    elif impl == "detr_fast":
        body = fast_joiner(case.level, str(device))[0].body
    else:
        body = compiled(ref_body, device)

    def run() -> Dict[str, Tensor]:
        with _autocast(device, dtype):
            return body(x)
    return Runner(run, error)


def _build_joiner(case: Case, impl: str, device: torch.device) -> Runner:
    dtype = DTYPES[case.dtype]
    images = make_images(case, device)
    ref = reference_joiner(case.level, str(device))

    def reference_stage(imgs: List[Tensor]):
        return ref(NestedTensor(*pad_images_reference(imgs)))

    exp_levels, exp_pos = _last_expected(case, device, lambda: reference_stage(images))
    exp_features = [level.tensors for level in exp_levels]
    exp_masks = [level.mask for level in exp_levels]

    def error(out) -> float:
        levels, pos = out
        features = [level.tensors for level in levels]
        _check_shapes(features, exp_features, "joiner features")
        _check_shapes(pos, exp_pos, "joiner pos")
        mismatches = _mask_mismatches([level.mask for level in levels], exp_masks)
        # Features: relative error (their scale grows through the network); pos: absolute (in [-1, 1]).
        return max(max_rel_error(features, exp_features), max_abs_error(pos, exp_pos)) + mismatches

    if impl == "reference":
        stage = reference_stage
    elif impl == "detr_fast":
        fast = fast_joiner(case.level, str(device))

        def stage(imgs: List[Tensor]):
            return fast(nested_tensor_from_tensor_list(imgs))
    else:
        stage = compiled(reference_stage, device)

    def run():
        with _autocast(device, dtype):
            return stage(images)
    return Runner(run, error)


_BUILDERS = {"pad": _build_pad, "masks": _build_masks, "pos": _build_pos, "masks_pos": _build_masks_pos,
             "backbone": _build_backbone, "joiner": _build_joiner}


def build(case: Case, impl: str, device: torch.device) -> Runner:
    """The runner of `impl` for `case` on `device`; raises Unavailable when it cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if device.type == "cpu" and DTYPES[case.dtype] == torch.float16 and case.stage in ("backbone", "joiner"):
        raise Unavailable("float16 autocast is not supported on CPU by every torch version; use bfloat16")
    # no_grad, as DETR evaluates; not inference_mode, whose tensors have no version counters
    # (NestedTensor.image_sizes and cached folded weights rely on them).
    with torch.no_grad():
        return _BUILDERS[case.stage](case, impl, device)


def fast_path_note() -> str:
    """Which detr_fast pieces this checkout has (recorded with the results)."""
    have = [name for name in ("convert", "fold_frozen_bn") if hasattr(detr_fast, name)]
    return "detr_fast with " + (", ".join(have) if have else "no convert()/fold_frozen_bn() yet")
