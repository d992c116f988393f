"""Where a converted transformers detector's backbone stage spends its time, op by op (torch.profiler).

Builds the model zoo's ``model`` (default config, random weights; needs transformers), converts it
and profiles ``reps`` calls of its backbone stage, model.model.backbone(pixel_values, pixel_mask),
after two warm-up calls: self CPU time per op per call, the convolutions' share, and each
convolution shape's GFLOP/s (nan where the output size is not known: a piece's weight slice). One
image of ``size`` x ``size``, 2 threads, fp32, no_grad. Run from the repository root:

    python -m bench.op_breakdown [model] [size] [reps]      # e.g. dfine 640 3
"""
import sys
from typing import List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

import detr_fast
from detr_fast.measure import model_zoo

# oneDNN's convolutions: (input, weight[, ...]) and the in-place one (output, input, weight, ...).
CONV_OPS = {"mkldnn::_convolution_pointwise": (0, 1), "mkldnn::_convolution_pointwise_": (1, 2)}


def _conv_flops(input_shape: List[int], weight_shape: List[int], output_hw: Tuple[int, int]) -> float:
    batch = input_shape[0]
    out_channels, in_per_group, kh, kw = weight_shape
    return 2.0 * batch * out_channels * in_per_group * kh * kw * output_hw[0] * output_hw[1]


def _output_hw(x_shape: List[int], w_shape: List[int], geometries: set) -> Optional[Tuple[int, int]]:
    """The output size, when the weight's shape has one geometry in the model (else None: a
    piece's slice of a weight, or shapes shared by convolutions of different strides)."""
    if len(geometries) != 1:
        return None
    padding, stride, dilation = next(iter(geometries))
    return tuple((x_shape[2 + i] + 2 * padding[i] - dilation[i] * (w_shape[2 + i] - 1) - 1) // stride[i] + 1
                 for i in range(2))


def main(model_name: str = "dfine", size: int = 640, reps: int = 3) -> None:
    torch.set_num_threads(2)
    model = detr_fast.convert(model_zoo.build(model_name))
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixel_mask = torch.ones(1, size, size, dtype=torch.long)
    geometry = {}  # weight shape -> (padding, stride, dilation) of the backbone's convolutions with it
    for m in model.model.backbone.modules():
        if isinstance(m, torch.nn.Conv2d):
            geometry.setdefault(tuple(m.weight.shape), set()).add((m.padding, m.stride, m.dilation))
    with torch.no_grad():
        for _ in range(2):
            model.model.backbone(pixel_values, pixel_mask)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(reps):
                model.model.backbone(pixel_values, pixel_mask)
    events = prof.key_averages(group_by_input_shape=True)
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / reps
    by_op = {}
    for e in events:
        by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / reps
    print(f"{model_name}, backbone stage, 1x3x{size}x{size}, {reps} calls profiled: "
          f"{total_ms:.1f} ms self CPU per call")
    for key, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {key:45s} {ms:8.2f} ms  {100 * ms / total_ms:5.1f}%")
    print("convolutions by shape (input, weight): ms per call, calls, GFLOP/s")
    rows = []
    for e in events:
        if e.key not in CONV_OPS:
            continue
        x_at, w_at = CONV_OPS[e.key]
        x_shape, w_shape = e.input_shapes[x_at], e.input_shapes[w_at]
        if x_at:  # in place: the output is its first argument
            hw = tuple(e.input_shapes[0][-2:])
        else:
            hw = _output_hw(x_shape, w_shape, geometry.get(tuple(w_shape), set()))
        ms = e.self_cpu_time_total / 1e3 / reps
        calls = e.count // reps
        gflops = _conv_flops(x_shape, w_shape, hw) * calls / (ms * 1e6) if hw else float("nan")
        rows.append((ms, calls, x_shape, w_shape, gflops))
    for ms, calls, x_shape, w_shape, gflops in sorted(rows, key=lambda r: -r[0]):
        print(f"  {str(x_shape):22s} {str(w_shape):22s} {ms:7.2f} ms  x{calls:<3d} {gflops:6.0f}")
    conv_ms = sum(by_op.get(op, 0.0) for op in CONV_OPS)
    print(f"convolutions: {conv_ms:.1f} ms per call, {100 * conv_ms / total_ms:.1f}% of the backbone stage")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dfine", int(sys.argv[2]) if len(sys.argv) > 2 else 640,
         int(sys.argv[3]) if len(sys.argv) > 3 else 3)
