"""fold_frozen_bn: the folded ResNet body against the upstream (unfolded) one, in values, gradients,
state_dict and freshness of the folded weights."""
import warnings

import pytest
import torch
import torchvision
from torch import nn

import detr_fast
from detr_fast import FrozenBatchNorm2d, fold_frozen_bn
from detr_fast.fold import fused_conv
from detr_fast.fold.folding import FoldedBasicBlock, FoldedBottleneck, count_folded, unfold_frozen_bn
from tests.upstream_reference import (
    DEFORMABLE_LAYERS,
    UpstreamBackbone,
    UpstreamFrozenBatchNorm2d,
    randomize_frozen_bn_,
)


def _pair(name="resnet50", train_backbone=False, seed=0, layers=DEFORMABLE_LAYERS):
    """An upstream backbone with random non-identity BN statistics, and a folded detr_fast copy."""
    torch.manual_seed(seed)
    up = UpstreamBackbone(name, train_backbone, layers)
    randomize_frozen_bn_(up, torch.Generator().manual_seed(seed))
    ours = detr_fast.Backbone(name, train_backbone, True, False, pretrained=False)
    ours.load_state_dict(up.state_dict(), strict=True)
    return up, fold_frozen_bn(ours)


def _images(seed, h=70, w=101):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _max_rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("name,seed", [("resnet50", 0), ("resnet18", 1)])
def test_folded_body_matches_upstream(name, seed):
    up, ours = _pair(name, seed=seed)
    assert count_folded(ours) == (53 if name == "resnet50" else 20)
    x = _images(seed + 100)
    with torch.no_grad():
        want, got = up.body(x), ours.body(x)
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and got[k].is_contiguous()
        assert _max_rel_err(got[k], want[k]) <= 1e-4


def test_no_frozen_bn_forward_runs_after_folding():
    _, ours = _pair("resnet18", seed=2)
    calls = []
    for m in ours.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ours.body(_images(3, 40, 52))
    assert calls == []
    blocks = [m for m in ours.modules() if isinstance(m, torchvision.models.resnet.BasicBlock)]
    assert blocks and all(type(b) is FoldedBasicBlock for b in blocks)


def test_state_dict_is_exactly_the_reference():
    up, ours = _pair("resnet50", seed=4)
    with torch.no_grad():
        ours.body(_images(5, 40, 40))  # populate the fold caches
    want, got = up.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k
    assert [n for n, p in ours.named_parameters()] == [n for n, p in up.named_parameters()]


def test_loading_a_checkpoint_after_folding_takes_effect():
    up, ours = _pair("resnet18", seed=6)
    x = _images(7, 45, 61)
    with torch.no_grad():
        ours.body(x)  # the fold cache now holds the first weights
        other = UpstreamBackbone("resnet18", False, DEFORMABLE_LAYERS)
        randomize_frozen_bn_(other, torch.Generator().manual_seed(99))
        ours.load_state_dict(other.state_dict())
        want, got = other.body(x), ours.body(x)
    for k in want:
        assert _max_rel_err(got[k], want[k]) <= 1e-4


def test_in_place_parameter_and_buffer_edits_take_effect():
    up, ours = _pair("resnet18", seed=8)
    x = _images(9, 40, 48)
    with torch.no_grad():
        ours.body(x)
        for model in (up, ours):
            model.body.layer3[0].conv1.weight.mul_(1.5)
            model.body.layer4[1].bn2.running_var.add_(0.3)
            model.body.bn1.bias.sub_(0.2)
        want, got = up.body(x), ours.body(x)
    for k in want:
        assert _max_rel_err(got[k], want[k]) <= 1e-4


def test_moving_to_float64_refolds():
    up, ours = _pair("resnet18", seed=10)
    x = _images(11, 40, 40)
    with torch.no_grad():
        ours.body(x)
        up.double()
        ours.double()
        want, got = up.body(x.double()), ours.body(x.double())
    for k in want:
        assert got[k].dtype == torch.float64
        assert _max_rel_err(got[k], want[k]) <= 1e-10


