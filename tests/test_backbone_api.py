"""Backbones and Joiners in both conventions against the independent upstream stand-in.

Deformable-DETR's conventions live at detr_fast.* (layers 2-4, lists of strides and channels),
DETR's at detr_fast.detr.* (layers 1-4, int num_channels). For both: state_dict keys and shapes,
checkpoints loading both ways with strict=True, equal outputs, requires_grad patterns, strides and
channels, build_backbone from args, TorchScript, and the errors a user can cause.
ResNet-18 and tiny images keep this fast: the depth of the ResNet does not matter for the API.
"""
import argparse
import http.client
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import detr_fast
import detr_fast.detr as detr
from detr_fast import FrozenBatchNorm2d, NestedTensor, PositionEmbeddingSine, nested_tensor_from_tensor_list
from tests.upstream_reference import (
    DEFORMABLE_LAYERS,
    DETR_DETECTION_LAYERS,
    DETR_SEGMENTATION_LAYERS,
    UpstreamBackbone,
    randomize_frozen_bn_,
    upstream_joiner,
    upstream_pad,
)

H, W = 64, 80
TRAINABLE = ("layer2", "layer3", "layer4")


def _images(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, H, W, generator=g).to(dtype), torch.randn(3, 30, 41, generator=g).to(dtype)]


# (convention, return_interm_layers) -> upstream return layers
CASES = [
    ("deformable", True, DEFORMABLE_LAYERS),
    ("deformable", False, DETR_DETECTION_LAYERS),
    ("detr", True, DETR_SEGMENTATION_LAYERS),
    ("detr", False, DETR_DETECTION_LAYERS),
]
CASE_IDS = ["deformable-interm", "deformable-last", "detr-interm", "detr-last"]


def _ours_backbone(convention, train_backbone, return_interm, dilation=False, name="resnet18"):
    module = detr_fast if convention == "deformable" else detr
    return module.Backbone(name, train_backbone, return_interm, dilation, pretrained=False)


