"""convert(model): put detr_fast's backbone stage into an existing model, in place.

One mechanism serves every family: walk the model, recognise each stage by structure (the
StageKinds of upstream.py — facebookresearch's DETR, Deformable-DETR and IDEA-Research's DINO
family — and of transformers.py — transformers' DETR family and real-time DETRs), run it on a small probe
input, convert it (swap classes and modules, fold the frozen BN; every change recorded), run the
probe again and undo every change to that stage, with a warning, if its outputs changed.
Whatever cannot be converted is left as it was, with the reason in the report and a warning.
An error inside convert() undoes everything it did before re-raising: nothing is half-converted.
"""
import logging
import warnings
from typing import List, Optional, Tuple

from torch import nn

from ..fold import count_folded
from ..validation import check_module
from .machinery import (
    ConversionReport,
    LeaveAsIs,
    StageKind,
    Undo,
    first_float,
    join_path,
    run_probe,
    same_outputs,
    tolerance,
)
from .transformers import KINDS as TRANSFORMERS_KINDS
from .upstream import KINDS as UPSTREAM_KINDS

logger = logging.getLogger("detr_fast")

KINDS: Tuple[StageKind, ...] = UPSTREAM_KINDS + TRANSFORMERS_KINDS
_REPORT_ATTR = "_detr_fast_conversion_report"


def _kind_of(module: nn.Module) -> Optional[StageKind]:
    return next((k for k in KINDS if k.matches(module)), None)


def find_stages(model: nn.Module) -> List[Tuple[str, nn.Module, StageKind]]:
    """Every stage in ``model`` (outermost first; nothing inside a stage is a stage of its own)."""
    stages: List[Tuple[str, nn.Module, StageKind]] = []
    for name, module in model.named_modules():
        if any(not p or name == p or name.startswith(p + ".") for p, _, _ in stages):  # "": the model itself
            continue
        kind = _kind_of(module)
        if kind is not None:
            stages.append((name, module, kind))
    return stages


def _convert_stage(model: nn.Module, path: str, stage: nn.Module, kind: StageKind, report: ConversionReport,
                   done: List[Undo]) -> None:
    where = join_path(path)
    why = kind.unsupported(stage)
    if why is not None:
        report.skipped.append((where, f"{why}; left as it is"))
        return
    args = kind.probe_args(stage)
    try:
        expected = run_probe(stage, args)
    except Exception as err:
        report.skipped.append((where, f"it does not run on a probe input ({type(err).__name__}: {err})"))
        return
    undo = Undo(model)
    done.append(undo)
    swapped, folded_before = len(report.swapped), count_folded(stage)
    try:
        kind.convert(stage, path, undo, report)
    except LeaveAsIs as reason:
        undo.run()
        del report.swapped[swapped:]
        report.skipped.append((where, f"{reason}; left as it is"))
        return
    converted = model.get_submodule(path) if path else model
    try:
        why = same_outputs(expected, run_probe(converted, args), tolerance(*first_float(stage)))
    except Exception as err:
        why = f"the converted stage raised {type(err).__name__}: {err}"
    if why is not None:
        undo.run()
        del report.swapped[swapped:]
        report.skipped.append((where, f"conversion undone, left as it was: on a probe input {why}"))
        return
    report.folded += count_folded(converted) - folded_before


def convert(model: nn.Module) -> nn.Module:
    """Swap every backbone stage in ``model`` for detr_fast's, in place, and return ``model``.

    ``model``: a model built by facebookresearch's DETR / Deformable-DETR code (or a Joiner or
    Backbone of it), a transformers DETR-family or real-time DETR model (or its conv encoder),
    or detr_fast's own modules (then the body is folded). What was done is in
    ``detr_fast.conversion_report(model)``; it is also logged at INFO on the "detr_fast" logger,
    and whatever was left as it was is also a UserWarning.
    """
    check_module(model, "model")
    report = ConversionReport()
    stages = find_stages(model)
    report.stages = len(stages)
    done: List[Undo] = []
    try:
        for path, stage, kind in stages:
            _convert_stage(model, path, stage, kind, report, done)
    except BaseException:
        for undo in reversed(done):
            undo.run()
        raise
    if not stages:
        report.skipped.append(("<model>", "no backbone stage found (a DETR / Deformable-DETR Joiner or backbone, "
                                          "or a transformers conv encoder or sine embedding); nothing was changed"))
    for path, why in report.skipped:
        warnings.warn(f"detr_fast.convert: {path}: {why}", stacklevel=2)
    model.__dict__[_REPORT_ATTR] = report
    logger.info("%s", report)
    return model


def conversion_report(model: nn.Module) -> ConversionReport:
    """What the last detr_fast.convert(model) did to ``model`` (ValueError if it never ran on it)."""
    report = model.__dict__.get(_REPORT_ATTR) if isinstance(model, nn.Module) else None
    if report is None:
        raise ValueError("conversion_report(model) needs a model that detr_fast.convert() has run on")
    return report
