"""convert(): upstream-built models get detr_fast's stage, same weights, same outputs."""
import copy
import sys
import types

import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

import detr_fast
from detr_fast import ConversionReport, PositionEmbeddingSine, convert
from detr_fast.conversion.api import find_stages
from detr_fast.conversion.transformers import TRANSFORMERS_FLOOR, release
from detr_fast.fold.folding import count_folded
from detr_fast.sine.params import SineParams
from detr_fast.sine.reference import sine_embedding_reference
from tests.upstream_reference import (
    DEFORMABLE_LAYERS,
    DETR_DETECTION_LAYERS,
    DETR_SEGMENTATION_LAYERS,
    UpstreamBackbone,
    UpstreamMiniDETR,
    UpstreamNestedTensor,
    randomize_frozen_bn_,
    upstream_joiner,
    upstream_pad,
)


def _batch(seed):
    gen = torch.Generator().manual_seed(seed)
    return upstream_pad([torch.randn(3, 75, 101, generator=gen), torch.randn(3, 64, 83, generator=gen)])


def _close(got, want, tol=1e-4):
    assert got.shape == want.shape and got.dtype == want.dtype
    err = (got.double() - want.double()).abs().max() / want.double().abs().max()
    assert err <= tol, err


def _assert_same_state(model, state):
    got = model.state_dict()
    assert list(got) == list(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def _convert(model: nn.Module) -> ConversionReport:
    """convert() gives the model back; its report is conversion_report(model)."""
    assert convert(model) is model
    return detr_fast.conversion_report(model)


@pytest.mark.parametrize("layers,deformable,name", [
    (DETR_DETECTION_LAYERS, False, "resnet50"),
    (DEFORMABLE_LAYERS, True, "resnet50"),
    (DETR_SEGMENTATION_LAYERS, False, "resnet18"),
])
def test_converted_joiner_reproduces_upstream(layers, deformable, name):
    joiner = upstream_joiner(name, layers, deformable=deformable, seed=3)
    ref = copy.deepcopy(joiner)
    state = copy.deepcopy(joiner.state_dict())
    params = list(joiner.parameters())
    report = _convert(joiner)
    assert isinstance(report, ConversionReport) and report
    assert report.folded == count_folded(joiner) == (53 if name == "resnet50" else 20)
    assert isinstance(joiner, detr_fast.detr.Joiner)
    pos = joiner[1]
    assert isinstance(pos, PositionEmbeddingSine) and pos.offset == (-0.5 if deformable else 0.0)
    assert pos.backend == "auto" and pos.num_pos_feats == 128 and pos.normalize
    assert joiner[0].num_channels == ref[0].num_channels
    _assert_same_state(joiner, state)
    assert all(a is b for a, b in zip(joiner.parameters(), params))  # an optimizer keeps working
    batch = _batch(4)  # the upstream NestedTensor class, not detr_fast's
    with torch.no_grad():
        (want_out, want_pos), (got_out, got_pos) = ref(batch), joiner(batch)
    assert len(got_out) == len(want_out) == len(layers)
    for g, w, gp, wp in zip(got_out, want_out, got_pos, want_pos):
        _close(g.tensors, w.tensors)
        assert torch.equal(g.mask, w.mask)
        _close(gp, wp, 1e-5)
        assert g.decompose()[1] is g.mask


def test_converted_detr_model_predictions_match():
    model = UpstreamMiniDETR(upstream_joiner("resnet50", DETR_DETECTION_LAYERS, deformable=False, seed=5)).eval()
    ref = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    report = _convert(model)
    assert any("backbone" in line for line in report.swapped)
    _assert_same_state(model, state)
    batch = _batch(6)
    with torch.no_grad():
        want, got = ref(batch), model(batch)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-4)


def test_bare_backbone_is_converted_in_place():
    joiner = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=7)
    backbone = joiner[0]
    ref = copy.deepcopy(backbone)
    report = _convert(backbone)
    assert isinstance(backbone, detr_fast.backbone.MaskedBackboneBase) and report.folded == 20
    batch = _batch(8)
    with torch.no_grad():
        want, got = ref(batch), backbone(batch)
    for k in want:
        _close(got[k].tensors, want[k].tensors)
        assert torch.equal(got[k].mask, want[k].mask)


def test_detr_fast_modules_are_only_folded():
    joiner = detr_fast.Joiner(detr_fast.Backbone("resnet18", False, True, False, pretrained=False),
                              PositionEmbeddingSine(64, normalize=True, offset=-0.5))
    randomize_frozen_bn_(joiner, torch.Generator().manual_seed(9))
    pos = joiner[1]
    # The oracle: the upstream stand-in with the same weights (hidden_dim 128: 64 sine features).
    ref = upstream_joiner("resnet18", DEFORMABLE_LAYERS, hidden_dim=128, deformable=True)
    ref.load_state_dict(joiner.state_dict(), strict=True)
    report = _convert(joiner)
    assert joiner[1] is pos and type(joiner) is detr_fast.Joiner and report.folded == 20
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == [128, 256, 512]
    images = [torch.randn(3, 50, 70), torch.randn(3, 61, 40)]
    with torch.no_grad():
        (wo, wp), (go, gp) = ref(upstream_pad(images)), joiner(detr_fast.nested_tensor_from_tensor_list(images))
    assert len(go) == len(wo) == 3 and len(gp) == len(wp) == 3
    for g, w, g_pos, w_pos in zip(go, wo, gp, wp):
        _close(g.tensors, w.tensors)
        assert torch.equal(g.mask, w.mask)
        _close(g_pos, w_pos, 1e-5)


