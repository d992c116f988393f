"""The benchmark stages' definitions: stage names, sizes, dtypes and the cases the benchmarks run."""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import model_zoo
from .model_zoo import DETR_IMAGE_SIZES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("pad", "masks", "pos", "masks_pos", "backbone", "joiner")
IMPLS = ("reference", "detr_fast", "compile", "onnxruntime")
STRIDES = (8, 16, 32)                   # the levels of Deformable-DETR (layers 2-4)
VARIANTS = ("layer4", "layers2-4", "dino-4scale")  # DETR's detection backbone; Deformable-DETR's; DINO-4scale's
VARIANT_STRIDES = {"layer4": (32,), "layers2-4": (8, 16, 32), "dino-4scale": (8, 16, 32)}
# Which dtypes a stage is parametrized over: masks are bool whatever the features' dtype.
STAGE_DTYPES = {"pad": True, "masks": False, "pos": True, "masks_pos": True, "backbone": True, "joiner": True}
LEVEL_STAGES = ("masks", "pos", "masks_pos")
NETWORK_STAGES = ("backbone", "joiner")  # the ResNet runs: what --bench-scale shrinks on CPU
POS_FEATS = 128                # hidden_dim 256 / 2, as DETR and Deformable-DETR
POS_CHANNELS = 2 * POS_FEATS
# The whole detector (detr_fast.measure.model_zoo): a benchmark stage of its own, not one of the Joiner's.
MODEL_STAGE = "model"
# One training step of the Joiner (detr_fast.measure.training): forward + backward, DETR's lr_backbone > 0.
TRAIN_STAGE = "train"
BENCH_STAGES = STAGES + (MODEL_STAGE, TRAIN_STAGE)
DETECTOR_STAGES = ("backbone", "pos", MODEL_STAGE)  # what the profile's --model mode times
BENCH_MODELS = ("detr", "rtdetr")  # the benchmarks' default detectors (issue 10's DETR, RT-DETR-R50)


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One stage at one size: `batch` images (DETR's pair repeated), scaled by `scale`.

    `level` is "images" for pad; "s8"/"s16"/"s32" (one level) or a variant ("layer4",
    "layers2-4": all of its levels) for masks, pos and masks_pos; a variant for backbone and joiner;
    a detector of detr_fast.measure.model_zoo ("detr", "rtdetr", ...) for the model stage.
    `sizes`: the images' sizes at scale 1, repeated (cut) to `batch` images; default DETR's pair.
    `tiny`: the model stage's detector with a small head and backbone (model_zoo's tiny=True: tests).
    """
    stage: str
    level: str
    dtype: str
    batch: int
    scale: float
    sizes: Optional[Tuple[Tuple[int, int], ...]] = None
    tiny: bool = False

    def __post_init__(self):
        if self.stage not in BENCH_STAGES:
            raise ValueError(f"stage must be one of {BENCH_STAGES}, got {self.stage!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {self.batch!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.level not in _levels_of(self.stage):
            raise ValueError(f"level of a {self.stage} case must be one of {_levels_of(self.stage)}, "
                             f"got {self.level!r}")
        if self.sizes is not None and (not self.sizes or any(
                len(hw) != 2 or any(not isinstance(x, int) or x < 1 for x in hw) for hw in self.sizes)):
            raise ValueError(f"sizes must be a non-empty tuple of (height, width) ints >= 1, got {self.sizes!r}")
        if self.tiny and self.stage != MODEL_STAGE:
            raise ValueError("tiny applies to the model stage only")

    @property
    def image_sizes(self) -> List[Tuple[int, int]]:
        base = DETR_IMAGE_SIZES if self.sizes is None else self.sizes
        scaled = [(max(1, round(h * self.scale)), max(1, round(w * self.scale))) for h, w in base]
        return [scaled[i % len(scaled)] for i in range(self.batch)]

    @property
    def padded_size(self) -> Tuple[int, int]:
        sizes = self.image_sizes
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    @property
    def variant(self) -> str:
        """The backbone that the case runs or whose levels it is about (Deformable-DETR's for one
        level and for pad)."""
        return self.level if self.level in VARIANTS else "layers2-4"

    @property
    def strides(self) -> Tuple[int, ...]:
        if self.level == "images":
            return ()
        if self.level in VARIANTS:
            return VARIANT_STRIDES[self.level]
        return (int(self.level[1:]),)

    @property
    def stride(self) -> int:
        """The stride of a one-level case."""
        if len(self.strides) != 1:
            raise ValueError(f"case {self.id} has strides {self.strides}, not one level")
        return self.strides[0]

    @property
    def level_sizes(self) -> List[Tuple[int, int]]:
        # Every stride-2 layer of the ResNet (7x7 stem, max pool, 3x3 and 1x1 convs, all padded)
        # rounds up, so a level of stride s is ceil(H / s) x ceil(W / s).
        h, w = self.padded_size
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]

    @property
    def level_size(self) -> Tuple[int, int]:
        """The size of a one-level case's level."""
        h, w = self.padded_size
        return math.ceil(h / self.stride), math.ceil(w / self.stride)

    @property
    def shape(self) -> str:
        """The shape that identifies the case: the output for masks and pos (levels joined by
        '+'), else the padded input."""
        b = self.batch
        if self.stage in LEVEL_STAGES:
            hw = "+".join(f"{h}x{w}" for h, w in self.level_sizes)
            return f"{b}x{hw}" if self.stage == "masks" else f"{b}x{POS_CHANNELS}x{hw}"
        h, w = self.padded_size
        return f"{b}x3x{h}x{w}"

    @property
    def id(self) -> str:
        return f"{self.level}-{self.dtype}-b{self.batch}-{self.shape}" + ("-tiny" if self.tiny else "")

    @property
    def group(self) -> str:
        """Rows with the same group are the same work done by different implementations."""
        return f"{self.stage} {self.level} {self.dtype} {self.shape}"


