"""How far an implementation's output is from the reference's, per stage."""
from typing import Any, Dict, Optional, Sequence

import torch
from torch import Tensor

from .cases import DETECTOR_STAGES, MODEL_STAGE, STAGES

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


