"""The Triton sine-embedding kernel against the reference path.

Runs the kernel's own code: under TRITON_INTERPRET=1 on CPU (set by conftest when there is no
GPU) and natively on CUDA when present. Random cases take the random_seed fixture (fixed per
test, set through DETR_FAST_TEST_SEED: see tests/helpers.py) and name it on failure. Accuracy
contract: float32 within 2e-5 of the float32 reference, bf16/fp16 within one rounding step of the
reference cast to that dtype, masks bit-identical.
"""
import pytest
import torch

from detr_fast import NestedTensor, PositionEmbeddingSine, sine_position_embedding
from detr_fast.kernels.sine_embedding import sine_embedding_general, sine_embedding_rect
from detr_fast.sine.custom_op import sine_masks_pos
from detr_fast.sine.params import SineParams
from detr_fast.sine.reference import cached_frequencies, downsample_mask_reference, sine_embedding_reference
from tests.helpers import kernel_devices, random_sizes, rect_mask

DEVICES = kernel_devices()
pytestmark = pytest.mark.skipif(not DEVICES, reason="no device can run the Triton kernels here")

FP32_ATOL = 2e-5


def assert_close_to_reference(out, ref, dtype, context):
    """fp32: max abs error <= 2e-5; bf16/fp16: within one rounding step of ref cast to dtype."""
    assert out.dtype == dtype, context
    assert out.shape == ref.shape and out.stride() == ref.stride(), context
    if dtype == torch.float32:
        err = (out - ref).abs().max().item() if out.numel() else 0.0
        assert err <= FP32_ATOL, f"{context}: max abs error {err}"
    else:
        expected = ref.to(dtype).float()
        # One step of dtype at |ref| is at most eps * |ref| (plus the subnormal step near 0).
        step = torch.finfo(dtype).eps * ref.abs() + 2.0 ** -24
        diff = (out.float() - expected).abs()
        assert bool((diff <= step).all()), f"{context}: {int((diff > step).sum())} elements off by more than one step"


