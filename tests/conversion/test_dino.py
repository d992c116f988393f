"""IDEA-Research's DINO family: convert() of its Joiner, detr_fast.dino's drop-in classes, checked
against an independent stand-in of DINO's code (tests/dino_reference.py)."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import detr_fast
import detr_fast.dino
from detr_fast import PositionEmbeddingSineHW
from detr_fast.fold.folding import count_folded
from tests import dino_reference as dino
from tests.dino_reference import DinoNestedTensor, TinyNonResNet, dino_joiner, dino_pad

# Padding on both axes, odd sizes; the last set has a one-pixel level (layer4 of a 29 x 31 image).
IMAGE_SETS = {
    "padded-both-axes": [(75, 101), (64, 120)],
    "one-pixel-level": [(29, 31), (17, 9)],
}


def _images(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()


def _convert(model):
    assert detr_fast.convert(model) is model
    return detr_fast.conversion_report(model)


def _assert_same_levels(got, want, tol=1e-4, pos_tol=1e-5):
    (go, gp), (wo, wp) = got, want
    assert len(go) == len(wo) and len(gp) == len(wp) == len(wo)
    for g, w, g_pos, w_pos in zip(go, wo, gp, wp):
        assert type(g) is type(w)  # the caller's NestedTensor class
        assert g.tensors.dtype == w.tensors.dtype and g.tensors.shape == w.tensors.shape
        assert _rel_err(g.tensors, w.tensors) <= tol
        assert torch.equal(g.mask, w.mask)
        assert g_pos.dtype == w_pos.dtype == g.tensors.dtype and g_pos.shape == w_pos.shape
        assert _rel_err(g_pos, w_pos) <= pos_tol


@pytest.mark.parametrize("indices", [(1, 2, 3), (0, 1, 2, 3)], ids=["4scale", "5scale"])
@pytest.mark.parametrize("images", list(IMAGE_SETS))
def test_converted_dino_joiner_reproduces_the_stand_in(indices, images):
    joiner = dino_joiner("resnet18", indices, temperatures=(20, 10), seed=1)
    ref = copy.deepcopy(joiner)
    state = copy.deepcopy(joiner.state_dict())
    params = list(joiner.parameters())
    report = _convert(joiner)
    assert report.folded == count_folded(joiner) == 20 and not report.skipped
    assert isinstance(joiner, detr_fast.dino.Joiner) and isinstance(joiner[0], detr_fast.dino.BackboneBase)
    assert joiner.num_channels == ref.num_channels == ref[0].num_channels
    pos = joiner[1]
    assert isinstance(pos, PositionEmbeddingSineHW)
    assert (pos.temperatureH, pos.temperatureW, pos.num_pos_feats, pos.normalize) == (20, 10, 128, True)
    assert "<model>[1]: PositionEmbeddingSineHW -> detr_fast.PositionEmbeddingSineHW (temperatures 20, 10)" \
        in report.swapped
    assert "[0].body: folded 20 conv+BN pairs (1 torchvision stem, 8 BasicBlock)" in report.swapped
    got_state = joiner.state_dict()
    assert list(got_state) == list(state) and all(torch.equal(got_state[k], state[k]) for k in state)
    assert all(a is b for a, b in zip(joiner.parameters(), params))
    batch = dino_pad(_images(IMAGE_SETS[images], seed=2))
    with torch.no_grad():
        got, want = joiner(batch), ref(batch)
    assert len(got[0]) == len(indices)
    _assert_same_levels(got, want)
    if images == "one-pixel-level":
        assert got[0][-1].tensors.shape[-2:] == (1, 1)


@pytest.mark.parametrize("mode", ["bf16-weights", "fp16-weights", "bf16-autocast"])
def test_dtype_cast_of_pos_under_reduced_precision(mode):
    joiner = dino_joiner("resnet18", (1, 2, 3), temperatures=(20, 20), seed=3)
    batch = dino_pad(_images(IMAGE_SETS["padded-both-axes"], seed=4))
    context = torch.no_grad
    if mode.endswith("weights"):  # reduced-precision weights: the features, and pos cast to them, are too
        dtype = torch.bfloat16 if mode.startswith("bf16") else torch.float16
        joiner.to(dtype)
        batch = DinoNestedTensor(batch.tensors.to(dtype), batch.mask)
    else:  # CPU autocast: bfloat16 convolutions, the frozen BN's float32 buffers promote back to float32
        def context():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    ref = copy.deepcopy(joiner)
    report = _convert(joiner)
    assert report.folded == 20 and isinstance(joiner[1], PositionEmbeddingSineHW)
    with torch.no_grad(), context():
        got, want = joiner(batch), ref(batch)
    if mode.endswith("weights"):
        assert got[1][0].dtype == want[1][0].dtype == dtype
    # The features round differently (folded weights); pos is float32 rounded once, as DINO's.
    _assert_same_levels(got, want, tol=5e-2, pos_tol=0)


@pytest.mark.parametrize("embedding", [
    dict(num_pos_feats=64, temperatures=(20, 20)),
    dict(num_pos_feats=24, temperatures=(10000, 7)),
    dict(num_pos_feats=16, temperatures=(3, 50), normalize=False),
    dict(num_pos_feats=32, temperatures=(20, 40), scale=1.5),
], ids=["dino", "F24", "raw", "scale"])
def test_non_resnet_body_keeps_its_backbone_and_gets_detr_fast_embedding(embedding):
    torch.manual_seed(5)
    f = embedding["num_pos_feats"]
    pos = dino.PositionEmbeddingSineHW(f, *embedding["temperatures"], embedding.get("normalize", True),
                                       embedding.get("scale"))
    joiner = dino.Joiner(TinyNonResNet(), pos).eval()
    body_modules = list(joiner[0].modules())
    ref = copy.deepcopy(joiner)
    with pytest.warns(UserWarning, match=r"\[0\]: TinyNonResNet has no ResNet body"):
        report = _convert(joiner)
    assert [m for m in joiner[0].modules()] == body_modules and type(joiner) is dino.Joiner
    assert isinstance(joiner[1], PositionEmbeddingSineHW) and report.folded == 0
    assert any("-> detr_fast.PositionEmbeddingSineHW" in line for line in report.swapped)
    assert "[0]" in dict(report.skipped)
    batch = dino_pad(_images([(75, 101), (64, 120)], seed=6))
    with torch.no_grad():
        got, want = joiner(batch), ref(batch)
    _assert_same_levels(got, want, tol=0)


class _ShiftedHW(dino.PositionEmbeddingSineHW):
    """DINO's attributes, but a different computation: convert must keep it."""

    def forward(self, tensor_list):
        return super().forward(tensor_list) + 1


