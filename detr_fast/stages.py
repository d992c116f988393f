"""The stages of the backbone step, defined once: sizes, inputs, implementations and errors.

Used by `python -m detr_fast profile` (detr_fast.profile: every stage of a DETR-size batch, each
stage's input the previous stage's output of the same implementation) and by the benchmarks in
bench/ and their smoke test (one stage, one case, one implementation, on synthetic inputs).

The stages, as the Joiner runs them (see ../shared/DESIGN.md):

- ``pad(images) -> NestedTensor``: list of C x H x W images -> padded batch and mask;
- ``masks(nested, level_hw) -> [mask per level]``: the padding mask nearest-downsampled;
- ``pos(features, masks) -> [pos per level]``: the sine embedding of each level's mask, in its
  features' dtype;
- ``masks_pos(nested, features) -> (masks, pos)``: both, as the Joiner runs them (detr_fast:
  ``Joiner.masks_and_pos``, one fused step per level);
- ``backbone(x) -> {name: feature}``: the ResNet-50 body with frozen BatchNorm;
- ``joiner(images) -> ([NestedTensor per level], [pos per level])``: the whole stage, pad included
  (the profile's "total").

Beyond the Joiner, whole transformers detectors (detr_fast.model_zoo; ``Detector``): their
``backbone`` (the conv encoder), ``pos`` (the DETR family's sine embedding of one level) and
``model`` (the full forward: the benchmarks' "model" stage, the profile's "total" of --model NAME),
compared on logits and boxes (``detector_error``).

Implementations (``IMPLS``):

- "reference": the reference path (``pad_images_reference``, ``downsample_mask_reference``,
  ``PositionEmbeddingSine(backend="torch")``, the unfolded ResNet with FrozenBatchNorm2d);
- "detr_fast": what a detr_fast user runs (``nested_tensor_from_tensor_list``, ``backend="auto"``,
  a ``detr_fast.convert``-ed copy of the same weights);
- "compile": ``torch.compile`` of the reference, static shapes, with inductor's freezing on CPU
  (what a CPU user would pick: weights folded as constants); for the model stage, of the
  reference detector's forward;
- "onnxruntime": the reference body exported to ONNX and run by ONNX Runtime's CPU provider
  (backbone stage only; an optional extra, ``pip install -e ".[onnx]"``).

Reduced precision (bfloat16, float16) in the benchmarks means what a user does: the backbone and
the Joiner run under torch.autocast with float32 weights and images; pad copies images of that
dtype; pos is written in the features' dtype. The profile instead casts the weights and images.
"""
import collections
import contextlib
import copy
import functools
import io
import math
import os
import platform
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import model_zoo
from .backbone import Backbone, Joiner
from .convert import conversion_report, convert
from .dispatch import sine_path, triton_available
from .joiner import JoinerBase
from .levels import compute_levels
from .model_zoo import DETR_IMAGE_SIZES, Unavailable, randomize_frozen_bn  # stages.Unavailable is model_zoo's
from .nested_tensor import NestedTensor, nested_tensor_from_tensor_list, trusted_image_sizes
from .position_encoding import PositionEmbeddingSine, sine_position_embedding
from .reference import downsample_mask_reference, pad_images_reference

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("pad", "masks", "pos", "masks_pos", "backbone", "joiner")
IMPLS = ("reference", "detr_fast", "compile", "onnxruntime")
STRIDES = (8, 16, 32)                   # the levels of Deformable-DETR (layers 2-4)
VARIANTS = ("layer4", "layers2-4")      # DETR's detection backbone; Deformable-DETR's
VARIANT_STRIDES = {"layer4": (32,), "layers2-4": (8, 16, 32)}
# Which dtypes a stage is parametrized over: masks are bool whatever the features' dtype.
STAGE_DTYPES = {"pad": True, "masks": False, "pos": True, "masks_pos": True, "backbone": True, "joiner": True}
LEVEL_STAGES = ("masks", "pos", "masks_pos")
NETWORK_STAGES = ("backbone", "joiner")  # the ResNet runs: what --bench-scale shrinks on CPU
POS_FEATS = 128                # hidden_dim 256 / 2, as DETR and Deformable-DETR
POS_CHANNELS = 2 * POS_FEATS
# The whole detector (detr_fast.model_zoo): a benchmark stage of its own, not one of the Joiner's.
MODEL_STAGE = "model"
BENCH_STAGES = STAGES + (MODEL_STAGE,)
DETECTOR_STAGES = ("backbone", "pos", MODEL_STAGE)  # what the profile's --model mode times
BENCH_MODELS = ("detr", "rtdetr")  # the benchmarks' default detectors (issue 10's DETR, RT-DETR-R50)