PARAMS = [
    # num_pos_feats, temperature, normalize, scale, offset, eps
    (8, 10000.0, True, 6.283185307179586, -0.5, 1e-6),   # Deformable-DETR
    (6, 10000.0, False, 1.0, 0.0, 1e-6),                  # DETR without normalization
    (130, 20.0, True, 1.0, 0.0, 1e-3),                    # more channels than one block: tiling
    (2, 1000.5, False, 1.0, 0.25, 1e-6),
    (12, 10000.0, True, 3.0, 0.7, 0.5),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"F{p[0]}-T{p[1]}-n{int(p[2])}-o{p[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rectangular_masks_match_reference(device, params, dtype, random_seed):
    gen = random_seed.generator()
    f, temperature, normalize, scale, offset, eps = params
    dim_t = cached_frequencies(f, temperature, torch.device(device))
    for _ in range(2):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        in_h, in_w = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        sizes = random_sizes(gen, batch, in_h, in_w)
        mask = rect_mask(sizes, in_h, in_w, device)
        out_h = max(1, (in_h + int(torch.randint(0, 8, (1,), generator=gen))) // 4)
        out_w = max(1, (in_w + int(torch.randint(0, 8, (1,), generator=gen))) // 4)
        for out_hw in ((in_h, in_w), (out_h, out_w)):
            context = f"{random_seed} in={in_h}x{in_w} out={out_hw} sizes={sizes} params={params} dtype={dtype}"
            level_mask, pos = sine_embedding_rect(torch.tensor(sizes, device=device), (in_h, in_w), out_hw, dim_t,
                                                  normalize, scale, offset, eps, dtype)
            ref_mask = downsample_mask_reference(mask, list(out_hw))
            assert torch.equal(level_mask, ref_mask), context
            ref = sine_embedding_reference(ref_mask, SineParams(*params))
            assert_close_to_reference(pos.permute(0, 3, 1, 2), ref, dtype, context)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", PARAMS[:3], ids=lambda p: f"F{p[0]}-n{int(p[2])}-o{p[4]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_arbitrary_masks_match_reference(device, params, dtype, random_seed):
    gen = random_seed.generator()
    f, temperature, normalize, scale, offset, eps = params
    dim_t = cached_frequencies(f, temperature, torch.device(device))
    for _ in range(2):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        h, w = (int(v) for v in torch.randint(1, 30, (2,), generator=gen))
        density = float(torch.rand(1, generator=gen))
        mask = (torch.rand((batch, h, w), generator=gen) < density).to(device)
        mask[:, :, 0] = True  # an all-padding column
        if h > 1:
            mask[0, 1] = True  # an all-padding row
        context = f"{random_seed} mask {batch}x{h}x{w} density={density:.2f} params={params}"
        pos = sine_embedding_general(mask, dim_t, normalize, scale, offset, eps, dtype)
        ref = sine_embedding_reference(mask, SineParams(*params))
        assert_close_to_reference(pos.permute(0, 3, 1, 2), ref, dtype, context)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_downsampled_masks_bit_identical_on_many_sizes(device, random_seed):
    """PyTorch's nearest rule with a float32 scale, including upsampling, x2 and equal sizes."""
    gen = random_seed.generator()
    dim_t = cached_frequencies(2, 10000.0, torch.device(device))
    in_sizes = [(1, 1), (1, 17), (17, 1), (7, 7), (37, 91), (100, 133), (83, 127), (5, 3)]
    for in_h, in_w in in_sizes:
        outs = {(in_h, in_w), (1, 1), (max(1, in_h // 3), max(1, in_w // 7)),
                (max(1, (in_h + 31) // 32), max(1, (in_w + 15) // 16))}
        # x2 (scale 0.5, exact at every size) everywhere but on the two large inputs in the
        # interpreter, where it took half of this test's time: 37x91 -> 74x182 already spans
        # several tiles in both directions.
        if device != "cpu" or in_h * in_w <= 64 * 64:
            outs.add((2 * in_h, 2 * in_w))
        outs.add(tuple(int(v) for v in torch.randint(1, 60, (2,), generator=gen)))
        sizes = random_sizes(gen, 3, in_h, in_w)
        mask = rect_mask(sizes, in_h, in_w, device)
        for out_hw in sorted(outs):
            level_mask, _ = sine_embedding_rect(torch.tensor(sizes, device=device), (in_h, in_w), out_hw, dim_t,
                                                True, 1.0, 0.0, 1e-6, torch.float32)
            assert torch.equal(level_mask, downsample_mask_reference(mask, list(out_hw))), \
                f"{random_seed} in={in_h}x{in_w} out={out_hw} sizes={sizes}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 1, 23), (3, 23, 1), (1, 1, 1333)], ids=str)
def test_edge_shapes_and_large_positions(device, shape):
    """1x1, 1xN, Nx1, and positions up to 1333 unnormalized (the sine of large arguments)."""
    batch, h, w = shape
    sizes = [(h, w)] + [(h // 2, w // 2)] * (batch - 1)
    mask = rect_mask(sizes, h, w, device)
    for normalize, offset in ((False, 0.0), (False, -0.5), (True, -0.5)):
        module = PositionEmbeddingSine(64, normalize=normalize, offset=offset, backend="triton")
        ref = module.reference(mask)
        nt_rect = NestedTensor(torch.zeros(batch, 3, h, w, device=device), mask, torch.tensor(sizes))
        assert_close_to_reference(module(nt_rect), ref, torch.float32, f"{shape} rect normalize={normalize}")
        nt_any = NestedTensor(torch.zeros(batch, 3, h, w, device=device), mask)
        assert_close_to_reference(module(nt_any), ref, torch.float32, f"{shape} general normalize={normalize}")


@pytest.mark.parametrize("device", DEVICES)
def test_levels_wider_than_one_extent_pass(device, random_seed):
    """Levels past 1024 columns count their valid extent in more than one pass; extents on both
    sides of the pass boundary, downsampled and not."""
    gen = random_seed.generator()
    in_w = 1500
    widths = [in_w, 1030, 1000] + [int(v) for v in torch.randint(0, in_w + 1, (2,), generator=gen)]
    sizes = [(1, w) for w in widths]
    mask = rect_mask(sizes, 1, in_w, device)
    dim_t = cached_frequencies(4, 10000.0, torch.device(device))
    for out_w in (in_w, 1100, 1025, 700):
        context = f"{random_seed} widths={widths} out_w={out_w}"
        level_mask, pos = sine_embedding_rect(torch.tensor(sizes, device=device), (1, in_w), (1, out_w), dim_t,
                                              True, 6.28, -0.5, 1e-6, torch.float32)
        ref_mask = downsample_mask_reference(mask, [1, out_w])
        assert torch.equal(level_mask, ref_mask), context
        ref = sine_embedding_reference(ref_mask, SineParams(4, 10000.0, True, 6.28, -0.5, 1e-6))
        assert_close_to_reference(pos.permute(0, 3, 1, 2), ref, torch.float32, context)


@pytest.mark.parametrize("device", DEVICES)
def test_module_paths_and_non_contiguous_mask(device, random_seed):
    gen = random_seed.generator()
    module = PositionEmbeddingSine(16, normalize=True, backend="triton")
    base = torch.rand((3, 19, 11), generator=gen) < 0.3
    mask = base.to(device).transpose(1, 2)  # non-contiguous 3 x 11 x 19
    assert not mask.is_contiguous()
    out = module(NestedTensor(torch.zeros(3, 1, 11, 19, device=device), mask))
    assert_close_to_reference(out, module.reference(mask.contiguous()), torch.float32, str(random_seed))
    # The functional API, with sizes and a low-precision output.
    sizes = [(11, 19), (4, 7), (0, 3)]
    rmask = rect_mask(sizes, 11, 19, device)
    out = sine_position_embedding(rmask, 16, normalize=True, image_sizes=torch.tensor(sizes), dtype=torch.float16,
                                  backend="triton")
    assert_close_to_reference(out, module.reference(rmask), torch.float16, "functional fp16")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_empty_levels(device):
    module = PositionEmbeddingSine(8, normalize=True, backend="triton")
    empty = torch.ones((0, 5, 7), dtype=torch.bool, device=device)
    out = module(NestedTensor(torch.zeros(0, 3, 5, 7, device=device), empty, torch.zeros((0, 2), dtype=torch.int64)))
    ref = module.reference(empty)
    assert out.shape == ref.shape == (0, 16, 5, 7) and out.stride() == ref.stride()
    mask = rect_mask([(3, 4)], 6, 6, device)
    level_mask, pos = sine_masks_pos(mask, torch.tensor([[3, 4]]), 0, 3, SineParams(8, 10000.0, True, 1.0, 0.0, 1e-6),
                                     torch.float32, True)
    assert level_mask.shape == (1, 0, 3) and pos.shape == (1, 16, 0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device):
    module = PositionEmbeddingSine(8, backend="triton")
    mask = torch.zeros((2, 4, 4), dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="bool"):
        module(NestedTensor(torch.zeros(2, 3, 4, 4, device=device), mask.float()))
    with pytest.raises(ValueError, match="3-D"):
        module(NestedTensor(torch.zeros(2, 3, 4, 4, device=device), mask[0]))
    with pytest.raises(ValueError, match="batch"):
        module(NestedTensor(torch.zeros(3, 3, 4, 4, device=device), mask))
    with pytest.raises(ValueError, match="image_sizes"):
        sine_position_embedding(mask, 8, image_sizes=torch.tensor([[5, 4], [4, 4]]), backend="triton")
    with pytest.raises(ValueError, match="image_sizes"):
        sine_position_embedding(mask, 8, image_sizes=torch.tensor([[4, 4]]), backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        sine_position_embedding(mask, 8, dtype=torch.float64, backend="triton")


def test_nearest_scale_is_pytorchs_float32_quotient(random_seed):
    # PyTorch's nearest rule uses float(in) / out in float32; the launcher computes it on the host.
    from detr_fast.kernels.sine_embedding import nearest_scale

    gen = random_seed.generator()
    pairs = [(800, 25), (1333, 42), (1066, 34), (3, 7), (1, 1), (16777215, 3), (16777216, 16777215)]
    pairs += [tuple(int(v) for v in torch.randint(1, 1 << 24, (2,), generator=gen)) for _ in range(2000)]
    pairs += [tuple(int(v) for v in torch.randint(1, 2000, (2,), generator=gen)) for _ in range(2000)]
    for in_size, out_size in pairs:
        want = (torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)).item()
        assert nearest_scale(in_size, out_size) == want, f"{random_seed} {in_size}/{out_size}"


def test_compile_time_constants_do_not_follow_every_size():
    # Each distinct constexpr value is a separate compiled kernel: a value that tracked the level's
    # exact size would recompile for every new input size (multi-scale training).
    from detr_fast.kernels.sine_embedding import extent_constants

    sizes = [(h, w) for h in range(1, 300, 7) for w in range(1, 1400, 13)]
    rect = {extent_constants(h, w) for h, w in sizes}
    assert all(block & (block - 1) == 0 and block * iters >= 1 for block, iters in rect)
    assert len(rect) <= 12, rect  # powers of two up to 1024, then 1024 x a couple of passes
    for h, w in sizes:
        block, iters = extent_constants(h, w)
        assert block * iters >= max(h, w) and (iters == 1 or block == 1024)


@pytest.mark.parametrize("device", DEVICES)
def test_gpu_tiles_match_reference(device, random_seed):
    """The block sizes the GPU runs (smaller tiles, several programs per level and channel
    chunks), executed here too: every tile boundary of both kernels against the reference."""
    gen = random_seed.generator()
    params = SineParams(80, 10000.0, True, 6.283185307179586, -0.5, 1e-6)  # 80 > 64: two channel chunks
    dim_t = cached_frequencies(params.num_pos_feats, params.temperature, torch.device(device))
    in_h, in_w = 37, 45
    sizes = random_sizes(gen, 2, in_h, in_w)
    mask = rect_mask(sizes, in_h, in_w, device)
    for out_hw in ((in_h, in_w), (19, 23)):  # 19 x 23: partial 8 x 16 tiles at both edges
        context = f"{random_seed} sizes={sizes} out={out_hw}"
        level_mask, pos = sine_embedding_rect(torch.tensor(sizes, device=device), (in_h, in_w), out_hw, dim_t,
                                              True, params.scale, params.offset, params.eps, torch.float32,
                                              gpu_tiles=True)
        ref_mask = downsample_mask_reference(mask, list(out_hw))
        assert torch.equal(level_mask, ref_mask), context
        ref = sine_embedding_reference(ref_mask, params)
        assert_close_to_reference(pos.permute(0, 3, 1, 2), ref, torch.float32, context)
        holes = ref_mask | (torch.rand(ref_mask.shape, generator=gen) < 0.2).to(device)
        pos = sine_embedding_general(holes, dim_t, True, params.scale, params.offset, params.eps, torch.float32,
                                     gpu_tiles=True)
        assert_close_to_reference(pos.permute(0, 3, 1, 2), sine_embedding_reference(holes, params), torch.float32,
                                  context + " general")
