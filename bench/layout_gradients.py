"""Training gradients against a float64 copy, by memory layout: upstream NCHW, upstream channels_last,
converted NCHW (detr_fast's training layout) and converted forced to channels_last. Norm-wise worst
over parameters ||g - g64|| / ||g64||; ResNet-50 Joiner, layers 2-4 trainable, two small images.
Shows whether an error is the fold's or the layout's (docs/training.md). From the repository root:

    python -m bench.layout_gradients [threads]
"""
import copy
import sys

import torch

import detr_fast
from detr_fast.fold import torchvision_blocks
from tests.upstream_reference import DEFORMABLE_LAYERS, upstream_joiner, upstream_pad


def _loss(out, pos):
    return sum(o.tensors.float().square().mean() + (o.tensors.float().mean(1, keepdim=True) * p.float()).mean()
               for o, p in zip(out, pos))


def main(threads: int = 0) -> None:
    if threads:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(3)
    images = [torch.randn(3, 96, 120, generator=gen), torch.randn(3, 80, 136, generator=gen)]

    def grads(model, pad, dtype=torch.float32):
        model.zero_grad(set_to_none=True)
        _loss(*model(pad([i.to(dtype) for i in images]))).backward()
        return {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}

    upstream = upstream_joiner("resnet50", DEFORMABLE_LAYERS, train_backbone=True, seed=0).train()
    want = grads(copy.deepcopy(upstream).double(), upstream_pad, torch.float64)

    def error(got):
        return max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    converted = detr_fast.convert(copy.deepcopy(upstream)).train()
    rows = [("upstream NCHW", error(grads(upstream, upstream_pad))),
            ("upstream channels_last", error(grads(copy.deepcopy(upstream).to(memory_format=torch.channels_last),
                                                   upstream_pad))),
            ("converted NCHW (training layout)", error(grads(converted, detr_fast.nested_tensor_from_tensor_list)))]
    trains = torchvision_blocks._trains
    torchvision_blocks._trains = lambda module: False  # the inference layout, channels_last, in training
    try:
        rows.append(("converted channels_last", error(grads(converted, detr_fast.nested_tensor_from_tensor_list))))
    finally:
        torchvision_blocks._trains = trains
    for name, value in rows:
        print(f"{name:34s} norm-wise worst relative gradient error vs float64: {value:.2e}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
