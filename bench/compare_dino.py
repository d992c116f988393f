"""DINO-4scale's Joiner converted by detr_fast against the DINO-style one, interleaved (issue 20's case).

The DINO side is tests/dino_reference.py's stand-in of IDEA-Research's code (ResNet-50 with
x * scale + bias frozen BN, return_interm_indices [1, 2, 3] = layers 2-4, PositionEmbeddingSineHW
with temperatures 20/20 on the reference path, the Joiner's cast of pos to the feature dtype), the
detr_fast side the same weights after detr_fast.convert(). Two images padded to 320x480, one on each
axis (320x440 and 290x480), 2 threads, fp32, no_grad; pairs alternate their order. Run from the
repository root:

    python -m bench.compare_dino [pairs]
"""
import copy
import sys

import torch

import detr_fast
from bench.ab import alternate, summary
from tests.dino_reference import dino_joiner, dino_pad

IMAGE_SIZES = ((320, 440), (290, 480))  # padded to 320 x 480: the first on the right, the second at the bottom


def main(pairs: int = 12) -> None:
    torch.set_num_threads(2)
    dino = dino_joiner("resnet50", (1, 2, 3), temperatures=(20, 20), hidden_dim=256, seed=0).eval()
    converted = detr_fast.convert(copy.deepcopy(dino))
    print(detr_fast.conversion_report(converted))
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=gen) for h, w in IMAGE_SIZES]
    sides = {"DINO-style": lambda: dino(dino_pad(images)),
             "detr_fast": lambda: converted(detr_fast.nested_tensor_from_tensor_list(images))}
    with torch.no_grad():
        times = alternate(sides, pairs)
    print(f"dino-4scale: {summary(times)}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
