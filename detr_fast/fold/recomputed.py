"""The folded convolution for training, with the reference's memory: the folded weight is recomputed
in the backward instead of being kept from the forward.

Differentiably, ``F.conv2d(x, w * scale, b)`` saves the folded weight ``w * scale`` for its backward:
one extra copy of every trainable convolution's weight per training step (the reference saves only
the parameter, which exists anyway). Here the backward saves the parameter and the per-channel scale,
rebuilds the folded weight (a cheap elementwise product), and calls the convolution's own backward.
The gradients are those of the differentiable fold: d(w * scale) = grad_folded * scale, computed in
the same precision as the fold (at least float32), rounded once to the weight's dtype.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .cache import fold_scale_and_bias, fold_weight
from .frozen_bn import FrozenBatchNorm2d


def recomputable(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> bool:
    """Whether the recomputing path computes this pair's gradients: only the conv's own parameters
    may need them (a frozen BN's tensors never do; a BN someone made trainable keeps the plain
    differentiable fold), and the padding must be numeric (``convolution_backward`` takes no 'same')."""
    frozen = not any(t.requires_grad for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
    return frozen and not isinstance(conv.padding, str)


def recomputed_conv(x: Tensor, conv: nn.Conv2d, bn: FrozenBatchNorm2d, dtype: torch.dtype,
                    memory_format: torch.memory_format) -> Tensor:
    """``F.conv2d(x, folded weight, folded bias)`` whose backward recomputes the folded weight.

    The folded bias (C values) stays an ordinary differentiable expression: it is small, and a conv
    bias (when there is one) gets its gradient through it."""
    scale, bias = fold_scale_and_bias(conv, bn)
    geometry = (tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)
    return _RecomputedFoldConv.apply(x, conv.weight, scale, bias.to(dtype), geometry, dtype, memory_format)


class _RecomputedFoldConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, scale: Tensor, bias: Tensor,
                geometry: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], int], dtype: torch.dtype,
                memory_format: torch.memory_format) -> Tensor:
        folded = fold_weight(weight, scale, dtype, memory_format)
        stride, padding, dilation, groups = geometry
        out = F.conv2d(x, folded, bias, stride, padding, dilation, groups)
        # x is the previous layer's output, kept alive for its own backward anyway; the parameter
        # exists anyway: neither costs memory. The folded weight is dropped here.
        ctx.save_for_backward(x, weight, scale)
        ctx.geometry, ctx.dtype, ctx.memory_format = geometry, dtype, memory_format
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, weight, scale = ctx.saved_tensors
        folded = fold_weight(weight, scale, ctx.dtype, ctx.memory_format)
        stride, padding, dilation, groups = ctx.geometry
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        # The forward convolved x in the folded weight's dtype (under autocast conv_bn folds into the
        # autocast dtype, and autocast casts x to it): so does this.
        xin = x.to(folded.dtype)
        grad_x, grad_folded, grad_bias = torch.ops.aten.convolution_backward(
            grad.to(folded.dtype), xin, folded, [folded.shape[0]], list(stride), list(padding), list(dilation),
            False, [0] * len(stride), groups, [need_x, need_w, need_b])
        grad_weight = None
        if need_w:
            compute = scale.dtype
            grad_weight = (grad_folded.to(compute) * scale.reshape(-1, 1, 1, 1)).to(weight.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None, grad_bias, None, None, None