def test_hw_embedding_that_probes_as_something_else_is_kept():
    joiner = dino_joiner("resnet18", (1, 2, 3), seed=7)
    joiner[1] = _ShiftedHW(128, 20, 20, normalize=True)
    with pytest.warns(UserWarning, match="does not match DINO's sine embedding"):
        report = _convert(joiner)
    assert type(joiner[1]) is _ShiftedHW and report.folded == 20
    assert any(path == "<model>[1]" for path, _ in report.skipped)


def _args(**overrides):
    args = dict(backbone="resnet18", lr_backbone=1e-5, return_interm_indices=[1, 2, 3], backbone_freeze_keywords=None,
                dilation=False, hidden_dim=64, position_embedding="sine", pe_temperatureH=20, pe_temperatureW=20,
                masks=False, pretrained=False)
    args.update(overrides)
    return SimpleNamespace(**args)


@pytest.mark.parametrize("indices", [[1, 2, 3], [0, 1, 2, 3], [3]])
def test_dino_drop_in_loads_dino_checkpoints_both_ways(indices):
    args = _args(return_interm_indices=indices, pe_temperatureW=10)
    torch.manual_seed(8)
    ours, theirs = detr_fast.dino.build_backbone(args), dino.build_backbone(args)
    dino.randomize_frozen_bn_(theirs, torch.Generator().manual_seed(8))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.num_channels == theirs.num_channels == ours[0].num_channels
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
        [(n, p.requires_grad) for n, p in theirs.named_parameters()]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    copy.deepcopy(theirs).load_state_dict(ours.state_dict(), strict=True)
    pos = ours[1]
    assert isinstance(pos, PositionEmbeddingSineHW) and (pos.temperatureH, pos.temperatureW) == (20, 10)
    images = _images(IMAGE_SETS["padded-both-axes"], seed=9)
    with torch.no_grad():
        got = ours(detr_fast.nested_tensor_from_tensor_list(images))
        want = theirs(dino_pad(images))
    assert len(got[0]) == len(indices)
    for g, w, g_pos, w_pos in zip(got[0], want[0], got[1], want[1]):
        assert _rel_err(g.tensors, w.tensors) <= 1e-4 and torch.equal(g.mask, w.mask)
        assert _rel_err(g_pos, w_pos) <= 1e-5


def test_dino_drop_in_is_only_folded_by_convert():
    joiner = detr_fast.dino.build_backbone(_args())
    pos = joiner[1]
    report = _convert(joiner)
    assert type(joiner) is detr_fast.dino.Joiner and joiner[1] is pos and report.folded == 20


@pytest.mark.parametrize("override,name", [
    (dict(pe_temperatureH=0), "pe_temperatureH"), (dict(pe_temperatureW=-1.0), "pe_temperatureW"),
    (dict(hidden_dim=63), "hidden_dim"), (dict(return_interm_indices=[1, 2]), "return_interm_indices"),
    (dict(lr_backbone=0), "lr_backbone"), (dict(backbone="swin_T_224_1k"), "backbone"),
    (dict(position_embedding="v9"), "position_embedding"),
])
def test_build_backbone_rejects_bad_args(override, name):
    with pytest.raises(ValueError, match=name):
        detr_fast.dino.build_backbone(_args(**override))


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperatureH=0), "temperature"), (dict(temperatureW=-3), "temperature"),
    (dict(num_pos_feats=63), "num_pos_feats"),
])
def test_hw_embedding_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PositionEmbeddingSineHW(**kwargs)


def test_dino_backbone_rejects_a_foreign_batch_norm():
    with pytest.raises(ValueError, match="batch_norm"):
        detr_fast.dino.Backbone("resnet18", True, False, [1, 2, 3], batch_norm=nn.BatchNorm2d, pretrained=False)
