"""The converted Joiner against the facebookresearch-style one, interleaved (issue 12's case).

The upstream side is tests/upstream_reference.py's stand-in (x * scale + bias frozen BN, upstream's
NestedTensor and padding, Deformable-DETR's sine with the -0.5 offset), the detr_fast side the same
weights after detr_fast.convert(). Two images of 400x533 and 375x666, 2 threads, fp32, no_grad;
pairs alternate their order. Run from the repository root:

    python -m bench.compare_upstream [pairs]
"""
import copy
import sys

import torch

import detr_fast
from bench.ab import alternate, summary
from tests.upstream_reference import DEFORMABLE_LAYERS, DETR_DETECTION_LAYERS, upstream_joiner, upstream_pad


def main(pairs: int = 12) -> None:
    torch.set_num_threads(2)
    for name, layers in (("layers2-4", DEFORMABLE_LAYERS), ("layer4", DETR_DETECTION_LAYERS)):
        upstream = upstream_joiner("resnet50", layers, seed=0).eval()
        converted = detr_fast.convert(copy.deepcopy(upstream))
        gen = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 400, 533, generator=gen), torch.randn(3, 375, 666, generator=gen)]
        sides = {"upstream": lambda: upstream(upstream_pad(images)),
                 "detr_fast": lambda: converted(detr_fast.nested_tensor_from_tensor_list(images))}
        with torch.no_grad():
            times = alternate(sides, pairs)
        print(f"{name}: {summary(times)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