def _levels_of(stage: str) -> Tuple[str, ...]:
    if stage == MODEL_STAGE:
        return tuple(model_zoo.MODELS)
    if stage == "pad":
        return ("images",)
    if stage in LEVEL_STAGES:
        # The level stages time DETR's sine embedding: DINO's (20/20 per axis) is timed inside the
        # dino-4scale backbone and joiner rows, not here.
        return tuple(f"s{s}" for s in STRIDES) + tuple(v for v in VARIANTS if v != "dino-4scale")
    return VARIANTS  # backbone, joiner, train


def cases(stage: str, scale: float, batches: Sequence[int], dtypes: Sequence[str]) -> List[Case]:
    """Every benchmark case of a stage for the given sizes and dtypes (one level per case)."""
    if stage == TRAIN_STAGE:
        return [Case(stage, "layers2-4", dtype, batch, scale) for dtype in dtypes for batch in batches]
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if stage in LEVEL_STAGES:
        levels = [f"s{s}" for s in STRIDES]
    else:
        levels = list(_levels_of(stage))
    stage_dtypes = list(dtypes) if STAGE_DTYPES[stage] else ["float32"]
    return [Case(stage, level, dtype, batch, scale)
            for dtype in stage_dtypes for batch in batches for level in levels]


def model_case(model: str, dtype: str, device: torch.device, scale: float = 1.0, tiny: bool = False) -> Case:
    """The model stage's case of detector `model` (detr_fast.measure.model_zoo) on `device`: on CUDA the
    model's own sizes (DETR's pair; one 640x640 image for the real-time DETRs), on CPU the issue's
    target (two 400x600 images for the DETR family), scaled by `scale`."""
    model_spec = model_zoo.spec(model)
    sizes = model_spec.sizes if torch.device(device).type == "cuda" else model_spec.bench_cpu_sizes
    return Case(MODEL_STAGE, model, dtype, len(sizes), scale, tuple(sizes), tiny)


def model_cases(models: Sequence[str], scale: float, dtypes: Sequence[str], device: torch.device) -> List[Case]:
    """Every benchmark case of the model stage: one per detector and dtype (see model_case)."""
    return [model_case(model, dtype, device, scale) for dtype in dtypes for model in models]


def make_images(case: Case, device: torch.device, dtype: torch.dtype = torch.float32) -> List[Tensor]:
    """The case's random images (the same for every implementation and run)."""
    g = torch.Generator().manual_seed(case.batch * 1000 + 7)
    return [torch.randn(3, h, w, generator=g).to(device=device, dtype=dtype) for h, w in case.image_sizes]