def _ours_joiner(convention, backbone, hidden_dim=32):
    offset = -0.5 if convention == "deformable" else 0.0
    pos = PositionEmbeddingSine(hidden_dim // 2, normalize=True, offset=offset, backend="torch")
    return (detr_fast.Joiner if convention == "deformable" else detr.Joiner)(backbone, pos)


# ---------------------------------------------------------------- FrozenBatchNorm2d

def test_frozen_bn_loads_batchnorm_checkpoint_and_matches_eval_batch_norm():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(6, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(6, generator=g))
        bn.running_mean.copy_(torch.randn(6, generator=g))
        bn.running_var.copy_(torch.rand(6, generator=g) + 0.1)
    bn.num_batches_tracked.fill_(17)
    state = bn.state_dict()
    assert "num_batches_tracked" in state
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(state, strict=True)
    assert "num_batches_tracked" not in frozen.state_dict()
    assert list(frozen.parameters()) == []

    x = torch.randn(2, 6, 5, 7, generator=g)
    out = frozen(x)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The formula by hand for one element.
    c = 3
    by_hand = ((x[1, c, 2, 4] - bn.running_mean[c]) / torch.sqrt(bn.running_var[c] + 1e-5)
               * bn.weight[c] + bn.bias[c])
    torch.testing.assert_close(out[1, c, 2, 4], by_hand, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, bn.eval()(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- state_dict and outputs

@pytest.mark.parametrize("convention,interm,layers", CASES, ids=CASE_IDS)
def test_backbone_state_dict_matches_upstream(convention, interm, layers):
    ours = _ours_backbone(convention, True, interm)
    up = UpstreamBackbone("resnet18", True, layers)
    ours_sd, up_sd = ours.state_dict(), up.state_dict()
    assert list(ours_sd) == list(up_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in up_sd.items()}


@pytest.mark.parametrize("convention,interm,layers", CASES, ids=CASE_IDS)
def test_joiner_checkpoints_load_both_ways_and_outputs_match(convention, interm, layers):
    deformable = convention == "deformable"
    up = upstream_joiner("resnet18", layers, hidden_dim=32, deformable=deformable, seed=1)
    ours = _ours_joiner(convention, _ours_backbone(convention, False, interm))
    ours.load_state_dict(up.state_dict(), strict=True)

    images = _images(seed=2)
    up_feats, up_pos = up(upstream_pad(images))
    feats, pos = ours(nested_tensor_from_tensor_list(images))
    assert len(feats) == len(up_feats) == len(layers) and len(pos) == len(layers)
    for f, uf, p, up_p in zip(feats, up_feats, pos, up_pos):
        assert isinstance(f, NestedTensor)
        # Not bitwise: FrozenBatchNorm2d may fuse its multiply-add (one rounding instead of two).
        torch.testing.assert_close(f.tensors, uf.tensors, rtol=1e-4, atol=1e-4)
        assert torch.equal(f.mask, uf.mask)
        assert f.mask.any() and not f.mask.all()   # the padding really reaches every level
        assert p.dtype == f.tensors.dtype
        assert p.shape == up_p.shape and p.stride() == up_p.stride()
        torch.testing.assert_close(p, up_p, rtol=1e-5, atol=1e-5)

    # And the other way round: a checkpoint of ours loads into the upstream modules.
    ours_sd = {k: v.clone() for k, v in ours.state_dict().items()}
    randomize_frozen_bn_(ours, torch.Generator().manual_seed(9))
    fresh_up = upstream_joiner("resnet18", layers, hidden_dim=32, deformable=deformable, seed=3)
    fresh_up.load_state_dict(ours.state_dict(), strict=True)
    for k, v in fresh_up.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k])
    assert any(not torch.equal(ours.state_dict()[k], ours_sd[k]) for k in ours_sd)
    if not interm:
        return   # the layer-4-only model runs a subset of the same layers: skip its second forward
    feats, _ = ours(nested_tensor_from_tensor_list(images))
    up_feats, _ = fresh_up(upstream_pad(images))
    for f, uf in zip(feats, up_feats):
        torch.testing.assert_close(f.tensors, uf.tensors, rtol=1e-4, atol=1e-4)


def test_joiner_pos_follows_feature_dtype():
    up = upstream_joiner("resnet18", DEFORMABLE_LAYERS, hidden_dim=16, deformable=True, seed=0).double()
    ours = _ours_joiner("deformable", _ours_backbone("deformable", False, True), hidden_dim=16).double()
    ours.load_state_dict(up.state_dict(), strict=True)
    images = _images(seed=4, dtype=torch.float64)
    feats, pos = ours(nested_tensor_from_tensor_list(images))
    _, up_pos = up(upstream_pad(images))
    for f, p, up_p in zip(feats, pos, up_pos):
        assert f.tensors.dtype == torch.float64 and p.dtype == torch.float64
        torch.testing.assert_close(p, up_p, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- requires_grad, strides, channels

@pytest.mark.parametrize("convention", ["deformable", "detr"])
@pytest.mark.parametrize("train_backbone", [True, False])
def test_requires_grad_pattern(convention, train_backbone):
    ours = _ours_backbone(convention, train_backbone, True)
    up = UpstreamBackbone("resnet18", train_backbone,
                          DEFORMABLE_LAYERS if convention == "deformable" else DETR_SEGMENTATION_LAYERS)
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    assert flags == {n: p.requires_grad for n, p in up.named_parameters()}
    for name, flag in flags.items():
        assert flag == (train_backbone and any(f"body.{layer}." in name for layer in TRAINABLE)), name
    assert any(flags.values()) == train_backbone
    # Frozen BN has buffers only: nothing else can ever train.
    assert not any("bn" in n or "downsample.1" in n for n in flags)


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", True)])
def test_deformable_strides_and_channels_match_feature_shapes(name, dilation):
    # torchvision supports dilation only in bottleneck ResNets, hence resnet50 for it.
    backbone = _ours_backbone("deformable", False, True, dilation=dilation, name=name)
    assert backbone.strides == ([8, 16, 16] if dilation else [8, 16, 32])
    expansion = 4 if name == "resnet50" else 1
    assert backbone.num_channels == [128 * expansion, 256 * expansion, 512 * expansion]
    out = backbone(nested_tensor_from_tensor_list(_images()))
    assert list(out) == ["0", "1", "2"]
    for (key, nt), stride, channels in zip(out.items(), backbone.strides, backbone.num_channels):
        assert nt.tensors.shape == (2, channels, -(-H // stride), -(-W // stride)), key
        assert nt.mask.shape == (2, -(-H // stride), -(-W // stride))
    last = _ours_backbone("deformable", False, False, dilation=dilation, name=name)
    assert last.strides == ([16] if dilation else [32]) and last.num_channels == [512 * expansion]
    if dilation:
        return   # layer4's shape with dilation was checked above; resnet50 forwards are the slow part
    (nt,) = last(nested_tensor_from_tensor_list(_images())).values()
    assert nt.tensors.shape[-2:] == (-(-H // last.strides[0]), -(-W // last.strides[0]))


@pytest.mark.parametrize("cls", [detr_fast.Backbone, detr.Backbone], ids=["deformable", "detr"])
def test_dilation_with_basic_block_resnet_is_a_value_error(cls):
    with pytest.raises(ValueError, match="dilation"):
        cls("resnet34", False, False, True, pretrained=False)


def test_detr_dilation_matches_upstream():
    up = UpstreamBackbone("resnet50", False, DETR_DETECTION_LAYERS, dilation=True)
    randomize_frozen_bn_(up, torch.Generator().manual_seed(0))
    ours = detr.Backbone("resnet50", False, False, True, pretrained=False)
    ours.load_state_dict(up.state_dict(), strict=True)
    images = _images(seed=6)
    (f,) = ours(nested_tensor_from_tensor_list(images)).values()
    (uf,) = up(upstream_pad(images)).values()
    assert f.tensors.shape == (2, 2048, H // 16, W // 16)
    # Relative to the largest value, as in test_convert and test_folding: ResNet-50's random
    # weights (from the test's seed) give outputs in the hundreds, whose float32 rounding
    # differences (~1e-6 of that) can exceed an absolute 1e-4 next to a small element.
    err = (f.tensors.double() - uf.tensors.double()).abs().max() / uf.tensors.double().abs().max()
    assert err <= 1e-4, err
    assert torch.equal(f.mask, uf.mask)


def test_deformable_resnet50_channels_and_joiner_exposes_them():
    backbone = _ours_backbone("deformable", False, True, name="resnet50")
    assert backbone.num_channels == [512, 1024, 2048] and backbone.strides == [8, 16, 32]
    joiner = _ours_joiner("deformable", backbone)
    assert joiner.num_channels == [512, 1024, 2048] and joiner.strides == [8, 16, 32]
    last = _ours_backbone("deformable", False, False, name="resnet50")
    assert last.num_channels == [2048] and last.strides == [32]


def test_deformable_backbone_base_on_a_plain_resnet():
    resnet = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    base = detr_fast.BackboneBase(resnet, False, True)
    assert base.strides == [8, 16, 32] and base.num_channels == [512, 1024, 2048]
    with pytest.raises(TypeError, match="backbone"):
        detr_fast.BackboneBase("resnet50", False, True)


@pytest.mark.parametrize("name,channels", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_detr_num_channels_is_an_int(name, channels):
    backbone = detr.Backbone(name, False, False, False, pretrained=False)
    assert backbone.num_channels == channels and isinstance(backbone.num_channels, int)


def test_detr_interm_layers_are_layer1_to_4():
    backbone = _ours_backbone("detr", False, True)
    out = backbone(nested_tensor_from_tensor_list(_images()))
    assert list(out) == ["0", "1", "2", "3"]
    assert [nt.tensors.shape[1] for nt in out.values()] == [64, 128, 256, 512]
    assert [nt.tensors.shape[-1] for nt in out.values()] == [W // 4, W // 8, W // 16, -(-W // 32)]


def test_backbone_needs_a_mask():
    backbone = _ours_backbone("detr", False, False)
    with pytest.raises(ValueError, match="mask"):
        backbone(NestedTensor(torch.zeros(1, 3, 32, 32), None))


# ---------------------------------------------------------------- build_backbone

def _args(**kw):
    base = dict(lr_backbone=1e-5, masks=False, num_feature_levels=1, backbone="resnet18", dilation=False,
                hidden_dim=32, position_embedding="sine", pretrained=False)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("kw,levels", [
    (dict(), 1),
    (dict(num_feature_levels=4), 3),
    (dict(masks=True), 3),
    (dict(num_feature_levels=4, dilation=True, backbone="resnet50"), 3),
])
def test_build_backbone_deformable(kw, levels):
    model = detr_fast.build_backbone(_args(**kw))
    assert isinstance(model, detr_fast.Joiner)
    assert len(model.strides) == levels == len(model.num_channels)
    if kw.get("dilation"):
        assert model.strides[-1] == 16
    assert isinstance(model[1], PositionEmbeddingSine) and model[1].num_pos_feats == 16
    feats, pos = model(nested_tensor_from_tensor_list(_images()))
    assert len(feats) == len(pos) == levels
    assert [p.shape[1] for p in pos] == [32] * levels
    assert [f.tensors.shape[1] for f in feats] == model.num_channels


def test_build_backbone_train_flag_and_learned_embedding():
    frozen = detr_fast.build_backbone(_args(lr_backbone=0.0, position_embedding="learned"))
    assert not any(p.requires_grad for p in frozen[0].parameters())
    assert isinstance(frozen[1], detr_fast.PositionEmbeddingLearned)
    assert any(p.requires_grad for p in detr_fast.build_backbone(_args())[0].parameters())


@pytest.mark.parametrize("masks,levels", [(False, 1), (True, 4)])
def test_build_backbone_detr(masks, levels):
    model = detr.build_backbone(_args(masks=masks, backbone="resnet34"))
    assert isinstance(model, detr.Joiner)
    assert model.num_channels == 512 and isinstance(model.num_channels, int)
    feats, pos = model(nested_tensor_from_tensor_list(_images()))
    assert len(feats) == len(pos) == levels
    assert feats[-1].tensors.shape[1] == 512


@pytest.mark.parametrize("build", [detr_fast.build_backbone, detr.build_backbone], ids=["deformable", "detr"])
def test_build_backbone_unknown_name(build):
    with pytest.raises(ValueError, match="resnet"):
        build(_args(backbone="resnet19"))


@pytest.mark.parametrize("cls", [detr_fast.Backbone, detr.Backbone], ids=["deformable", "detr"])
def test_unknown_backbone_name(cls):
    with pytest.raises(ValueError, match="name"):
        cls("vgg16", False, False, False, pretrained=False)


@pytest.mark.parametrize("error", [urllib.error.URLError("network is unreachable"),
                                   http.client.IncompleteRead(b"partial")], ids=["offline", "cut"])
@pytest.mark.parametrize("cls", [detr_fast.Backbone, detr.Backbone], ids=["deformable", "detr"])
def test_pretrained_offline_fails_with_clear_runtime_error(cls, error, monkeypatch):
    def offline(*args, **kwargs):
        raise error

    # Whatever the weights enum would fetch, fetching fails as it does offline.
    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="pretrained=False") as info:
        cls("resnet18", False, False, False, pretrained=True)
    assert "resnet18" in str(info.value)


@pytest.mark.parametrize("cls", [detr_fast.Backbone, detr.Backbone], ids=["deformable", "detr"])
def test_pretrained_loads_torchvision_imagenet_v1_weights(cls, monkeypatch):
    # A BatchNorm2d ResNet's state dict (with num_batches_tracked) stands in for the download.
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    for module in source.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.running_var, 0.5, 2.0)
            nn.init.normal_(module.running_mean)
    checkpoint = source.state_dict()
    requested = []

    def fake_download(weights, *args, **kwargs):
        requested.append(weights)
        return {k: v.clone() for k, v in checkpoint.items()}

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", fake_download)
    backbone = cls("resnet18", True, False, False, pretrained=True)
    # DETR's pretrained=True meant torchvision's original ImageNet weights: IMAGENET1K_V1.
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    loaded = backbone.state_dict()
    for key, value in checkpoint.items():
        ours = "body." + key
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            assert ours not in loaded
        else:
            assert torch.equal(loaded[ours], value), key


# ---------------------------------------------------------------- TorchScript

def test_detr_backbone_and_joiner_script_and_match_eager():
    backbone = _ours_backbone("detr", False, True)
    randomize_frozen_bn_(backbone, torch.Generator().manual_seed(0))
    joiner = _ours_joiner("detr", backbone)
    nt = nested_tensor_from_tensor_list(_images(seed=5))

    scripted_backbone = torch.jit.script(backbone)
    eager = backbone(nt)
    scripted = scripted_backbone(nt)
    assert list(scripted) == list(eager)
    for name in eager:
        torch.testing.assert_close(scripted[name].tensors, eager[name].tensors, rtol=1e-5, atol=1e-5)
        assert torch.equal(scripted[name].mask, eager[name].mask)

    scripted_joiner = torch.jit.script(joiner)
    feats, pos = joiner(nt)
    s_feats, s_pos = scripted_joiner(nt)
    assert len(s_feats) == len(feats) == 4
    for f, sf, p, sp in zip(feats, s_feats, pos, s_pos):
        torch.testing.assert_close(sf.tensors, f.tensors, rtol=1e-5, atol=1e-5)
        assert torch.equal(sf.mask, f.mask)
        torch.testing.assert_close(sp, p, rtol=0, atol=1e-6)
