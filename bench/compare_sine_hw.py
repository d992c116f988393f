"""detr_fast's PositionEmbeddingSineHW against DINO's (tests/dino_reference.py's stand-in) on CPU,
interleaved (issue 20's target: >= 3x on the fallback at DETR's sizes).

Two images of 800x1066 and 750x1333 padded to 800x1333, F = 128 (DINO's hidden 256), temperatures
20/20 (DINO's configs) and 20/10000; the level masks are the reference's nearest-downsampled ones at
stride 32 (25x42, DETR's one level) and at strides 8/16/32 (100x167, 50x84, 25x42: Deformable-DETR,
DINO), one embedding call per level as the Joiner makes. detr_fast's side is given each level as
detr_fast's backbone hands it over (mask + the level's image sizes), and as a bare mask (the sizes
then found on the mask). 2 threads (or the second argument), no_grad; pairs alternate their order.
Run from the repository root:

    python -m bench.compare_sine_hw [pairs] [threads]
"""
import sys

import torch

from bench.ab import alternate, summary
from detr_fast import NestedTensor, PositionEmbeddingSineHW, nested_tensor_from_tensor_list
from detr_fast.sine.reference import downsample_mask_reference
from detr_fast.sine.separable import level_sizes
from tests.dino_reference import PositionEmbeddingSineHW as DinoPositionEmbeddingSineHW

IMAGE_SIZES = [(800, 1066), (750, 1333)]
STRIDE_SETS = {"stride 32": [32], "strides 8/16/32": [8, 16, 32]}
TEMPERATURES = [(20, 20), (20, 10000)]


def levels(strides):
    """Per level: (NestedTensor with the level's sizes, NestedTensor with the mask alone)."""
    nt = nested_tensor_from_tensor_list([torch.zeros(1, h, w) for h, w in IMAGE_SIZES])
    full_hw = tuple(nt.mask.shape[1:])
    out = []
    for s in strides:
        hw = (-(-full_hw[0] // s), -(-full_hw[1] // s))
        mask = downsample_mask_reference(nt.mask, list(hw))
        features = torch.zeros(len(IMAGE_SIZES), 1, *hw)
        sizes = level_sizes(nt.image_sizes, full_hw, hw)
        out.append((NestedTensor(features, mask, sizes), NestedTensor(features, mask)))
    return out


def main(pairs: int = 30, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    for (th, tw) in TEMPERATURES:
        dino = DinoPositionEmbeddingSineHW(128, th, tw, normalize=True)
        ours = PositionEmbeddingSineHW(128, th, tw, normalize=True)
        for name, strides in STRIDE_SETS.items():
            lv = levels(strides)
            for j, how in enumerate(("sizes", "mask only")):
                sides = {"dino": lambda: [dino(x[j]) for x in lv],
                         "detr_fast": lambda: [ours(x[j]) for x in lv]}
                for x in lv:  # same values before timing (exact on the CPU fallback)
                    assert torch.equal(ours(x[j]), dino(x[j]))
                with torch.no_grad():
                    times = alternate(sides, pairs)
                print(f"T={th}/{tw} {name} ({how}): {summary(times, digits=2)}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
