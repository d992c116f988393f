"""HGNetV2's large concatenations convolved piece by piece, against concatenated (an A/B on one model).

One converted D-FINE (default config, the L layout's HGNetV2) runs its backbone stage,
model.model.backbone(pixel_values, pixel_mask), at 640x640, alternating between
detr_fast.fold.fused_conv.FRESH_PAGES_BYTES at its value (concatenations of 32 MiB or more convolved
piece by piece) and at "never" (every concatenation made, as transformers does). The same model and
process on both sides: two models in one process measured a difference that the A/B on one model
did not confirm. 2 threads, fp32, no_grad; pairs alternate their order. Needs transformers. Run
from the repository root:

    python -m bench.compare_pieces [pairs] [batches, e.g. 1,2]
"""
import functools
import statistics
import sys
from typing import Optional

import torch
from torch import nn

import detr_fast
from bench.ab import alternate, speedup
from detr_fast.fold import fused_conv
from detr_fast.measure import model_zoo

NEVER = 1 << 62


def main(pairs: int = 20, batches=(1, 2), model: Optional[nn.Module] = None, size: int = 640) -> None:
    """``model``: a converted D-FINE (default: the default config's); ``size``: the images' side."""
    torch.set_num_threads(2)
    model = model if model is not None else detr_fast.convert(model_zoo.build("dfine"))
    piecewise_from = fused_conv.FRESH_PAGES_BYTES
    try:
        for batch in batches:
            gen = torch.Generator().manual_seed(batch)
            pixel_values = torch.randn(batch, 3, size, size, generator=gen)
            pixel_mask = torch.ones(batch, size, size, dtype=torch.long)
            thresholds = {"concatenated": NEVER, "piecewise": piecewise_from}

            def run_with(threshold: int) -> None:
                fused_conv.FRESH_PAGES_BYTES = threshold
                model.model.backbone(pixel_values, pixel_mask)
            with torch.no_grad():  # the warm-up also packs both sides' weights
                times = alternate({side: functools.partial(run_with, t) for side, t in thresholds.items()}, pairs)
            median_ms = {side: statistics.median(t) * 1e3 for side, t in times.items()}
            print(f"batch {batch}: concatenated {median_ms['concatenated']:.0f} ms, piecewise "
                  f"{median_ms['piecewise']:.0f} ms, {speedup(times['concatenated'], times['piecewise'], 3)}")
    finally:
        fused_conv.FRESH_PAGES_BYTES = piecewise_from


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20,
         tuple(int(b) for b in sys.argv[2].split(",")) if len(sys.argv) > 2 else (1, 2))
