"""The reference path's position embeddings and mask downsampling, against hand-computed values.

The hand computations below are scalar Python (math.sin / math.cos on explicit cumulative counts).
They round every intermediate to float32 the way the reference's float32 tensor ops do, so even the
ill-conditioned values at padding positions (where Deformable-DETR's offset divides -0.5 by eps)
can be checked; everything else is also checked against literal numbers worked out by hand.
"""
import argparse
import math
import struct

import pytest
import torch

from detr_fast import (
    NestedTensor,
    PositionEmbeddingLearned,
    PositionEmbeddingSine,
    build_position_encoding,
    nested_tensor_from_tensor_list,
)
from detr_fast.sine.params import SineParams
from detr_fast.sine.reference import downsample_mask_reference, sine_embedding_reference, sine_frequencies
from tests.helpers import rect_mask
from tests.upstream_reference import UpstreamNestedTensor, UpstreamPositionEmbeddingSine

TWO_PI = 2 * math.pi


def f32(v: float) -> float:
    """Round a Python float to the nearest float32, as a float32 tensor op would."""
    return struct.unpack("f", struct.pack("f", v))[0]


def hand_sine(mask, num_pos_feats, temperature, normalize, scale, offset, eps=1e-6):
    """Sine embedding of one H x W mask (lists of bools, True = padding): nested lists [2F][H][W].

    Written from the formula: position = number of non-padding pixels up to and including this one
    along the column (y) or the row (x), plus the offset; normalized by the column's/row's count;
    channel 2k and 2k+1 use sin and cos of position / temperature ** (2k / F). y channels first.
    """
    h, w = len(mask), len(mask[0])
    y = [[float(sum(not mask[k][j] for k in range(i + 1))) for j in range(w)] for i in range(h)]
    x = [[float(sum(not mask[i][k] for k in range(j + 1))) for j in range(w)] for i in range(h)]

    def position(v, total):
        if normalize:
            return f32(f32(f32(v + f32(offset)) / f32(total + f32(eps))) * f32(scale))
        return f32(v + f32(offset))

    y = [[position(y[i][j], y[h - 1][j]) for j in range(w)] for i in range(h)]
    x = [[position(x[i][j], x[i][w - 1]) for j in range(w)] for i in range(h)]
    dim_t = [f32(temperature ** f32(2 * (c // 2) / num_pos_feats)) for c in range(num_pos_feats)]
    out = []
    for grid in (y, x):
        for c in range(num_pos_feats):
            fn = math.sin if c % 2 == 0 else math.cos
            out.append([[fn(f32(grid[i][j] / dim_t[c])) for j in range(w)] for i in range(h)])
    return out


# A 2 x 3 batch: image 0 is 2 x 2 (last column padded), image 1 is 1 x 3 (last row padded).
MASK_2x3 = [
    [[False, False, True], [False, False, True]],
    [[False, False, False], [True, True, True]],
]


def _check_against_hand(out, mask, num_pos_feats, temperature, normalize, scale, offset):
    assert out.shape == (len(mask), 2 * num_pos_feats, len(mask[0]), len(mask[0][0]))
    assert out.dtype == torch.float32
    b_, c_, h_, w_ = out.shape
    assert out.stride() == (h_ * w_ * c_, 1, w_ * c_, c_)   # permuted view of contiguous B x H x W x 2F
    for b, m in enumerate(mask):
        expected = torch.tensor(hand_sine(m, num_pos_feats, temperature, normalize, scale, offset),
                                dtype=torch.float64)
        # Float32 sin/cos of the same float32 argument: within a couple of float32 ulps of 1.
        torch.testing.assert_close(out[b].double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("offset", [0.0, -0.5])
@pytest.mark.parametrize("normalize,scale", [(False, None), (True, None), (True, 1.0), (True, 5.5)])
@pytest.mark.parametrize("num_pos_feats,temperature", [(2, 10000), (4, 10000), (4, 9), (6, 20)])
def test_sine_reference_against_hand_computation(offset, normalize, scale, num_pos_feats, temperature):
    mask = torch.tensor(MASK_2x3)
    used_scale = TWO_PI if scale is None else scale
    out = sine_embedding_reference(mask, SineParams(num_pos_feats, temperature, normalize, used_scale, offset, 1e-6))
    _check_against_hand(out, MASK_2x3, num_pos_feats, temperature, normalize, used_scale, offset)
    # The module, on the reference path and on what "auto" runs here (the default a user gets).
    for backend in ("torch", "auto"):
        module = PositionEmbeddingSine(num_pos_feats, temperature, normalize, scale, offset=offset, backend=backend)
        for nt in (NestedTensor(torch.zeros(2, 3, 2, 3), mask),                    # arbitrary mask
                   nested_tensor_from_tensor_list([torch.zeros(3, 2, 2), torch.zeros(3, 1, 3)])):  # with sizes
            assert torch.equal(nt.mask, mask)
            out_module = module(nt)
            _check_against_hand(out_module, MASK_2x3, num_pos_feats, temperature, normalize, used_scale, offset)


def test_sine_reference_literal_values_detr():
    # F = 2, no normalization, offset 0: channels are sin(y), cos(y), sin(x), cos(x) of the raw counts.
    out = sine_embedding_reference(torch.tensor(MASK_2x3), SineParams(2, 10000, False, TWO_PI, 0.0, 1e-6))
    s, c = math.sin, math.cos
    y0 = [[1, 1, 0], [2, 2, 0]]   # image 0: column 2 is padding, so its count stays 0
    x0 = [[1, 2, 2], [1, 2, 2]]   # the count carries over the padded column
    y1 = [[1, 1, 1], [1, 1, 1]]   # image 1: row 1 is padding, so the count stays 1
    x1 = [[1, 2, 3], [0, 0, 0]]
    expected = torch.tensor([
        [[[s(v) for v in r] for r in y0], [[c(v) for v in r] for r in y0],
         [[s(v) for v in r] for r in x0], [[c(v) for v in r] for r in x0]],
        [[[s(v) for v in r] for r in y1], [[c(v) for v in r] for r in y1],
         [[s(v) for v in r] for r in x1], [[c(v) for v in r] for r in x1]],
    ])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_sine_reference_literal_values_deformable():
    # F = 2, normalize, scale 2*pi, offset -0.5 on image 0 (2 x 2 valid of 2 x 3):
    # y = (count - 0.5) / 2 * 2*pi -> pi/2 in row 0 and 3*pi/2 in row 1 (valid columns),
    # x = pi/2 in column 0 and 3*pi/2 in columns 1 and 2 (the padded column repeats the count 2).
    out = sine_embedding_reference(torch.tensor(MASK_2x3), SineParams(2, 10000, True, TWO_PI, -0.5, 1e-6))[0]
    sin_y = out[0, :, :2]
    cos_y = out[1, :, :2]
    sin_x = out[2]
    cos_x = out[3]
    torch.testing.assert_close(sin_y, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), rtol=0, atol=1e-5)
    torch.testing.assert_close(cos_y, torch.zeros(2, 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin_x, torch.tensor([[1.0, -1.0, -1.0]] * 2), rtol=0, atol=1e-5)
    torch.testing.assert_close(cos_x, torch.zeros(2, 3), rtol=0, atol=1e-5)
    # With offset 0 instead: y = 1/2*2*pi = pi and 2*pi: sin 0, cos -1 then 1.
    out = sine_embedding_reference(torch.tensor(MASK_2x3), SineParams(2, 10000, True, TWO_PI, 0.0, 1e-6))[0]
    torch.testing.assert_close(out[1, :, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), rtol=0, atol=1e-5)


def test_sine_frequencies_hand_values():
    torch.testing.assert_close(sine_frequencies(8, 10000, torch.device("cpu")),
                               torch.tensor([1.0, 1.0, 10.0, 10.0, 100.0, 100.0, 1000.0, 1000.0]))
    torch.testing.assert_close(sine_frequencies(4, 9, torch.device("cpu")), torch.tensor([1.0, 1.0, 3.0, 3.0]))
    assert sine_frequencies(4, 9, torch.device("cpu")).dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("b,h,w,f", [(2, 3, 5, 4), (1, 7, 2, 64), (3, 1, 1, 2)])
def test_sine_layout_is_permuted_channels_last_view(b, h, w, f, backend):
    mask = torch.rand(b, h, w) > 0.7
    out = PositionEmbeddingSine(f, normalize=True, backend=backend)(NestedTensor(torch.zeros(b, 1, h, w), mask))
    assert out.shape == (b, 2 * f, h, w)
    assert out.dtype == torch.float32
    # A B x 2F x H x W view of a contiguous B x H x W x 2F buffer.
    assert out.stride() == (h * w * 2 * f, 1, w * 2 * f, 2 * f)
    assert out.permute(0, 2, 3, 1).is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("deformable,normalize", [(False, False), (False, True), (True, True)])
def test_sine_module_equals_upstream_on_random_masks(seed, deformable, normalize, backend):
    g = torch.Generator().manual_seed(seed)
    b, h, w = (int(v) for v in torch.randint(1, 13, (3,), generator=g))
    f = int(torch.randint(1, 20, (1,), generator=g)) * 2
    if seed % 2 == 0:
        mask = torch.rand(b, h, w, generator=g) > 0.6   # arbitrary masks, not only rectangles
    else:
        sizes = [(int(torch.randint(1, h + 1, (1,), generator=g)), int(torch.randint(1, w + 1, (1,), generator=g)))
                 for _ in range(b)]
        mask = rect_mask(sizes, h, w)
    up = UpstreamPositionEmbeddingSine(f, normalize=normalize, deformable=deformable)
    ours = PositionEmbeddingSine(f, normalize=normalize, offset=-0.5 if deformable else 0.0, backend=backend)
    expected = up(UpstreamNestedTensor(torch.zeros(b, 3, h, w), mask))
    got = ours(NestedTensor(torch.zeros(b, 3, h, w), mask))
    assert got.shape == expected.shape and got.stride() == expected.stride()
    assert torch.equal(got, expected)


def test_sine_module_default_matches_upstream_detr_defaults():
    mask = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(5)) > 0.5
    expected = UpstreamPositionEmbeddingSine()(UpstreamNestedTensor(torch.zeros(2, 3, 6, 9), mask))
    got = PositionEmbeddingSine(backend="torch")(NestedTensor(torch.zeros(2, 3, 6, 9), mask))
    assert got.shape == (2, 128, 6, 9)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bad", [3, 0, -2, 2.0, True])
def test_sine_bad_num_pos_feats(bad):
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingSine(bad)


def test_sine_scale_without_normalize():
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(8, scale=3.0)


def test_sine_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        PositionEmbeddingSine(8, backend="cuda")


def test_sine_nested_tensor_without_mask():
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8, backend="torch")(NestedTensor(torch.zeros(1, 3, 4, 4), None))


def test_sine_scripted_equals_eager():
    module = PositionEmbeddingSine(6, temperature=50, normalize=True, scale=3.0, offset=-0.5)
    scripted = torch.jit.script(module)
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.5
    nt = NestedTensor(torch.zeros(2, 3, 5, 7), mask)
    got = scripted(nt)
    assert torch.equal(got, module(nt))
    _check_against_hand(got, mask.tolist(), 6, 50, True, 3.0, -0.5)


# ---------------------------------------------------------------- learned embedding

def _learned_with_known_weights(f):
    module = PositionEmbeddingLearned(f)
    with torch.no_grad():
        # row r, feature k -> 1000 + 100 * r + k ; column c, feature k -> -(100 * c + k)
        module.row_embed.weight.copy_(1000 + 100 * torch.arange(50.0)[:, None] + torch.arange(float(f)))
        module.col_embed.weight.copy_(-(100 * torch.arange(50.0)[:, None] + torch.arange(float(f))))
    return module


@pytest.mark.parametrize("as_nested", [True, False])
def test_learned_layout_x_half_first(as_nested):
    f, b, h, w = 3, 2, 4, 5
    module = _learned_with_known_weights(f)
    x = torch.zeros(b, 7, h, w)
    out = module(NestedTensor(x, torch.zeros(b, h, w, dtype=torch.bool)) if as_nested else x)
    assert out.shape == (b, 2 * f, h, w)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                for k in range(f):
                    assert out[bi, k, i, j].item() == -(100 * j + k)          # column (x) first
                    assert out[bi, f + k, i, j].item() == 1000 + 100 * i + k  # then row (y)


def test_learned_at_the_limit_and_past_it():
    module = PositionEmbeddingLearned(4)
    assert module(torch.zeros(1, 1, 50, 50)).shape == (1, 8, 50, 50)
    for shape in [(1, 1, 51, 10), (1, 1, 10, 51)]:
        with pytest.raises(ValueError, match="50"):
            module(torch.zeros(shape))
    with pytest.raises(ValueError, match="50"):
        module(NestedTensor(torch.zeros(1, 1, 51, 51), None))


def test_learned_parameters_and_bad_num_pos_feats():
    module = PositionEmbeddingLearned(16)
    assert set(dict(module.named_parameters())) == {"row_embed.weight", "col_embed.weight"}
    assert module.row_embed.weight.shape == (50, 16)
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingLearned(0)


def test_learned_scripted_equals_eager():
    module = _learned_with_known_weights(4)
    scripted = torch.jit.script(module)
    nt = NestedTensor(torch.zeros(2, 3, 6, 9), torch.zeros(2, 6, 9, dtype=torch.bool))
    assert torch.equal(scripted(nt), module(nt))
    assert scripted(nt)[0, 0, 0, 3].item() == -300
    assert torch.equal(scripted(nt.tensors), module(nt))   # the Tensor input too
    with pytest.raises(Exception, match="50"):
        scripted(torch.zeros(1, 1, 51, 3))


# ---------------------------------------------------------------- build_position_encoding

@pytest.mark.parametrize("kind", ["v2", "sine"])
def test_build_sine(kind):
    module = build_position_encoding(argparse.Namespace(hidden_dim=32, position_embedding=kind))
    assert isinstance(module, PositionEmbeddingSine)
    assert module.num_pos_feats == 16 and module.normalize and module.temperature == 10000
    assert module.scale == pytest.approx(TWO_PI)
    mask = torch.rand(1, 4, 6, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = UpstreamPositionEmbeddingSine(16, normalize=True)(UpstreamNestedTensor(torch.zeros(1, 1, 4, 6), mask))
    module.backend = "torch"
    assert torch.equal(module(NestedTensor(torch.zeros(1, 1, 4, 6), mask)), expected)


@pytest.mark.parametrize("kind", ["v3", "learned"])
def test_build_learned(kind):
    module = build_position_encoding(argparse.Namespace(hidden_dim=32, position_embedding=kind))
    assert isinstance(module, PositionEmbeddingLearned)
    assert module.row_embed.weight.shape == (50, 16) and module.col_embed.weight.shape == (50, 16)


@pytest.mark.parametrize("kind", ["v1", "Sine", None, ""])
def test_build_unknown_kind(kind):
    with pytest.raises(ValueError, match="position_embedding"):
        build_position_encoding(argparse.Namespace(hidden_dim=32, position_embedding=kind))


# ---------------------------------------------------------------- mask downsampling

def test_downsample_mask_hand_indices():
    # Nearest: output index i reads input index floor(i * in / out).
    mask = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    out = downsample_mask_reference(mask, [2, 3])
    rows, cols = [0, 2], [0, 2, 4]          # 5/2 = 2.5, 7/3 = 2.33
    assert out.dtype == torch.bool and out.shape == (2, 2, 3)
    assert torch.equal(out, mask[:, rows][:, :, cols])
    out = downsample_mask_reference(mask, [3, 4])
    rows, cols = [0, 1, 3], [0, 1, 3, 5]    # 5/3 = 1.67, 7/4 = 1.75
    assert torch.equal(out, mask[:, rows][:, :, cols])


def test_downsample_mask_literal_case():
    # One 4 x 6 mask, image 3 x 5, to 2 x 3 (stride 2): reads rows 0, 2 and columns 0, 2, 4.
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :3, :5] = False
    out = downsample_mask_reference(mask, [2, 3])
    assert torch.equal(out, torch.tensor([[[False, False, False], [False, False, False]]]))
    # To 1 x 1: reads (0, 0) only.
    assert torch.equal(downsample_mask_reference(mask, [1, 1]), torch.tensor([[[False]]]))
    # A mask padded at the far end of a stride-4 grid: 8 x 8 -> 2 x 2 reads rows/columns 0 and 4.
    mask = torch.ones(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :5] = False
    assert torch.equal(downsample_mask_reference(mask, [2, 2]), torch.tensor([[[False, False], [True, True]]]))


def test_frequencies_are_not_cached_while_a_cuda_graph_is_captured(monkeypatch):
    """During a capture the frequencies are computed (captured) but not kept for eager calls."""
    from detr_fast.sine import reference
    key = (6, 123.0, "cpu", "detr")
    monkeypatch.delitem(reference._FREQUENCIES, key, raising=False)
    monkeypatch.setattr(reference, "capturing", lambda device: True)
    during = reference.cached_frequencies(6, 123.0, torch.device("cpu"))
    assert key not in reference._FREQUENCIES
    monkeypatch.setattr(reference, "capturing", lambda device: False)
    after = reference.cached_frequencies(6, 123.0, torch.device("cpu"))
    assert reference._FREQUENCIES[key] is after
    torch.testing.assert_close(during, after, rtol=0, atol=0)
