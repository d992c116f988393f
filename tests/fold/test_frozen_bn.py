"""FrozenBatchNorm2d's unfolded forward (one addcmul) against hand-computed and upstream values."""
import pytest
import torch

from detr_fast import FrozenBatchNorm2d
from tests.upstream_reference import UpstreamFrozenBatchNorm2d, randomize_frozen_bn_


def _random_bn(n, seed, cls=FrozenBatchNorm2d):
    return randomize_frozen_bn_(cls(n), torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_matches_hand_computed_batchnorm(seed):
    bn = _random_bn(5, seed)
    x = torch.randn(2, 5, 3, 7, generator=torch.Generator().manual_seed(seed + 10))
    # (x - mean) / sqrt(var + eps) * gamma + beta, in float64
    d = {k: v.double().reshape(1, -1, 1, 1) for k, v in bn.state_dict().items()}
    want = (x.double() - d["running_mean"]) / torch.sqrt(d["running_var"] + 1e-5) * d["weight"] + d["bias"]
    torch.testing.assert_close(bn(x).double(), want, rtol=1e-6, atol=1e-6)


def test_forward_matches_upstream_and_keeps_its_promotion_and_layout():
    bn = _random_bn(8, 3)
    up = UpstreamFrozenBatchNorm2d(8)
    up.load_state_dict(bn.state_dict())
    x = torch.randn(3, 8, 5, 4).contiguous(memory_format=torch.channels_last)
    y = bn(x)
    torch.testing.assert_close(y, up(x), rtol=1e-6, atol=1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert bn(x.bfloat16()).dtype == up(x.bfloat16()).dtype == torch.float32


def test_scale_and_shift_is_the_folding_formula():
    bn = _random_bn(6, 4)
    scale, shift = bn.scale_and_shift()
    gamma, beta, mean, var = bn.weight, bn.bias, bn.running_mean, bn.running_var
    eps = 1e-5  # upstream's constant, written out rather than read from the module under test
    torch.testing.assert_close(scale, gamma / torch.sqrt(var + eps))
    torch.testing.assert_close(shift, beta - mean * gamma / torch.sqrt(var + eps))


def test_gradient_flows_to_the_input():
    bn = _random_bn(4, 5)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    bn(x).sum().backward()
    # d/dx of (x - mean) / sqrt(var + eps) * gamma + beta: gamma / sqrt(var + eps), by hand.
    scale = bn.weight / torch.sqrt(bn.running_var + 1e-5)
    torch.testing.assert_close(x.grad, scale.reshape(1, -1, 1, 1).expand_as(x))
