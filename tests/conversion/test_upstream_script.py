"""Upstream DETR's own test suite (test_all.py) on converted models: torch.jit.script of the whole
model — detection, panoptic (DETRsegm, which calls the backbone itself) and a module wrapping DETR —
gives the reference's outputs, survives torch.jit.save/load, takes the inputs upstream's DETR takes,
and exports to ONNX. So does a DETR built from detr_fast's drop-in classes.

The oracle is the unconverted stand-in (tests/upstream_reference.py). Its NestedTensor is a class of
its own, as upstream's util.misc.NestedTensor is: TorchScript's class types are nominal, so a
converted stage annotated with detr_fast's NestedTensor would not compile inside it (detr_fast's
stages take the structural interface detr_fast.nested_tensor.NestedTensorLike when scripted).

Tolerances. Scripted, a converted model runs the reference computation (the folded classes' scripting
branch runs torchvision's unfolded blocks) except that detr_fast's FrozenBatchNorm2d rounds x * scale
+ shift once (addcmul) where the stand-in rounds twice; eager, it runs the folded convolutions. So
eager and scripted differ by float rounding (upstream's test_all asserts bit equality for the
unconverted model only); the measured differences are printed (pytest -s).
"""
import copy
import io
from typing import Dict, List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn

import detr_fast
import detr_fast.detr
from detr_fast.conversion.upstream import script_input_problem
from tests.test_deployment import _onnx
from tests.upstream_reference import (
    DEFORMABLE_LAYERS,
    UpstreamJoiner,
    UpstreamMiniDeformableDETR,
    UpstreamNestedTensor,
    UpstreamWrappedDETR,
    upstream_detr,
    upstream_joiner,
    upstream_nested_tensor_from_tensor_list,
)

# Relative to the output's largest magnitude: float32 rounding through a toy DETR.
TOL = 1e-5

SIZES = [[(64, 96), (50, 80)], [(40, 40), (56, 48), (48, 64)]]


