"""fold/recomputed.py: the training path's folded convolution, whose backward recomputes the folded
weight, against the plain differentiable fold (autograd through w * scale), on convolutions ResNets
do not have (a conv bias, groups, dilation, stride), in float32, float64 and under bf16 autocast."""
import pytest
import torch
from torch import nn

from detr_fast import FrozenBatchNorm2d
from detr_fast.fold import enter_layout
from detr_fast.fold.cache import folded_weight_and_bias
from detr_fast.fold.recomputed import recomputable, recomputed_conv


def _pair(seed, bias, groups, dilation, stride, dtype):
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=bias)
    bn = FrozenBatchNorm2d(12)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        if bias:
            conv.bias.copy_(torch.randn(12, generator=gen))
        bn.weight.copy_(torch.rand(12, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(12, generator=gen))
        bn.running_mean.copy_(torch.randn(12, generator=gen))
        bn.running_var.copy_(torch.rand(12, generator=gen) + 0.1)
    return conv.to(dtype), bn.to(dtype)


def _plain(x, conv, bn, dtype):
    weight, bias = folded_weight_and_bias(conv, bn, dtype)  # differentiable: grad enabled, weight trains
    return torch.nn.functional.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@pytest.mark.parametrize("bias,groups,dilation,stride", [(True, 1, 1, 1), (False, 2, 2, 2), (True, 4, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_the_differentiable_folds(bias, groups, dilation, stride, dtype):
    conv, bn = _pair(1, bias, groups, dilation, stride, dtype)
    assert recomputable(conv, bn)
    x = torch.randn(2, 8, 11, 13, dtype=dtype, requires_grad=True)
    grads = []
    recomputing = lambda: recomputed_conv(x, conv, bn, dtype, torch.contiguous_format)  # noqa: E731
    for run in (recomputing, lambda: _plain(x, conv, bn, dtype)):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        out = run()
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), x.grad.clone(), conv.weight.grad.clone(),
                      None if conv.bias is None else conv.bias.grad.clone()))
    for got, want in zip(*grads):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_under_bf16_autocast():
    conv, bn = _pair(2, True, 1, 1, 1, torch.float32)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        out = recomputed_conv(x, conv, bn, torch.bfloat16, torch.contiguous_format)
        want = _plain(x, conv, bn, torch.bfloat16)
    assert out.dtype == want.dtype == torch.bfloat16 and torch.equal(out, want)
    (g_out,) = torch.autograd.grad(out.float().sum(), conv.weight)
    (g_want,) = torch.autograd.grad(want.float().sum(), conv.weight)
    assert g_out.dtype == torch.float32
    torch.testing.assert_close(g_out, g_want, rtol=1e-5, atol=1e-5)


def test_a_trainable_bn_keeps_the_plain_fold():
    conv, bn = _pair(3, False, 1, 1, 1, torch.float32)
    bn.weight.requires_grad_(True)
    assert not recomputable(conv, bn)


def test_a_training_body_enters_no_channels_last():
    body = nn.Sequential(nn.Conv2d(3, 4, 3)).requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    assert enter_layout(body, x, channels_last=True).is_contiguous(memory_format=torch.channels_last)  # frozen
    body[0].weight.requires_grad_(True)
    assert enter_layout(body, x, channels_last=True) is x  # grad enabled and a parameter trains: as it comes
    with torch.no_grad():  # inference: the fold's layout again
        assert enter_layout(body, x, channels_last=True).is_contiguous(memory_format=torch.channels_last)
    assert enter_layout(body, x, channels_last=False) is x
