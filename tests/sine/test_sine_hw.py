"""One sine temperature per axis (DINO's PositionEmbeddingSineHW): SineParams.temperature_w, the
reference, the separable fallback, both Triton kernels (interpreted on CPU), the custom op, the
module, sine_position_embedding and the Joiner.

Oracles: hand-computed values (math.sin/math.cos), and tests/dino_reference.py's float64
element-by-element formula and float32 stand-in of DINO's module (no detr_fast code in either).
"""
import math

import pytest
import torch

import detr_fast
from detr_fast import (
    NestedTensor,
    PositionEmbeddingSine,
    PositionEmbeddingSineHW,
    SineParams,
    nested_tensor_from_tensor_list,
    sine_position_embedding,
)
from detr_fast.sine import position_encoding
from detr_fast.sine.custom_op import sine_masks_pos
from detr_fast.sine.reference import (
    cached_frequencies,
    cached_frequency_pair,
    downsample_mask_reference,
    sine_embedding_formula,
    sine_embedding_reference,
)
from detr_fast.sine.separable import sine_embedding_separable
from tests.dino_reference import PositionEmbeddingSineHW as DinoPositionEmbeddingSineHW
from tests.dino_reference import dino_sine_hw_float64
from tests.helpers import kernel_devices, random_sizes, rect_mask, tiny_joiner

DEVICES = kernel_devices()
needs_kernels = pytest.mark.skipif(not DEVICES, reason="no device can run the Triton kernels here")

FP32_ATOL = 2e-5  # the kernels' contract against the float32 reference (tests/sine/test_sine_kernel.py)

# (num_pos_feats, temperature H, temperature W, normalize, scale)
HW_PARAMS = [
    (8, 20.0, 10000.0, False, None),
    (8, 20.0, 20.0, True, None),        # DINO's configs: equal temperatures
    (6, 10000.0, 20.0, True, 1.0),
    (130, 7.5, 300.0, True, None),      # more channels than one kernel block
]


def hw_params(f, th, tw, normalize, scale):
    return SineParams.from_args(f, th, normalize, scale, temperature_w=tw)