@pytest.mark.slow
def test_training_gradients_match_upstream():
    up, ours = _pair("resnet50", train_backbone=True, seed=12)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in up.named_parameters() if p.requires_grad]
    x = _images(13, 64, 96)
    gen = torch.Generator().manual_seed(14)
    want, got = up.body(x), ours.body(x)
    weights = {k: torch.randn(v.shape, generator=gen) for k, v in want.items()}
    sum((want[k] * weights[k]).sum() for k in want).backward()
    sum((got[k] * weights[k]).sum() for k in got).backward()
    trained = dict(up.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        ref = trained[name]
        if not ref.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None, name
        assert _max_rel_err(p.grad, ref.grad) <= 1e-3, name
        n += 1
    assert n == 42  # the conv weights of layer2-4 (13 + 19 + 10); frozen BN has no parameters


def test_unfold_restores_the_reference_forward():
    up, ours = _pair("resnet18", seed=15)
    unfold_frozen_bn(ours)
    assert count_folded(ours) == 0
    assert not any(type(m) in (FoldedBasicBlock, FoldedBottleneck) for m in ours.modules())
    x = _images(16, 40, 40)
    with torch.no_grad():
        want, got = up.body(x), ours.body(x)
    for k in want:
        assert _max_rel_err(got[k], want[k]) <= 1e-5


def test_fold_is_idempotent_and_folds_a_plain_resnet():
    net = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    randomize_frozen_bn_(net, torch.Generator().manual_seed(17))
    ref = torchvision.models.resnet18(weights=None, norm_layer=UpstreamFrozenBatchNorm2d)
    ref.load_state_dict(net.state_dict(), strict=True)  # the same ResNet with the upstream frozen BN
    fold_frozen_bn(fold_frozen_bn(net))
    assert count_folded(net) == 20
    x = _images(18, 64, 64)
    with torch.no_grad():
        assert _max_rel_err(net(x), ref(x)) <= 1e-4


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_bn_epilogues_match_the_unfused_computation(monkeypatch, fused, memory_format):
    """Both the fused epilogue (where this build has one) and the plain folded convolution."""
    if not fused:
        monkeypatch.setattr(fused_conv, "_fused_supported", lambda *a: False)
    gen = torch.Generator().manual_seed(19)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True)
    bn = randomize_frozen_bn_(FrozenBatchNorm2d(10), gen)
    up_bn = UpstreamFrozenBatchNorm2d(10)
    up_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 6, 9, 13, generator=gen).contiguous(memory_format=memory_format)
    z = torch.randn(2, 10, 5, 7, generator=gen)
    with torch.no_grad():
        plain = up_bn(conv(x))
        torch.testing.assert_close(fused_conv.conv_bn(x, conv, bn), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_conv.conv_bn(x, conv, bn, relu=True), plain.relu(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_conv.conv_bn(x, conv, bn, relu=True, residual=z), (plain + z).relu(),
                                   rtol=1e-5, atol=1e-5)


def test_a_fused_op_that_refuses_one_convolution_runs_it_unfused(monkeypatch):
    """cuDNN can pass the self-check and still find no engine for one shape: that convolution runs
    unfused, with one warning, and the fused op is not tried for it again."""
    monkeypatch.setattr(fused_conv, "_FUSED_REFUSED", set())
    monkeypatch.setattr(fused_conv, "_fused_supported", lambda *a: True)
    tried = []

    def refuse(x, weight, bias, conv, residual):
        tried.append(conv)
        raise RuntimeError("no engine for this convolution")
    monkeypatch.setattr(fused_conv, "_fused_call", refuse)
    gen = torch.Generator().manual_seed(23)
    conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    bn = randomize_frozen_bn_(FrozenBatchNorm2d(8), gen)
    up_bn = UpstreamFrozenBatchNorm2d(8)
    up_bn.load_state_dict(bn.state_dict())
    x = torch.randn(2, 3, 17, 15, generator=gen)  # NCHW: the path of the fused ops
    with torch.no_grad():
        want = up_bn(conv(x)).relu()
        with pytest.warns(UserWarning, match="refused"):
            first = fused_conv.conv_bn(x, conv, bn, relu=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            second = fused_conv.conv_bn(x, conv, bn, relu=True)
    assert tried == [conv]
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second, want, rtol=1e-5, atol=1e-5)


def test_a_wrong_input_raises_and_does_not_disable_the_fused_op(monkeypatch):
    monkeypatch.setattr(fused_conv, "_FUSED_REFUSED", set())
    monkeypatch.setattr(fused_conv, "_fused_supported", lambda *a: True)  # the fused op's branch
    gen = torch.Generator().manual_seed(29)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = randomize_frozen_bn_(FrozenBatchNorm2d(8), gen)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError):
            fused_conv.conv_bn(torch.randn(1, 4, 9, 9, generator=gen), conv, bn, relu=True)  # 4 channels, not 3
    assert not fused_conv._FUSED_REFUSED


