"""The stages of the backbone step, ready to time: a case's inputs, its implementation and its error check.

The pieces are defined once each: the cases (cases.py), the implementations (implementations.py)
and the error measures (errors.py). Used by `python -m detr_fast profile` (profile.py: every
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

Beyond the Joiner, whole transformers detectors (detr_fast.measure.model_zoo; ``Detector``): their
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
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch

from ..nested_tensor import nested_tensor_from_tensor_list
from ..sine import downsample_mask_reference
from . import model_zoo
from .cases import DTYPES, IMPLS, MODEL_STAGE, NETWORK_STAGES, TRAIN_STAGE, Case, make_images
from .errors import detector_error, error
from .implementations import detector_implementation, implementation
from .model_zoo import Unavailable  # stages.Unavailable is model_zoo's
from .training import autocast_unavailable_reason, gradient_error, train_step

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


def _build_train(case: Case, impl: str, device: torch.device) -> Runner:
    """The train stage: one training step (forward + backward) of the Joiner as DETR trains it
    (detr_fast.measure.training), reduced precision under autocast; its output is the gradients,
    its error the norm-wise worst relative gradient error against the float32 reference's."""
    dtype = DTYPES[case.dtype]
    autocast = dtype if dtype != torch.float32 else None
    step = train_step(impl, case.variant, device, autocast)
    images = make_images(case, device)
    reference = train_step("reference", case.variant, device)
    expected = _last_expected(case, device, lambda: {k: g.clone() for k, g in reference(images).items()})
    return Runner(lambda: step(images), lambda out: gradient_error(out, expected))


def build(case: Case, impl: str, device: torch.device) -> Runner:
    """The runner of `impl` for `case` on `device`; raises Unavailable when it cannot run here."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    device = torch.device(device)
    if case.stage == MODEL_STAGE:
        return _build_model(case, impl, device)
    if case.stage == TRAIN_STAGE:
        return _build_train(case, impl, device)
    dtype = DTYPES[case.dtype]
    if device.type == "cpu" and dtype == torch.float16 and case.stage in NETWORK_STAGES:
        raise Unavailable("float16 autocast is not supported on CPU by every torch version; use bfloat16")
    autocast = dtype if case.stage in NETWORK_STAGES and dtype != torch.float32 else None
    reason = autocast_unavailable_reason(device, autocast)
    if reason:  # never timed as if supported: emulated bf16 on a CPU without it is slower than float32
        raise Unavailable(reason)
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