def assert_close(out, ref, atol, context=""):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    assert tuple(out.shape) == tuple(ref.shape), context
    err = (out.double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= atol, f"{context}: max abs error {err}"


# ---------------------------------------------------------------- SineParams


def test_sine_params_temperature_w_contract():
    p = SineParams(8, 20.0, temperature_w=10000.0)
    assert p.temperature_w == 10000.0 and p.temperatures == (20.0, 10000.0)
    assert [f.name for f in p.__dataclass_fields__.values()][-2:] == ["frequencies", "temperature_w"]
    assert SineParams(8, 20.0).temperatures == (20.0, 20.0)
    # Equal temperatures are the single-temperature params: same fields, equality and hash.
    same = SineParams(8, 20.0, temperature_w=20.0)
    assert same.temperature_w is None and same == SineParams(8, 20.0) and hash(same) == hash(SineParams(8, 20.0))
    assert SineParams.from_args(8, 20, temperature_w=20) == SineParams.from_args(8, 20)
    q = SineParams.from_args(8, 20, True, 1.0, temperature_w=300)
    assert q.temperature_w == 300.0 and isinstance(q.temperature_w, float) and q.scale == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature_w"):
            SineParams(8, 20.0, temperature_w=bad)
        with pytest.raises(ValueError, match="temperature_w"):
            SineParams.from_args(8, 20.0, temperature_w=bad)


# ---------------------------------------------------------------- (a) hand-computed values


def test_reference_hand_computed_unequal_temperatures():
    # One image valid on its top-left 1 x 2 in a 2 x 3 mask. F = 4: y frequencies 1, 1, sqrt(20),
    # sqrt(20) (temperature 20), x frequencies 1, 1, 100, 100 (temperature 10000).
    mask = torch.tensor([[[False, False, True], [True, True, True]]])
    y_pos = [[1, 1, 0], [1, 1, 0]]  # valid pixels up to this row in the column
    x_pos = [[1, 2, 2], [0, 0, 0]]  # valid pixels up to this column in the row
    y_total = [1, 1, 0]             # per column
    x_total = [2, 0]                # per row
    for normalize, scale in ((False, None), (True, 1.5)):
        expected = torch.zeros(1, 8, 2, 3, dtype=torch.float64)
        for i in range(2):
            for j in range(3):
                py, px = float(y_pos[i][j]), float(x_pos[i][j])
                if normalize:
                    py, px = py / (y_total[j] + 1e-6) * scale, px / (x_total[i] + 1e-6) * scale
                expected[0, :, i, j] = torch.tensor([
                    math.sin(py), math.cos(py), math.sin(py / math.sqrt(20)), math.cos(py / math.sqrt(20)),
                    math.sin(px), math.cos(px), math.sin(px / 100), math.cos(px / 100)])
        params = SineParams.from_args(4, 20, normalize, scale, temperature_w=10000)
        out = sine_embedding_reference(mask, params)
        assert out.dtype == torch.float32 and out.shape == (1, 8, 2, 3)
        assert_close(out, expected, 1e-6, f"normalize={normalize}")
        # Swapping the temperatures changes the result (each half really uses its own).
        swapped = sine_embedding_reference(mask, SineParams.from_args(4, 10000, normalize, scale, temperature_w=20))
        assert not torch.allclose(out, swapped)


# ---------------------------------------------------------------- (b) the reference against float64 DINO


@pytest.mark.parametrize("normalize,scale", [(False, None), (True, None), (True, 3.0)])
def test_reference_matches_float64_dino_formula(normalize, scale, random_seed):
    gen = random_seed.generator()
    f, th, tw = 6, 20.0, 10000.0
    masks = [
        rect_mask([(5, 7), (3, 4), (0, 2)], 5, 7),  # padding on both axes, odd sizes, an empty image
        rect_mask([(1, 1)], 1, 1),                  # a 1x1 level
        torch.rand((2, 6, 9), generator=gen) < 0.3,  # arbitrary masks
    ]
    for mask in masks:
        ref64 = dino_sine_hw_float64(mask, f, th, tw, normalize, scale)
        out = sine_embedding_reference(mask, SineParams.from_args(f, th, normalize, scale, temperature_w=tw))
        assert_close(out, ref64, 2e-6, f"{random_seed} mask {tuple(mask.shape)}")
        # The same in float64, and DINO's own float32 code.
        out64 = sine_embedding_reference(mask, SineParams.from_args(f, th, normalize, scale, temperature_w=tw),
                                         dtype=torch.float64)
        assert_close(out64, ref64, 1e-12, f"{random_seed} float64 mask {tuple(mask.shape)}")
        dino = DinoPositionEmbeddingSineHW(f, th, tw, normalize, scale)(NestedTensor(torch.zeros(1), mask))
        assert torch.equal(out, dino)


# ---------------------------------------------------------------- (c) separable fallback and kernels


@pytest.mark.parametrize("params", HW_PARAMS, ids=lambda p: f"F{p[0]}-H{p[1]}-W{p[2]}-n{int(p[3])}")
def test_separable_matches_reference_bit_for_bit(params, random_seed):
    gen = random_seed.generator()
    sine = hw_params(*params)
    for _ in range(3):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        h, w = (int(v) for v in torch.randint(1, 25, (2,), generator=gen))
        sizes = random_sizes(gen, batch, h, w)
        ref = sine_embedding_reference(rect_mask(sizes, h, w), sine)
        out = sine_embedding_separable(torch.tensor(sizes), h, w, sine)
        assert out.shape == ref.shape and out.stride() == ref.stride()
        assert torch.equal(out, ref), f"{random_seed} sizes={sizes} {h}x{w}"


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", HW_PARAMS[:1] + HW_PARAMS[2:], ids=lambda p: f"F{p[0]}-n{int(p[3])}")
def test_kernels_match_reference_unequal_temperatures(device, params, random_seed):
    from detr_fast.kernels.sine_embedding import sine_embedding_general, sine_embedding_rect

    gen = random_seed.generator()
    sine = hw_params(*params)
    dim_t, dim_t_x = cached_frequency_pair(sine.num_pos_feats, *sine.temperatures, torch.device(device))
    batch = int(torch.randint(1, 4, (1,), generator=gen))
    in_h, in_w = (int(v) for v in torch.randint(1, 30, (2,), generator=gen))
    sizes = random_sizes(gen, batch, in_h, in_w)
    mask = rect_mask(sizes, in_h, in_w, device)
    out_hw = (max(1, (in_h + 3) // 4), max(1, (in_w + 3) // 4))
    context = f"{random_seed} in={in_h}x{in_w} out={out_hw} sizes={sizes} params={params}"
    # The rectangle kernel (sizes only, the mask downsampled in the same launch).
    level_mask, pos = sine_embedding_rect(torch.tensor(sizes, device=device), (in_h, in_w), out_hw, dim_t,
                                          sine.normalize, sine.scale, sine.offset, sine.eps, torch.float32,
                                          dim_t_x=dim_t_x)
    ref_mask = downsample_mask_reference(mask, list(out_hw))
    assert torch.equal(level_mask, ref_mask), context
    assert_close(pos.permute(0, 3, 1, 2), sine_embedding_reference(ref_mask, sine), FP32_ATOL, context)
    # The general kernel on an arbitrary mask.
    holes = (torch.rand((batch, in_h, in_w), generator=gen) < 0.3).to(device)
    pos = sine_embedding_general(holes, dim_t, sine.normalize, sine.scale, sine.offset, sine.eps, torch.float32,
                                 dim_t_x=dim_t_x)
    assert_close(pos.permute(0, 3, 1, 2), sine_embedding_reference(holes, sine), FP32_ATOL, context + " holes")
    # And through the custom op's wrapper (both kernels), as the module calls it.
    for image_sizes in (torch.tensor(sizes), None):
        m, p = sine_masks_pos(mask, image_sizes, out_hw[0], out_hw[1], sine, torch.float32, True)
        assert torch.equal(m, ref_mask), context
        assert_close(p, sine_embedding_reference(ref_mask, sine), FP32_ATOL, context + f" op sizes={image_sizes}")


@needs_kernels
def test_kernels_reject_mismatched_x_table():
    from detr_fast.kernels.sine_embedding import sine_embedding_general

    dim_t = cached_frequencies(4, 20.0, torch.device(DEVICES[0]))
    with pytest.raises(ValueError, match="dim_t_x"):
        sine_embedding_general(torch.zeros(1, 2, 2, dtype=torch.bool, device=DEVICES[0]), dim_t, False, 1.0, 0.0,
                               1e-6, torch.float32, dim_t_x=dim_t[:2])


# ---------------------------------------------------------------- (d) the custom op


@needs_kernels
def test_custom_op_opcheck_unequal_temperatures():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs a newer torch")
    device = DEVICES[0]
    nt = nested_tensor_from_tensor_list([torch.randn(3, 13, 9, device=device), torch.randn(3, 8, 15, device=device)])
    full_h, full_w = int(nt.mask.shape[1]), int(nt.mask.shape[2])
    for sizes in (nt.image_sizes, None):
        for height, width, need_mask in ((4, 5, True), (full_h, full_w, False)):
            args = (nt.mask, sizes, height, width, 4, 20.0, True, 6.28, 0.0, 1e-6, "detr", torch.float32,
                    need_mask, 10000.0)
            opcheck(torch.ops.detr_fast.sine_masks_pos.default, args,
                    test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
            _, pos = torch.ops.detr_fast.sine_masks_pos(*args)
            level_mask = downsample_mask_reference(nt.mask, [height, width])
            expected = dino_sine_hw_float64(level_mask, 4, 20.0, 10000.0, True, 6.28)
            assert_close(pos.permute(0, 3, 1, 2), expected, FP32_ATOL, f"{height}x{width} sizes={sizes}")


# ---------------------------------------------------------------- (e) equal temperatures unchanged


@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if DEVICES else []))
def test_equal_temperatures_bit_identical(backend, random_seed):
    gen = random_seed.generator()
    device = DEVICES[0] if backend == "triton" else "cpu"
    sizes = random_sizes(gen, 3, 11, 14)
    mask = rect_mask(sizes, 11, 14, device)
    for t in (20.0, 10000.0):
        single = SineParams.from_args(8, t, True)
        for nt in (NestedTensor(torch.zeros(3, 1, 11, 14, device=device), mask, torch.tensor(sizes)),
                   NestedTensor(torch.zeros(3, 1, 11, 14, device=device), mask)):
            before = PositionEmbeddingSine(8, t, True, backend=backend)(nt)
            assert torch.equal(PositionEmbeddingSineHW(8, t, t, True, backend=backend)(nt), before)
        assert torch.equal(sine_position_embedding(mask, 8, t, True, temperature_w=t, backend=backend),
                           sine_position_embedding(mask, 8, t, True, backend=backend))
        assert torch.equal(sine_embedding_formula(mask, 8, t, True, single.scale, 0.0, 1e-6, temperature_w=t),
                           sine_embedding_formula(mask, 8, t, True, single.scale, 0.0, 1e-6))
        assert torch.equal(sine_embedding_separable(torch.tensor(sizes), 11, 14, single, torch.device(device)),
                           sine_embedding_separable(torch.tensor(sizes), 11, 14, SineParams.from_args(
                               8, t, True, temperature_w=t), torch.device(device)))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_separate_equal_table_bit_identical(device, random_seed):
    """A separate x table with the same values gives the same bits as the one table passed twice."""
    from detr_fast.kernels.sine_embedding import sine_embedding_general, sine_embedding_rect

    gen = random_seed.generator()
    dim_t = cached_frequencies(8, 10000.0, torch.device(device))
    sizes = random_sizes(gen, 2, 9, 13)
    args = (True, 2 * math.pi, -0.5, 1e-6, torch.float32)
    rect = [sine_embedding_rect(torch.tensor(sizes, device=device), (9, 13), (3, 5), dim_t, *args, dim_t_x=x)
            for x in (None, dim_t.clone())]
    assert torch.equal(rect[0][0], rect[1][0]) and torch.equal(rect[0][1], rect[1][1])
    mask = rect_mask(sizes, 9, 13, device)
    general = [sine_embedding_general(mask, dim_t, *args, dim_t_x=x) for x in (None, dim_t.clone())]
    assert torch.equal(general[0], general[1])


# ---------------------------------------------------------------- the module and the function


def test_module_matches_dino_constructor_and_state_dict():
    ours, dino = PositionEmbeddingSineHW(128, 20, 20, normalize=True), DinoPositionEmbeddingSineHW(128, 20, 20, True)
    for name in ("num_pos_feats", "temperatureH", "temperatureW", "normalize", "scale"):
        assert getattr(ours, name) == getattr(dino, name), name
    assert list(ours.parameters()) == [] and list(ours.buffers()) == [] and ours.state_dict() == {}
    ours.load_state_dict(dino.state_dict(), strict=True)
    dino.load_state_dict(ours.state_dict(), strict=True)
    defaults = PositionEmbeddingSineHW()
    assert (defaults.num_pos_feats, defaults.temperatureH, defaults.temperatureW, defaults.normalize,
            defaults.scale) == (64, 10000, 10000, False, 2 * math.pi)
    assert isinstance(ours, PositionEmbeddingSine) and detr_fast.PositionEmbeddingSineHW is PositionEmbeddingSineHW
    assert "PositionEmbeddingSineHW" in detr_fast.__all__ and "PositionEmbeddingSineHW" in detr_fast.sine.__all__
    assert "temperatureH=20" in repr(ours) and "temperatureW=20" in repr(ours)


def test_module_and_function_reject_bad_arguments():
    with pytest.raises(ValueError, match="normalize should be True if scale is passed"):
        PositionEmbeddingSineHW(8, scale=1.0)
    for kwargs, name in (({"temperatureH": 0}, "temperatureH"), ({"temperatureW": -2.0}, "temperatureW"),
                         ({"num_pos_feats": 7}, "num_pos_feats")):
        with pytest.raises(ValueError, match=name):
            PositionEmbeddingSineHW(**kwargs)
    mask = torch.zeros(1, 2, 2, dtype=torch.bool)
    for kwargs, name in (({"temperature": 0}, "temperature"), ({"temperature_w": 0.0}, "temperature_w"),
                         ({"num_pos_feats": 5}, "num_pos_feats")):
        with pytest.raises(ValueError, match=name):
            sine_position_embedding(mask, **kwargs)


@pytest.mark.parametrize("backend", ["torch", "auto"] + (["triton"] if DEVICES else []))
def test_module_and_function_match_dino(backend, random_seed):
    gen = random_seed.generator()
    device = DEVICES[0] if backend == "triton" else "cpu"
    images = [torch.randn(3, int(h), int(w), generator=gen).to(device)
              for h, w in torch.randint(1, 20, (3, 2), generator=gen)]
    nt = nested_tensor_from_tensor_list(images)
    atol = FP32_ATOL if backend == "triton" else 0.0
    for f, th, tw, normalize, scale in HW_PARAMS[:3]:
        dino = DinoPositionEmbeddingSineHW(f, th, tw, normalize, scale)(nt)
        for source in (nt, NestedTensor(nt.tensors, nt.mask)):  # with and without the image sizes
            out = PositionEmbeddingSineHW(f, th, tw, normalize, scale, backend=backend)(source)
            assert out.dtype == torch.float32 and out.shape == dino.shape and out.stride() == dino.stride()
            assert_close(out, dino, atol, f"{random_seed} {backend} {(f, th, tw)}")
        fn = sine_position_embedding(nt.mask, f, th, normalize, scale, temperature_w=tw, backend=backend)
        assert_close(fn, dino, atol, f"{random_seed} function {backend} {(f, th, tw)}")
        ref64 = dino_sine_hw_float64(nt.mask, f, th, tw, normalize, scale)
        assert_close(out, ref64, 2e-5, f"{random_seed} float64 {backend} {(f, th, tw)}")


def test_module_torchscript():
    nt = nested_tensor_from_tensor_list([torch.randn(3, 7, 10), torch.randn(3, 9, 5)])
    module = PositionEmbeddingSineHW(8, 20, 10000, normalize=True)
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(nt), DinoPositionEmbeddingSineHW(8, 20, 10000, True)(nt))
    assert torch.equal(scripted(nt), module(nt))


def test_reassigned_attributes_take_effect():
    nt = nested_tensor_from_tensor_list([torch.randn(3, 7, 10), torch.randn(3, 9, 5)])
    module = PositionEmbeddingSineHW(8, 20, 20)
    module.temperatureW = 10000.0
    assert torch.equal(module(nt), DinoPositionEmbeddingSineHW(8, 20, 10000)(nt))


# ---------------------------------------------------------------- the Joiner


@pytest.mark.parametrize("backend", ["auto"] + (["triton"] if DEVICES else []))
def test_joiner_fuses_masks_and_pos_for_hw(backend, monkeypatch):
    device = DEVICES[0] if backend == "triton" else "cpu"
    joiner = tiny_joiner(PositionEmbeddingSineHW(8, 20, 10000, normalize=True, backend=backend)).to(device)
    reused = []
    original = position_encoding.precomputed_pos

    def spy(mask, params, backend_):
        pos = original(mask, params, backend_)
        reused.append(pos is not None)
        return pos

    monkeypatch.setattr(position_encoding, "precomputed_pos", spy)
    nt = nested_tensor_from_tensor_list([torch.randn(3, 37, 50, device=device), torch.randn(3, 29, 61, device=device)])
    with torch.no_grad():
        out, pos = joiner(nt)
        features = list(joiner[0].body(nt.tensors).values())
        masks, stage_pos = joiner.masks_and_pos(nt, features)
    assert reused == [True] * 3  # the embedding returned the pos the backbone computed with the masks
    dino = DinoPositionEmbeddingSineHW(8, 20, 10000, True)
    atol = FP32_ATOL if backend == "triton" else 0.0
    for x, p, m, sp in zip(out, pos, masks, stage_pos):
        assert torch.equal(x.mask, m)
        assert_close(p, dino(x), atol, f"{backend} level {tuple(m.shape)}")
        assert_close(sp, dino(x), atol, f"{backend} masks_and_pos level {tuple(m.shape)}")
        assert_close(p, dino_sine_hw_float64(x.mask, 8, 20.0, 10000.0, True), 2e-5)
    # TorchScript takes the reference path, same values.
    if backend == "auto":
        _, scripted_pos = torch.jit.script(joiner)(nt)
        assert all(torch.equal(a, b) for a, b in zip(scripted_pos, pos))