def _images(sizes, seed=0) -> List[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def _max_diff(got: Dict[str, Tensor], want: Dict[str, Tensor]) -> float:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, k
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def _assert_close(got: Dict[str, Tensor], want: Dict[str, Tensor], tol: float = TOL) -> float:
    diff = _max_diff(got, want)
    scale = max(want[k].abs().max().item() for k in want)
    assert diff <= tol * scale, f"max abs difference {diff:.3g} (largest output {scale:.3g})"
    return diff


@pytest.fixture(scope="module")
def detection() -> Tuple[nn.Module, nn.Module]:
    """(reference, converted): a toy DETR and a converted copy (neither scripting, exporting nor
    running changes them, so the tests share them)."""
    reference = upstream_detr(seed=1)
    return reference, detr_fast.convert(copy.deepcopy(reference))


def _models(kind: str, detection: Tuple[nn.Module, nn.Module]) -> Tuple[nn.Module, nn.Module]:
    """(reference, converted) of one kind: detection, panoptic, or wrapped (WrappedDETR around DETR)."""
    if kind == "panoptic":
        reference = upstream_detr(masks=True, seed=2)
        return reference, detr_fast.convert(copy.deepcopy(reference))
    if kind == "wrapped":
        return tuple(UpstreamWrappedDETR(m).eval() for m in detection)
    return detection


def _input(kind: str, images: List[Tensor]):
    return images if kind == "wrapped" else upstream_nested_tensor_from_tensor_list(images)


def _round_trip(scripted: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize("kind", ["detection", "panoptic", "wrapped"])
def test_a_converted_detr_scripts_as_a_whole_and_gives_the_reference_outputs(kind, detection):
    reference, converted = _models(kind, detection)
    report = detr_fast.conversion_report(converted.model if kind == "wrapped" else converted)
    assert report.folded == 20 and not report.skipped  # resnet18: every conv + frozen BN pair
    folded = detr_fast.fold.count_folded(converted)
    assert folded == 20
    # The stand-in scripts as upstream's model does, bit-equal to its eager self (upstream's test_all).
    scripted_reference = torch.jit.script(reference)
    scripted = torch.jit.script(converted)
    loaded = _round_trip(scripted)
    assert detr_fast.fold.count_folded(converted) == folded  # scripting leaves the eager model folded
    diffs = {"scripted vs reference": 0.0, "eager vs reference": 0.0, "eager vs scripted": 0.0}
    for i, sizes in enumerate(SIZES):
        x = _input(kind, _images(sizes, seed=i))
        with torch.no_grad(), torch.jit.optimized_execution(i == 0):  # see _UNOPTIMIZED
            want = reference(x)
            assert _max_diff(scripted_reference(x), want) == 0.0
            got = scripted(x)
            eager = converted(x)
            assert _max_diff(loaded(x), got) == 0.0
        if kind == "panoptic":
            assert got["pred_masks"].shape[0] == len(sizes)
        for name, (a, b) in {"scripted vs reference": (got, want), "eager vs reference": (eager, want),
                             "eager vs scripted": (eager, got)}.items():
            diffs[name] = max(diffs[name], _assert_close(a, b))
    print(f"{kind} (converted): max abs difference " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


# _UNOPTIMIZED: after the first input above (the default executor, as upstream's test_all runs),
# scripted models run without the profiling executor's graph optimizations
# (torch.jit.optimized_execution(False)), which re-profile and re-optimize for every new input shape
# (seconds per call on this toy model). What compiles, and what the graph computes, is the same.


def _drop_in_joiner(masks: bool, hidden_dim: int = 32) -> nn.Module:
    backbone = detr_fast.detr.Backbone("resnet18", False, masks, False, pretrained=False)
    return detr_fast.detr.Joiner(backbone, detr_fast.PositionEmbeddingSine(hidden_dim // 2, normalize=True))


@pytest.mark.parametrize("masks", [False, True], ids=["detection", "panoptic"])
def test_a_detr_built_from_the_drop_in_classes_scripts_as_a_whole(masks):
    reference = upstream_detr(masks=masks, seed=3)
    model = upstream_detr(masks=masks, seed=3, backbone=_drop_in_joiner(masks))
    model.load_state_dict(reference.state_dict())
    scripted = _round_trip(torch.jit.script(model))
    diffs = {"scripted vs reference": 0.0, "eager vs scripted": 0.0}
    for i, sizes in enumerate(SIZES):
        images = _images(sizes, seed=10 + i)
        with torch.no_grad(), torch.jit.optimized_execution(False):  # see _UNOPTIMIZED
            want = reference(upstream_nested_tensor_from_tensor_list(images))
            got = scripted(upstream_nested_tensor_from_tensor_list(images))
            # Scripted, detr_fast's own NestedTensor is taken too.
            assert _max_diff(scripted(detr_fast.nested_tensor_from_tensor_list(images)), got) == 0.0
            eager = model(detr_fast.nested_tensor_from_tensor_list(images))
        diffs["scripted vs reference"] = max(diffs["scripted vs reference"], _assert_close(got, want))
        diffs["eager vs scripted"] = max(diffs["eager vs scripted"], _assert_close(eager, got))
    print(f"{'panoptic' if masks else 'detection'} (drop-in, unconverted): max abs difference "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


def test_a_converted_detr_takes_the_inputs_upstream_detr_takes(detection):
    reference, converted = detection
    images = _images(SIZES[0], seed=3)
    batch = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(upstream_nested_tensor_from_tensor_list(images))
        _assert_close(converted(upstream_nested_tensor_from_tensor_list(images)), want)
        _assert_close(converted(detr_fast.nested_tensor_from_tensor_list(images)), want)
        _assert_close(converted(images), want)                 # a list of C x H x W images
        _assert_close(converted(batch), reference(batch))       # a B x C x H x W tensor
        _assert_close(converted([batch[0]]), reference(batch[:1]))


def test_deformable_detr_use_of_the_backbone_scripts_after_convert():
    """Upstream's Deformable-DETR does not script (MSDeformAttn is a custom autograd Function over a
    CUDA extension); its use of the backbone does, including the extra level's pos computed by calling
    the converted embedding with the model's own NestedTensor class."""
    joiner = upstream_joiner("resnet18", DEFORMABLE_LAYERS, hidden_dim=32, deformable=True, seed=5)
    torch.manual_seed(5)
    reference = UpstreamMiniDeformableDETR(joiner, [128, 256, 512]).eval()
    converted = detr_fast.convert(copy.deepcopy(reference))
    assert isinstance(converted.backbone[1], detr_fast.PositionEmbeddingSine)
    scripted = _round_trip(torch.jit.script(converted))
    for i, sizes in enumerate(SIZES):
        nt = upstream_nested_tensor_from_tensor_list(_images(sizes, seed=20 + i))
        with torch.no_grad(), torch.jit.optimized_execution(False):  # see _UNOPTIMIZED
            want, got, eager = reference(nt), scripted(nt), converted(nt)
        _assert_close(got, want)
        _assert_close(eager, got)


class _TensorsIn(nn.Module):
    """ONNX takes tensors: the padded batch and its mask in, DETR's outputs out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.model(UpstreamNestedTensor(images, mask))
        return out["pred_logits"], out["pred_boxes"]


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-exporter", "dynamo"])
def test_onnx_export_of_a_whole_converted_detr(dynamo, detection):
    ort = pytest.importorskip("onnxruntime", reason="needs the 'onnx' extra")
    reference, converted = detection
    nt = upstream_nested_tensor_from_tensor_list(_images(SIZES[0], seed=6))
    with torch.no_grad():
        want = _TensorsIn(reference)(nt.tensors, nt.mask)
    proto = _onnx(_TensorsIn(converted), (nt.tensors, nt.mask), dynamo)
    assert sum(node.op_type == "Conv" for node in proto.graph.node) == 20 + 1  # the folded body, input_proj
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    got = session.run(None, {inputs[0].name: nt.tensors.numpy(), inputs[1].name: nt.mask.numpy()})
    _assert_close({str(i): torch.from_numpy(g) for i, g in enumerate(got)},
                  {str(i): w for i, w in enumerate(want)}, tol=1e-4)


# ---------------------------------------------------------------- stages convert() cannot script-enable

class _NoDecompose:
    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask


class _TensorDecompose:
    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def decompose(self) -> Tensor:
        return self.tensors


class _NoDecomposeJoiner(UpstreamJoiner):
    def forward(self, nt: _NoDecompose):
        return UpstreamJoiner.forward(self, nt)


class _TensorDecomposeJoiner(UpstreamJoiner):
    def forward(self, nt: _TensorDecompose):
        return UpstreamJoiner.forward(self, nt)


@pytest.mark.parametrize("cls, why", [(_NoDecomposeJoiner, "has no decompose()"),
                                      (_TensorDecomposeJoiner, "whose decompose\\(\\) TorchScript does not type")],
                         ids=["no decompose", "decompose returns a tensor"])
def test_a_joiner_whose_nested_tensor_class_cannot_be_scripted_is_left_as_it_was(cls, why):
    model = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=7)
    model.__class__ = cls
    classes = [(name, type(m)) for name, m in model.named_modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match=f"detr_fast.convert: <model>: {cls.__name__}.forward takes .*{why}"):
        detr_fast.convert(model)
    report = detr_fast.conversion_report(model)
    assert not report.swapped and report.folded == 0 and len(report.skipped) == 1
    assert "left as it is" in report.skipped[0][1]
    assert [(name, type(m)) for name, m in model.named_modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_upstream_nested_tensor_classes_pass_the_check():
    assert script_input_problem(upstream_joiner("resnet18", DEFORMABLE_LAYERS)) is None
    assert script_input_problem(_drop_in_joiner(False)) is None
    assert script_input_problem(nn.Sequential()) is None  # no annotation: nothing to check