# ---------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One stage at one size: `batch` images (DETR's pair repeated), scaled by `scale`.

    `level` is "images" for pad; "s8"/"s16"/"s32" (one level) or a variant ("layer4",
    "layers2-4": all of its levels) for masks, pos and masks_pos; a variant for backbone and joiner;
    a detector of detr_fast.model_zoo ("detr", "rtdetr", ...) for the model stage.
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
        return tuple(f"s{s}" for s in STRIDES) + VARIANTS
    return VARIANTS


def cases(stage: str, scale: float, batches: Sequence[int], dtypes: Sequence[str]) -> List[Case]:
    """Every benchmark case of a stage for the given sizes and dtypes (one level per case)."""
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
    """The model stage's case of detector `model` (detr_fast.model_zoo) on `device`: on CUDA the
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


# ---------------------------------------------------------------- models

def build_reference_joiner(variant: str = "layers2-4", seed: int = 0) -> Joiner:
    """A ResNet-50 Joiner with the sine embedding (128 features per axis, normalized) on the
    reference path, with random, non-identity weights and frozen BN statistics."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    backbone = Backbone("resnet50", False, variant == "layers2-4", False, pretrained=False)
    randomize_frozen_bn(backbone, torch.Generator().manual_seed(seed))
    return Joiner(backbone, PositionEmbeddingSine(POS_FEATS, normalize=True, backend="torch")).eval()


def make_fast_joiner(reference: Joiner, log: Optional[Callable[[str], None]] = None) -> Joiner:
    """The detr_fast Joiner: a copy of ``reference`` with the same weights, converted the way a user
    converts a model (detr_fast.convert: folded backbone, fused masks and pos)."""
    fast = make_fast_model(reference, log)
    # The reference's embedding is detr_fast's class on backend "torch": convert() keeps it; a
    # user's runs "auto".
    fast[1].backend = "auto"
    return fast


@functools.lru_cache(maxsize=None)
def joiners(variant: Optional[str], device: str, dtype: str = "float32") -> Tuple[JoinerBase, JoinerBase]:
    """(reference, detr_fast) Joiners of `variant` with weights in `dtype` on `device`, built once.

    ``variant=None``: for the stages that do not run the network (pad, masks, pos, masks_pos),
    Joiners whose backbone is an Identity: only their embeddings are used, and no ResNet-50 is
    built for them.
    """
    if variant is None:
        return (JoinerBase(nn.Identity(), PositionEmbeddingSine(POS_FEATS, normalize=True, backend="torch")),
                JoinerBase(nn.Identity(), PositionEmbeddingSine(POS_FEATS, normalize=True, backend="auto")))
    reference = build_reference_joiner(variant).to(device=torch.device(device), dtype=DTYPES[dtype])
    return reference, make_fast_joiner(reference)


# ---------------------------------------------------------------- implementations

def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast for reduced precision; no context at all without one (autocast warns on float32)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _level_hw(features: Sequence[Tensor]) -> List[Tuple[int, int]]:
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in features]


class Implementation:
    """The stage functions of one implementation over one Joiner (``model``).

    ``autocast``: run the network stages (backbone, joiner) under torch.autocast in this dtype.
    ``function(stage)`` is what is measured; it raises Unavailable where the implementation has no
    such stage here.
    """
    name = ""

    def __init__(self, model: JoinerBase, autocast: Optional[torch.dtype] = None):
        self.model = model
        self.autocast = autocast

    def function(self, stage: str) -> Callable:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        return getattr(self, stage)

    def same_as_reference(self, stage: str, device: torch.device) -> bool:
        """Whether this implementation runs the reference's own code for `stage` on `device`."""
        return False