def test_deformable_conventions_are_kept():
    joiner = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=10)
    joiner[0].strides = [8, 16, 32]
    joiner[0].num_channels = [128, 256, 512]
    convert(joiner)
    assert isinstance(joiner, detr_fast.Joiner) and isinstance(joiner[0], detr_fast.BackboneBase)
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == [128, 256, 512]


class _OddSine(nn.Module):
    """Looks like a sine embedding but is not one: convert must keep it."""

    def __init__(self):
        super().__init__()
        self.num_pos_feats, self.temperature, self.normalize, self.scale = 64, 10000, True, 6.28

    def forward(self, nt):
        return torch.ones(nt.mask.shape[0], 128, *nt.mask.shape[1:])


def test_unknown_position_embedding_is_kept_with_a_warning():
    joiner = upstream_joiner("resnet18", DEFORMABLE_LAYERS, seed=11)
    joiner[1] = _OddSine()
    with pytest.warns(UserWarning, match="matches neither"):
        report = _convert(joiner)
    assert isinstance(joiner[1], _OddSine) and report.folded == 20
    assert any("matches neither" in why for _, why in report.skipped)


class _Doubling(UpstreamBackbone):
    """A backbone whose forward is not the reference's: the probe must catch it and undo."""

    def forward(self, nt):
        return {k: UpstreamNestedTensor(v.tensors * 2, v.mask) for k, v in super().forward(nt).items()}


def test_a_stage_whose_outputs_change_is_restored():
    backbone = upstream_joiner("resnet18", DETR_DETECTION_LAYERS, seed=12)[0]
    backbone.__class__ = _Doubling
    bn_class = type(backbone.body.bn1)
    state = copy.deepcopy(backbone.state_dict())
    with pytest.warns(UserWarning, match="conversion undone, left as it was"):
        report = _convert(backbone)
    assert type(backbone) is _Doubling and type(backbone.body.bn1) is bn_class
    assert type(backbone.body) is IntermediateLayerGetter
    assert not report and report.folded == 0 and count_folded(backbone) == 0
    _assert_same_state(backbone, state)


def test_nothing_to_convert_warns():
    with pytest.warns(UserWarning, match="no backbone stage"):
        report = _convert(nn.Linear(2, 2))
    assert not report


def test_bad_argument():
    with pytest.raises(TypeError, match="model"):
        convert("detr")


def test_a_model_that_is_a_stage_is_converted_once():
    joiner = upstream_joiner("resnet18", DETR_DETECTION_LAYERS, seed=13)
    assert [path for path, _, _ in find_stages(joiner)] == [""]  # not its backbone a second time
    assert [path for path, _, _ in find_stages(nn.ModuleDict({"backbone": joiner}))] == ["backbone"]


class _HubStyleSine(nn.Module):
    """A sine embedding with transformers' older call convention, forward(pixel_values, pixel_mask)."""

    def __init__(self):
        super().__init__()
        self.embedding_dim, self.temperature, self.normalize, self.scale = 16, 10000, True, None

    def forward(self, pixel_values, pixel_mask):
        return sine_embedding_reference(~pixel_mask.bool(), SineParams(16, 10000.0, True))


def test_release_reads_the_numbers_a_version_starts_with():
    assert release("5.17.0") == release("5.17") == release("v5.17.0.dev0") == release("5.17.0rc1") == (5, 17, 0)
    assert release("5.25.0") > release("5.17.0") > release("5.16.99") > release("4.57.1")
    assert release("unknown") == ()


@pytest.mark.parametrize("version", ["5.16.0", "unknown"])
def test_a_stage_of_a_transformers_older_than_the_floor_is_left_with_the_reason(monkeypatch, version):
    # A stand-in transformers (none needs to be installed): the version check goes by the module
    # that defines the stage's class; the same structure defined elsewhere converts.
    stand_in = types.ModuleType("transformers")
    stand_in.__version__ = version
    monkeypatch.setitem(sys.modules, "transformers", stand_in)
    theirs = type("DetrSinePositionEmbedding", (_HubStyleSine,), {"__module__": "transformers.models.detr"})
    model = nn.Sequential(theirs(), _HubStyleSine())
    with pytest.warns(UserWarning, match=f"0: DetrSinePositionEmbedding comes from transformers {version}, "):
        report = _convert(model)
    assert type(model[0]) is theirs and not isinstance(model[1], _HubStyleSine)
    assert [path for path, _ in report.skipped] == ["0"] and len(report.swapped) == 1
    assert f"transformers >= {TRANSFORMERS_FLOOR}" in report.skipped[0][1]
    stand_in.__version__ = TRANSFORMERS_FLOOR
    _convert(model)
    assert not isinstance(model[0], theirs)
