"""Training step and bf16 autocast inference: the converted Joiner against the upstream-style one,
interleaved (issue 21). Deformable-DETR's Joiner (ResNet-50, layers 2-4), two images of 400x533 and
375x666 times `scale`, 2 threads; training = layers 2-4 trainable, frozen BN, train mode, forward +
backward of a loss over every level's features and pos; bf16 = torch.autocast("cpu", bfloat16),
no_grad (skipped on a CPU without bf16 hardware). Peak memory of one step from the profiler's
memory events. Run from the repository root:

    python -m bench.compare_train [pairs] [scale]
"""
import copy
import json
import sys

import torch

import detr_fast
from bench.ab import alternate, summary
from detr_fast.measure.machine import cpu_info
from detr_fast.measure.training import autocast_unavailable_reason, cpu_peak_memory
from tests.upstream_reference import DEFORMABLE_LAYERS, upstream_joiner, upstream_pad


def _loss(out, pos):
    return sum(o.tensors.float().square().mean() + (o.tensors.float().mean(1, keepdim=True) * p.float()).mean()
               for o, p in zip(out, pos))


def main(pairs: int = 6, scale: float = 1.0) -> None:
    torch.set_num_threads(2)
    print(json.dumps({"cpu": cpu_info(), "torch": torch.__version__, "pairs": pairs, "scale": scale}))
    gen = torch.Generator().manual_seed(0)
    images = [torch.randn(3, round(400 * scale), round(533 * scale), generator=gen),
              torch.randn(3, round(375 * scale), round(666 * scale), generator=gen)]
    upstream = upstream_joiner("resnet50", DEFORMABLE_LAYERS, train_backbone=True, seed=0).train()
    converted = detr_fast.convert(copy.deepcopy(upstream)).train()
    pad = detr_fast.nested_tensor_from_tensor_list

    def step(model, padder):
        model.zero_grad(set_to_none=True)
        _loss(*model(padder(images))).backward()
    sides = {"upstream": lambda: step(upstream, upstream_pad), "detr_fast": lambda: step(converted, pad)}
    times = alternate(sides, pairs)
    mem = {k: cpu_peak_memory(f)["peak_bytes"] / 2**20 for k, f in sides.items()}
    print(f"train fp32: {summary(times)}; "
          f"peak MiB upstream {mem['upstream']:.0f}, detr_fast {mem['detr_fast']:.0f}", flush=True)
    reason = autocast_unavailable_reason(torch.device("cpu"), torch.bfloat16)
    if reason:
        print(f"bf16 autocast inference: skipped: {reason}")
        return
    upstream.eval()
    converted.eval()

    def infer(model, padder):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(padder(images))
    sides = {"upstream": lambda: infer(upstream, upstream_pad), "detr_fast": lambda: infer(converted, pad)}
    times = alternate(sides, pairs)
    print(f"inference bf16 autocast: {summary(times)}",
          flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 6, float(sys.argv[2]) if len(sys.argv) > 2 else 1.0)