class Reference(Implementation):
    name = "reference"

    def pad(self, images: List[Tensor]) -> NestedTensor:
        return NestedTensor(*pad_images_reference(images))

    def masks(self, nested: NestedTensor, level_hw: Sequence[Tuple[int, int]]) -> List[Tensor]:
        mask = nested.mask
        assert mask is not None
        return [downsample_mask_reference(mask, [int(h), int(w)]) for h, w in level_hw]

    def pos(self, features: Sequence[Tensor], masks: Sequence[Tensor]) -> List[Tensor]:
        # As the reference Joiner: the embedding of each level, cast to its features' dtype.
        embedding = self.model[1]
        return [embedding(NestedTensor(f, m)).to(f.dtype) for f, m in zip(features, masks)]

    def masks_pos(self, nested: NestedTensor, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        masks = self.masks(nested, _level_hw(features))
        return masks, self.pos(features, masks)

    def backbone(self, x: Tensor) -> Dict[str, Tensor]:
        with _autocast(x.device, self.autocast):
            return self.model[0].body(x)

    def joiner(self, images: List[Tensor]) -> Tuple[List[NestedTensor], List[Tensor]]:
        with _autocast(images[0].device, self.autocast):
            return self.model(self.pad(images))


class DetrFast(Implementation):
    name = "detr_fast"

    def pad(self, images: List[Tensor]) -> NestedTensor:
        return nested_tensor_from_tensor_list(images)

    def masks(self, nested: NestedTensor, level_hw: Sequence[Tuple[int, int]]) -> List[Tensor]:
        """The masks alone, as detr_fast's backbone computes them when no embedding is announced:
        from the image sizes on the CPU fallback (the full-size mask is not read); the reference's
        F.interpolate on the kernels' path (which fuses the masks into masks_pos instead)."""
        mask = nested.mask
        assert mask is not None
        return compute_levels(mask, trusted_image_sizes(nested), level_hw, None, "auto").masks

    def pos(self, features: Sequence[Tensor], masks: Sequence[Tensor]) -> List[Tensor]:
        # detr_fast writes reduced precision directly (computed in float32, rounded once).
        e = self.model[1]
        return [sine_position_embedding(m, e.num_pos_feats, e.temperature, e.normalize, e.scale, offset=e.offset,
                                        eps=e.eps, dtype=f.dtype, backend=e.backend)
                for f, m in zip(features, masks)]

    def masks_pos(self, nested: NestedTensor, features: Sequence[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        return self.model.masks_and_pos(nested, list(features))

    def backbone(self, x: Tensor) -> Dict[str, Tensor]:
        with _autocast(x.device, self.autocast):
            return self.model[0].body(x)

    def joiner(self, images: List[Tensor]) -> Tuple[List[NestedTensor], List[Tensor]]:
        with _autocast(images[0].device, self.autocast):
            return self.model(nested_tensor_from_tensor_list(images))

    def same_as_reference(self, stage: str, device: torch.device) -> bool:
        # On the kernels' path the masks alone are the reference's F.interpolate (see masks()).
        return stage == "masks" and sine_path("auto", torch.device(device)) != "separable"


class Detector(Implementation):
    """The stages of a whole transformers detector (detr_fast.model_zoo), reference or converted:

    - ``backbone(pixel_values, pixel_mask) -> [(feature, mask) per level]``: the conv encoder,
      ``model.model.backbone``;
    - ``pos(feature, mask) -> pos``: the DETR family's sine embedding of one level (the model's own
      call: ``position_embedding(shape, device, dtype, mask)``), in the feature's dtype;
    - ``model(inputs) -> outputs``: the full forward, ``model(**inputs)`` (the profile's "total").

    ``name`` is "reference" or "detr_fast" (the same code, the model is what differs).
    """

    def __init__(self, name: str, model: nn.Module, autocast: Optional[torch.dtype] = None):
        super().__init__(model, autocast)
        self.name = name

    def function(self, stage: str) -> Callable:
        if stage not in DETECTOR_STAGES:
            raise ValueError(f"stage of a detector must be one of {DETECTOR_STAGES}, got {stage!r}")
        if stage == "pos" and model_zoo.position_embedding_of(self.model) is None:
            raise Unavailable(f"{type(self.model).__name__} has no sine position embedding of its own")
        return {"backbone": self.backbone, "pos": self.pos, MODEL_STAGE: self.forward}[stage]

    def backbone(self, pixel_values: Tensor, pixel_mask: Tensor) -> List[Tuple[Tensor, Tensor]]:
        with _autocast(pixel_values.device, self.autocast):
            return model_zoo.backbone_of(self.model)(pixel_values, pixel_mask)

    def pos(self, feature: Tensor, mask: Tensor) -> Tensor:
        embedding = model_zoo.position_embedding_of(self.model)
        assert embedding is not None
        # A fresh view of the mask per call: transformers' DETR embeddings keep their last result
        # (an lru_cache of size 1 keyed on the arguments, the mask by identity), which a forward
        # never hits (each forward's masks are new tensors); calls on one mask object would time
        # that cache. Both sides get the same view.
        mask = mask.view_as(mask)
        return embedding(shape=feature.shape, device=feature.device, dtype=feature.dtype, mask=mask).to(feature.dtype)

    def forward(self, inputs: Dict[str, Tensor]) -> Any:
        with _autocast(inputs["pixel_values"].device, self.autocast):
            return self.model(**inputs)


def make_fast_model(reference: nn.Module, log: Optional[Callable[[str], None]] = None) -> nn.Module:
    """The detr_fast model: ``detr_fast.convert`` of a deep copy of ``reference`` (same weights),
    its conversion report passed to ``log``."""
    fast = convert(copy.deepcopy(reference))
    if log is not None:
        log(str(conversion_report(fast)))
    return fast


@functools.lru_cache(maxsize=None)
def detectors(model: str, device: str, tiny: bool = False) -> Tuple[nn.Module, nn.Module]:
    """(reference, detr_fast) float32 detectors `model` (model_zoo) on `device`, built once."""
    reference = model_zoo.build(model, tiny=tiny).to(torch.device(device))
    return reference, make_fast_model(reference)


def detector_implementation(name: str, model: str, device: torch.device, *, autocast: Optional[torch.dtype] = None,
                            tiny: bool = False) -> Implementation:
    """Implementation `name` (reference, detr_fast, compile) of the cached detectors `model`;
    raises Unavailable where it cannot run here (onnxruntime: the backbone stage only)."""
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    if name == "onnxruntime":
        raise Unavailable("onnxruntime is measured on the backbone stage only (the exported reference body)")
    device = torch.device(device)
    if name == "compile":
        reason = compile_unavailable_reason(device)  # before building the models
        if reason:
            raise Unavailable(reason)
    reference_model, fast_model = detectors(model, str(device), tiny)
    if name == "detr_fast":
        return Detector("detr_fast", fast_model, autocast)
    reference = Detector("reference", reference_model, autocast)
    return reference if name == "reference" else Compiled(reference, device)


def compile_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run on `device` here, or None."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if sys.platform == "win32":
        return "torch.compile's inductor backend is not supported on Windows by every torch version"
    if device.type == "cuda":
        if not triton_available():
            return "torch.compile on CUDA needs Triton, which does not import here"
        return None
    compiler = os.environ.get("CXX")
    if compiler and shutil.which(compiler):
        return None
    if any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return None
    return "torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX); none was found"


@contextlib.contextmanager
def inductor_freezing(enabled: bool = True):
    """torch._inductor.config.freezing = True while open (weights become constants that inductor
    folds and pre-packs: what a CPU inference user turns on), restored afterwards."""
    if not enabled:
        yield
        return
    from torch._inductor import config

    previous = config.freezing
    config.freezing = True
    try:
        yield
    finally:
        config.freezing = previous


class _CompileOnFirstCall:
    """A torch.compile'd function whose first call (the compilation) runs with inductor's
    freezing on (CPU); later calls run the compiled code as it is."""

    def __init__(self, fn: Callable, freezing: bool):
        self.fn = fn
        self.freezing = freezing
        self.compiled = False

    def __call__(self, *args):
        if self.compiled:
            return self.fn(*args)
        with inductor_freezing(self.freezing):
            out = self.fn(*args)
        self.compiled = True
        return out


class Compiled(Implementation):
    """torch.compile of the reference's stage functions: static shapes, a fresh compilation per
    function() call (no recompilation limit is hit across cases, no case runs code made for
    another size), inductor's freezing on CPU."""
    name = "compile"

    def __init__(self, reference: Reference, device: torch.device):
        reason = compile_unavailable_reason(device)
        if reason:
            raise Unavailable(reason)
        super().__init__(reference.model, reference.autocast)
        self.reference = reference
        self.device = torch.device(device)

    def function(self, stage: str) -> Callable:
        fn = self.reference.function(stage)
        dynamo = getattr(torch, "_dynamo", None)
        if dynamo is not None and hasattr(dynamo, "reset"):
            dynamo.reset()
        return _CompileOnFirstCall(torch.compile(fn, dynamic=False), freezing=self.device.type == "cpu")


def onnxruntime_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the ONNX Runtime peer cannot run on `device` here, or None."""
    if torch.device(device).type != "cpu":
        return "the ONNX Runtime peer runs on CPU only (CPUExecutionProvider)"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (an optional extra: pip install -e \".[onnx]\")"
    if not hasattr(torch, "onnx"):
        return f"torch {torch.__version__} has no torch.onnx"
    return None


class OnnxRuntime(Implementation):
    """The reference ResNet body exported to ONNX (opset 17, the TorchScript-based exporter, one
    output per returned layer, static shapes) and run by ONNX Runtime's CPU provider with as many
    threads as torch; one session per input shape, kept. ONNX Runtime folds the frozen BN into the
    convolutions itself (its graph optimizations)."""
    name = "onnxruntime"

    def __init__(self, reference: Reference, device: torch.device):
        reason = onnxruntime_unavailable_reason(device)
        if reason:
            raise Unavailable(reason)
        super().__init__(reference.model, reference.autocast)
        self._sessions: Dict[tuple, Any] = {}

    def function(self, stage: str) -> Callable:
        if stage != "backbone":
            raise Unavailable("onnxruntime is measured on the backbone stage only (the exported reference body)")
        if self.autocast is not None and self.autocast != torch.float32:
            raise Unavailable("onnxruntime runs the exported float32 body; reduced precision is not exported")
        return self.backbone

    def session(self, x: Tensor):
        """(session, output names, layer names) for inputs of x's shape, exported once."""
        key = (tuple(x.shape), x.dtype, torch.get_num_threads())
        if key not in self._sessions:
            import onnxruntime

            body = self.model[0].body
            with torch.no_grad():
                layers = list(body(x).keys())
            names = [f"layer_{name}" for name in layers]  # ONNX names cannot be bare numbers
            buffer = io.BytesIO()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(body, (x,), buffer, opset_version=17, dynamo=False, input_names=["images"],
                                  output_names=names)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
            self._sessions[key] = (session, names, layers)
        return self._sessions[key]

    def backbone(self, x: Tensor) -> Dict[str, Tensor]:
        session, names, layers = self.session(x)
        outputs = session.run(names, {"images": x.contiguous().numpy()})
        return collections.OrderedDict((name, torch.from_numpy(out)) for name, out in zip(layers, outputs))


def implementation(name: str, variant: Optional[str], device: torch.device, *, dtype: str = "float32",
                   autocast: Optional[torch.dtype] = None) -> Implementation:
    """Implementation `name` over the cached Joiners of `variant` (weights in `dtype`) on `device`
    (see joiners(): None for the stages without the network); raises Unavailable when it cannot
    run here."""
    if name not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {name!r}")
    device = torch.device(device)
    reference_model, fast_model = joiners(variant, str(device), dtype)
    if name == "detr_fast":
        return DetrFast(fast_model, autocast)
    reference = Reference(reference_model, autocast)
    if name == "reference":
        return reference
    if name == "compile":
        return Compiled(reference, device)
    return _onnxruntime(variant, str(device), dtype, autocast)


@functools.lru_cache(maxsize=None)
def _onnxruntime(variant: Optional[str], device: str, dtype: str, autocast: Optional[torch.dtype]) -> OnnxRuntime:
    # Cached: its exported sessions are kept per input shape.
    return OnnxRuntime(Reference(joiners(variant, device, dtype)[0], autocast), torch.device(device))


# ---------------------------------------------------------------- errors

def max_abs_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest absolute difference over pairs of tensors (0 for empty ones)."""
    return max((float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)


def max_rel_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """Largest absolute difference relative to the largest magnitude of ``b``, over pairs."""
    return max((float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
                for x, y in zip(a, b) if x.numel()), default=0.0)


def _check_shapes(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise AssertionError(f"{what}: shapes {[tuple(x.shape) for x in a]} != reference "
                             f"{[tuple(y.shape) for y in b]}")


def _mask_mismatches(a: Sequence[Tensor], b: Sequence[Tensor], what: str = "masks") -> int:
    _check_shapes(a, b, what)
    return sum(int((x != y).sum()) for x, y in zip(a, b))


def _pos_error(pos: Sequence[Tensor], expected: Sequence[Tensor], dtype: Optional[torch.dtype], what: str) -> float:
    _check_shapes(pos, expected, what)
    for p in pos:
        if dtype is not None and p.dtype != dtype:
            raise AssertionError(f"{what}: dtype {p.dtype}, expected {dtype}")
    return max_abs_error(pos, expected)


def error(stage: str, out: Any, expected: Any, dtype: Optional[torch.dtype] = None) -> float:
    """The largest error of a stage's output against the reference's (``expected``); shapes (and,
    with ``dtype``, pos's dtype) must match. What is measured:

    - pad: max abs difference of the batch (bit-exact copies: 0) + mismatching mask elements;
    - masks: mismatching elements;
    - pos: max abs difference (values in [-1, 1]);
    - masks_pos: pos's max abs difference + the masks' mismatching elements;
    - backbone: max relative error of the features (their scale grows through the network);
    - joiner: max of the features' relative and pos's abs error, + mask mismatches;
    - model: the larger of the logits' and the boxes' relative errors (detector_error).
    """
    if stage == MODEL_STAGE:
        return detector_error(stage, out, expected)
    if stage == "pad":
        _check_shapes([out.tensors, out.mask], [expected.tensors, expected.mask], "pad")
        return max_abs_error([out.tensors], [expected.tensors]) + float((out.mask != expected.mask).sum())
    if stage == "masks":
        return float(_mask_mismatches(out, expected))
    if stage == "pos":
        return _pos_error(out, expected, dtype, "pos")
    if stage == "masks_pos":
        return _pos_error(out[1], expected[1], dtype, "masks_pos pos") + _mask_mismatches(out[0], expected[0])
    if stage == "backbone":
        values, wanted = list(out.values()), list(expected.values())
        _check_shapes(values, wanted, "backbone")
        return max_rel_error(values, wanted)
    if stage == "joiner":
        (levels, pos), (exp_levels, exp_pos) = out, expected
        features, exp_features = [lv.tensors for lv in levels], [lv.tensors for lv in exp_levels]
        _check_shapes(features, exp_features, "joiner features")
        _check_shapes(pos, exp_pos, "joiner pos")
        mismatches = _mask_mismatches([lv.mask for lv in levels], [lv.mask for lv in exp_levels], "joiner masks")
        return max(max_rel_error(features, exp_features), max_abs_error(pos, exp_pos)) + mismatches
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


PREDICTIONS = ("logits", "pred_boxes")  # what a detector's outputs are compared on


def predictions(outputs: Any) -> Dict[str, Tensor]:
    """A detector's class logits and boxes (transformers' ``*ObjectDetectionOutput``)."""
    return {key: getattr(outputs, key) for key in PREDICTIONS}


def prediction_errors(out: Any, expected: Any) -> Dict[str, float]:
    """Relative error of each prediction (max abs difference / max magnitude of the reference's)."""
    got, wanted = predictions(out), predictions(expected)
    _check_shapes(list(got.values()), list(wanted.values()), "predictions")
    return {key: max_rel_error([got[key]], [wanted[key]]) for key in PREDICTIONS}


def detector_error(stage: str, out: Any, expected: Any) -> float:
    """The largest error of a detector stage's output against the reference's:

    - backbone: max relative error of the features + mismatching mask elements;
    - pos: max abs difference (values in [-1, 1]);
    - model: the larger of the logits' and the boxes' relative errors (prediction_errors).
    """
    if stage == "backbone":
        features, wanted = [f for f, _ in out], [f for f, _ in expected]
        _check_shapes(features, wanted, "backbone features")
        mismatches = _mask_mismatches([m for _, m in out], [m for _, m in expected], "backbone masks")
        return max_rel_error(features, wanted) + mismatches
    if stage == "pos":
        return _pos_error([out], [expected], None, "pos")
    if stage == MODEL_STAGE:
        return max(prediction_errors(out, expected).values())
    raise ValueError(f"stage of a detector must be one of {DETECTOR_STAGES}, got {stage!r}")


# ---------------------------------------------------------------- the benchmarks' runners

@dataclass
class Runner:
    """fn() is the measured call; error(out) its largest error against the float32 reference."""
    fn: Callable[[], Any]
    error: Callable[[Any], float]


def bench_inputs(case: Case, device: torch.device) -> Tuple[tuple, tuple]:
    """(inputs, float32 inputs) of the case's stage: what every implementation gets, and what
    the float32 reference gets to compute the expected output. Synthetic for one stage: the padded
    batch of the case's images; a level's features are zeros of the case's dtype (pos reads only
    their shape and dtype; one channel keeps the memory small)."""
    dtype = DTYPES[case.dtype]
    if case.stage == "pad":
        images = make_images(case, device, dtype)
        return (images,), (images,)
    if case.stage == "joiner":
        images = make_images(case, device)
        return (images,), (images,)
    nested = nested_tensor_from_tensor_list(make_images(case, device))
    if case.stage == "backbone":
        return (nested.tensors,), (nested.tensors,)
    if case.stage == "masks":
        return (nested, case.level_sizes), (nested, case.level_sizes)
    features = [torch.zeros(case.batch, 1, h, w, device=device, dtype=dtype) for h, w in case.level_sizes]
    features32 = [f.float() for f in features]
    if case.stage == "masks_pos":
        return (nested, features), (nested, features32)
    assert nested.mask is not None
    masks = [downsample_mask_reference(nested.mask, [h, w]) for h, w in case.level_sizes]
    return (features, masks), (features32, masks)


_LAST_EXPECTED: Dict[Tuple[Case, str], Any] = {}


def _last_expected(case: Case, device: torch.device, compute: Callable[[], Any]) -> Any:
    """The float32 reference output of `case`, computed once for all its implementations (they
    run one after the other); only the last case is kept, the outputs can be large."""
    key = (case, str(device))
    if key not in _LAST_EXPECTED:
        _LAST_EXPECTED.clear()
        _LAST_EXPECTED[key] = compute()
    return _LAST_EXPECTED[key]


def _build_model(case: Case, impl: str, device: torch.device) -> Runner:
    """The model stage: the full forward of detector ``case.level`` on the case's images (with
    their pixel_mask for the DETR family), reduced precision under autocast as a user runs it."""
    dtype = DTYPES[case.dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise Unavailable("float16 autocast is not supported on CPU by every torch version; use bfloat16")
    autocast = dtype if dtype != torch.float32 else None
    with torch.no_grad():
        runs = detector_implementation(impl, case.level, device, autocast=autocast, tiny=case.tiny)
        fn = runs.function(MODEL_STAGE)
        inputs = model_zoo.inputs(case.level, case.image_sizes, device)
        reference = detector_implementation("reference", case.level, device, tiny=case.tiny)
        why = model_zoo.query_check(reference.model, case.level, case.image_sizes)
        if why:
            raise Unavailable(why)
        expected = _last_expected(case, device, lambda: reference.function(MODEL_STAGE)(inputs))
    return Runner(lambda: fn(inputs), lambda out: detector_error(MODEL_STAGE, out, expected))


def build(case: Case, impl: str, device: torch.device) -> Runner:
    """The runner of `impl` for `case` on `device`; raises Unavailable when it cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if case.stage == MODEL_STAGE:
        return _build_model(case, impl, device)
    dtype = DTYPES[case.dtype]
    if device.type == "cpu" and dtype == torch.float16 and case.stage in NETWORK_STAGES:
        raise Unavailable("float16 autocast is not supported on CPU by every torch version; use bfloat16")
    autocast = dtype if case.stage in NETWORK_STAGES and dtype != torch.float32 else None
    # no_grad, as DETR evaluates; not inference_mode, whose tensors have no version counters
    # (NestedTensor.image_sizes and cached folded weights rely on them).
    variant = case.variant if case.stage in NETWORK_STAGES else None
    with torch.no_grad():
        runs = implementation(impl, variant, device, autocast=autocast)
        if impl == "detr_fast" and runs.same_as_reference(case.stage, device):
            raise Unavailable(f"detr_fast's {case.stage} alone is the reference's own function on {device} "
                              "(~1.0x by construction); its fused version is measured by the masks_pos benchmarks")
        fn = runs.function(case.stage)
        inputs, inputs32 = bench_inputs(case, device)
        reference = implementation("reference", variant, device)
        expected = _last_expected(case, device, lambda: reference.function(case.stage)(*inputs32))
    check_dtype = dtype if case.stage in ("pos", "masks_pos") else None
    return Runner(lambda: fn(*inputs), lambda out: error(case.stage, out, expected, check_dtype))


# ---------------------------------------------------------------- the machine

def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
