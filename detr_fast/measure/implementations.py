"""The implementations a stage is timed with: reference, detr_fast, torch.compile, ONNX Runtime, detectors."""
import collections
import contextlib
import copy
import functools
import io
import os
import shutil
import sys
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import dino
from ..backbone import Backbone, Joiner
from ..conversion import conversion_report, convert
from ..dispatch import sine_path, triton_available
from ..joiner import JoinerBase
from ..nested_tensor import NestedTensor, nested_tensor_from_tensor_list, trusted_image_sizes
from ..sine import (
    PositionEmbeddingSine,
    PositionEmbeddingSineHW,
    compute_levels,
    downsample_mask_reference,
    pad_images_reference,
    sine_position_embedding,
)
from . import model_zoo
from .cases import DETECTOR_STAGES, DTYPES, IMPLS, MODEL_STAGE, POS_FEATS, STAGES, VARIANTS
from .model_zoo import NotMeasured, Unavailable, randomize_frozen_bn  # stages.Unavailable is model_zoo's

# ---------------------------------------------------------------- models

def build_reference_joiner(variant: str = "layers2-4", seed: int = 0, train_backbone: bool = False
                           ) -> Joiner:
    """A ResNet-50 Joiner with the sine embedding (128 features per axis, normalized) on the
    reference path, with random, non-identity weights and frozen BN statistics; ``train_backbone``:
    layers 2-4 trainable, as DETR and DINO train (lr_backbone > 0)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    torch.manual_seed(seed)
    if variant == "dino-4scale":  # DINO's layout: layers 2-4, temperatures 20/20, pos cast to the features' dtype
        backbone = dino.Backbone("resnet50", train_backbone, False, [1, 2, 3], pretrained=False)
        randomize_frozen_bn(backbone, torch.Generator().manual_seed(seed))
        embedding = PositionEmbeddingSineHW(POS_FEATS, 20, 20, normalize=True)
        embedding.backend = "torch"
        return dino.Joiner(backbone, embedding).eval()
    backbone = Backbone("resnet50", train_backbone, variant == "layers2-4", False, pretrained=False)
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
        p = e.sine_params()  # also a PositionEmbeddingSineHW's (its attributes are DINO's names)
        return [sine_position_embedding(m, p.num_pos_feats, p.temperature, p.normalize, p.scale, offset=p.offset,
                                        eps=p.eps, dtype=f.dtype, backend=e.backend, temperature_w=p.temperature_w)
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
    """The stages of a whole transformers detector (detr_fast.measure.model_zoo), reference or converted:

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
        raise NotMeasured("onnxruntime is measured on the backbone stage only (the exported reference body)")
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
            raise NotMeasured("onnxruntime is measured on the backbone stage only (the exported reference body)")
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