def test_no_fold_is_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """Captured kernels run only at replay: a fold cached during capture would never have been
    computed outside the graph, so it is computed (captured) but not kept."""
    from detr_fast.fold import cache as fold_cache
    gen = torch.Generator().manual_seed(31)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    bn = randomize_frozen_bn_(FrozenBatchNorm2d(4), gen)
    with torch.no_grad():
        monkeypatch.setattr(fold_cache, "capturing", lambda device: True)
        first = fold_cache.folded_weight_and_bias(conv, bn)
        assert fold_cache.CACHE_ATTRS[0] not in conv.__dict__
        monkeypatch.setattr(fold_cache, "capturing", lambda device: False)
        second = fold_cache.folded_weight_and_bias(conv, bn)
        assert fold_cache.CACHE_ATTRS[0] in conv.__dict__
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_autocast_bfloat16_runs_folded_with_small_error():
    up, ours = _pair("resnet18", seed=20)
    x = _images(21, 48, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = ours.body(x)
        want_amp = up.body(x)
    with torch.no_grad():
        want = up.body(x)
    for k in want:
        # Same dtype as the reference under autocast: its frozen BN promotes back to float32.
        assert got[k].dtype == want_amp[k].dtype == torch.float32
        assert _max_rel_err(got[k], want[k]) <= 5e-2


def test_blocks_with_other_norm_layers_are_left_with_a_warning():
    net = torchvision.models.resnet18(weights=None)  # nn.BatchNorm2d, not frozen
    with pytest.warns(UserWarning, match="left these unfolded"):
        fold_frozen_bn(net)
    assert count_folded(net) == 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="module"):
        fold_frozen_bn("resnet50")
    with pytest.raises(TypeError, match="channels_last"):
        fold_frozen_bn(nn.Identity(), channels_last="yes")
    with pytest.raises(TypeError, match="module"):
        unfold_frozen_bn(None)
    with pytest.raises(TypeError, match="module"):
        detr_fast.clear_fold_cache(None)
    for eps in ("1e-5", -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps"):
            FrozenBatchNorm2d(4, eps=eps)


def test_a_fold_made_under_inference_mode_serves_a_later_backward():
    """Frozen weights, an input that requires grad (a saliency map): the fold cached by an
    inference_mode call is reused, and autograd must be able to save it."""
    up, ours = _pair("resnet18", seed=5)
    x = _images(5)
    with torch.inference_mode():
        ours.body(x)
    for model in (up, ours):
        model.requires_grad_(False)
    grads = []
    for model in (up, ours):
        xg = x.clone().requires_grad_(True)
        sum(f.sum() for f in model.body(xg).values()).backward()
        grads.append(xg.grad)
    assert _max_rel_err(grads[1], grads[0]) <= 1e-4


def test_an_interrupted_fold_changes_nothing(monkeypatch):
    up, ours = _pair("resnet18", seed=6)
    unfold_frozen_bn(ours)
    classes = [type(m) for m in ours.modules()]

    def interrupt(module):
        raise KeyboardInterrupt

    monkeypatch.setattr(detr_fast.fold.folding, "count_folded", interrupt)  # the last step of a fold
    with pytest.raises(KeyboardInterrupt):
        fold_frozen_bn(ours)
    assert [type(m) for m in ours.modules()] == classes


def test_fold_again_after_editing_a_folded_block():
    up, ours = _pair("resnet18", seed=7)
    for model in (up, ours):
        model.body.layer1[0].relu = nn.Identity()
        model.body.layer2[1].conv1.padding_mode = "reflect"
    with pytest.warns(UserWarning):
        fold_frozen_bn(ours)  # re-checks every block: the two edited ones are unfolded
    x = _images(7)
    with torch.no_grad():
        got, want = ours.body(x), up.body(x)
    for k in want:
        assert _max_rel_err(got[k], want[k]) <= 1e-4, k
