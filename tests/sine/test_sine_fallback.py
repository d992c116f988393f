"""The CPU fallback (backend "auto" on CPU): the separable computation for rectangular masks must
be exactly equal (torch.equal, same strides) to the reference; other masks take the reference."""
import math

import pytest
import torch

import detr_fast.sine.levels as levels
from detr_fast import FrozenBatchNorm2d as detr_fast_frozen_bn
from detr_fast import NestedTensor, PositionEmbeddingSine, nested_tensor_from_tensor_list
from detr_fast.sine.params import SineParams
from detr_fast.sine.reference import downsample_mask_reference, sine_embedding_reference
from detr_fast.sine.separable import level_sizes, rectangle_mask, rectangle_sizes, sine_embedding_separable
from tests.helpers import rect_mask


def test_separable_is_bit_identical_to_reference(random_seed):
    gen = random_seed.generator()
    for trial in range(60):
        batch = int(torch.randint(1, 5, (1,), generator=gen))
        h, w = (int(v) for v in torch.randint(1, 50, (2,), generator=gen))
        sizes = [(int(torch.randint(0, h + 1, (1,), generator=gen)), int(torch.randint(0, w + 1, (1,), generator=gen)))
                 for _ in range(batch)]
        sizes[0] = (h, w)
        f = 2 * int(torch.randint(1, 70, (1,), generator=gen))
        normalize = bool(trial % 2)
        args = (f, float(torch.rand(1, generator=gen)) * 20000 + 1, normalize, 6.28 if normalize else 1.0,
                (0.0, -0.5, 0.3)[trial % 3], (1e-6, 1e-2)[trial % 2])
        mask = rect_mask(sizes, h, w)
        ref = sine_embedding_reference(mask, SineParams(*args))
        out = sine_embedding_separable(torch.tensor(sizes), h, w, SineParams(*args))
        context = f"{random_seed} sizes={sizes} {h}x{w} args={args}"
        assert torch.equal(out, ref), context
        assert out.stride() == ref.stride(), context


def test_rectangle_detection():
    mask = rect_mask([(3, 5), (0, 0), (4, 2)], 4, 6)
    assert rectangle_sizes(mask).tolist() == [[3, 5], [0, 0], [4, 2]]
    mask[0, 0, 0] = True  # a hole: no longer a rectangle
    assert rectangle_sizes(mask) is None
    bottom_right = torch.ones((1, 4, 4), dtype=torch.bool)
    bottom_right[0, 2:, 2:] = False
    assert rectangle_sizes(bottom_right) is None
    # A product of row and column sets that are not prefixes: padded exactly where its first row or
    # column is, yet not a top-left rectangle.
    gapped = rect_mask([(3, 3)], 3, 3)
    gapped[0, 1, :] = True
    assert rectangle_sizes(gapped) is None
    gapped = rect_mask([(3, 3)], 3, 3)
    gapped[0, :, 1] = True
    assert rectangle_sizes(gapped) is None
    # All padding (any image size describes it; the edges give (0, 0)) and no padding at all.
    assert rectangle_sizes(torch.ones((1, 2, 3), dtype=torch.bool)).tolist() == [[0, 0]]
    assert rectangle_sizes(torch.zeros((2, 2, 3), dtype=torch.bool)).tolist() == [[2, 3], [2, 3]]


def _is_top_left_rectangle(mask_2d: torch.Tensor):
    """Brute force: the (h, w) whose top-left rectangle the H x W mask is, else None."""
    height, width = mask_2d.shape
    for h in range(height + 1):
        for w in range(width + 1):
            if torch.equal(rect_mask([(h, w)], height, width)[0], mask_2d):
                return h, w
    return None


def test_rectangle_detection_matches_brute_force(random_seed):
    gen = random_seed.generator()
    for trial in range(150):
        batch = int(torch.randint(1, 4, (1,), generator=gen))
        h, w = (int(v) for v in torch.randint(1, 7, (2,), generator=gen))
        sizes = [(int(torch.randint(1, h + 1, (1,), generator=gen)), int(torch.randint(1, w + 1, (1,), generator=gen)))
                 for _ in range(batch)]
        mask = rect_mask(sizes, h, w)
        if trial % 2:  # flip a few random pixels: usually no longer rectangles, sometimes still
            flips = torch.rand((batch, h, w), generator=gen) < 0.15
            mask ^= flips
        per_image = [_is_top_left_rectangle(m) for m in mask]
        got = rectangle_sizes(mask)
        context = f"{random_seed} mask={mask.int().tolist()}"
        if any(r is None for r in per_image):
            assert got is None, context
        else:
            assert got is not None and torch.equal(rect_mask(got.tolist(), h, w), mask), context


@pytest.mark.parametrize("with_sizes", [True, False])
def test_auto_module_on_cpu_uses_separable_path_and_matches(monkeypatch, with_sizes):
    calls = []
    real = levels.sine_embedding_separable
    monkeypatch.setattr(levels, "sine_embedding_separable",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    nt = nested_tensor_from_tensor_list([torch.zeros(3, 13, 30), torch.zeros(3, 21, 9)])
    if not with_sizes:
        nt = NestedTensor(nt.tensors, nt.mask)
    module = PositionEmbeddingSine(32, normalize=True, offset=-0.5)
    out = module(nt)
    assert calls, "the auto CPU path should take the separable fallback"
    ref = module.reference(nt.mask)
    assert torch.equal(out, ref) and out.stride() == ref.stride()


def test_explicit_torch_and_arbitrary_masks_take_the_reference(monkeypatch, random_seed):
    def fail(*a, **k):
        raise AssertionError("separable path must not run")
    monkeypatch.setattr(levels, "sine_embedding_separable", fail)
    nt = nested_tensor_from_tensor_list([torch.zeros(3, 13, 30), torch.zeros(3, 21, 9)])
    ref_module = PositionEmbeddingSine(16, normalize=True, backend="torch")
    expected = sine_embedding_reference(nt.mask, SineParams(16, 10000.0, True, 2 * math.pi, 0.0, 1e-6))
    assert torch.equal(ref_module(nt), expected)
    monkeypatch.setenv("DETR_FAST_BACKEND", "torch")
    PositionEmbeddingSine(16, normalize=True)(nt)  # the env override asks for the reference too
    monkeypatch.delenv("DETR_FAST_BACKEND")
    holes = torch.rand((2, 9, 9), generator=random_seed.generator()) < 0.4
    holes[0, 0, 0] = True
    module = PositionEmbeddingSine(16, normalize=True)
    assert torch.equal(module(NestedTensor(torch.zeros(2, 3, 9, 9), holes)), module.reference(holes)), str(random_seed)


def test_edited_mask_invalidates_sizes():
    nt = nested_tensor_from_tensor_list([torch.zeros(3, 8, 10), torch.zeros(3, 6, 4)])
    nt.mask[1, 0, 0] = True  # in-place edit after padding: the sizes no longer hold
    module = PositionEmbeddingSine(8, normalize=True)
    assert torch.equal(module(nt), module.reference(nt.mask))


def test_empty_and_bad_input():
    module = PositionEmbeddingSine(8, normalize=True)
    empty = torch.ones((0, 4, 5), dtype=torch.bool)
    out = module(NestedTensor(torch.zeros(0, 3, 4, 5), empty))
    assert out.shape == (0, 16, 4, 5)
    with pytest.raises(ValueError, match="bool"):
        module(NestedTensor(torch.zeros(1, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="3-D"):
        module(NestedTensor(torch.zeros(1, 3, 4, 5), torch.zeros(1, 1, 4, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="batch"):
        module(NestedTensor(torch.zeros(2, 3, 4, 5), torch.zeros(1, 4, 5, dtype=torch.bool)))


def test_level_sizes_follow_pytorch_nearest_rule(random_seed):
    """The per-level extents computed from the image sizes give exactly the mask F.interpolate
    gives, for random rectangular masks and output sizes (down- and upsampling)."""
    rng = random_seed.rng()
    for _ in range(200):
        batch, height, width = rng.randint(1, 4), rng.randint(1, 300), rng.randint(1, 300)
        sizes = torch.tensor([[rng.randint(0, height), rng.randint(0, width)] for _ in range(batch)])
        mask = rect_mask(sizes.tolist(), height, width)
        assert torch.equal(rectangle_mask(sizes, height, width, torch.device("cpu")), mask)
        out_h, out_w = rng.randint(1, height + 3), rng.randint(1, width + 3)
        extents = level_sizes(sizes, (height, width), (out_h, out_w))
        want = downsample_mask_reference(mask, [out_h, out_w])
        assert torch.equal(rectangle_mask(extents, out_h, out_w, torch.device("cpu")), want), \
            f"{random_seed} sizes={sizes.tolist()} in={height}x{width} out={out_h}x{out_w}"


@pytest.mark.parametrize("offset", [0.0, -0.5])
def test_joiner_on_cpu_derives_level_masks_from_sizes(monkeypatch, offset, random_seed):
    """backend "auto" on CPU with a padded batch: the Joiner's masks and pos come from the image
    sizes (the full mask is not downsampled) and equal the reference Joiner's bit for bit."""
    from torchvision.models import resnet18

    from detr_fast import Joiner
    from detr_fast.backbone import BackboneBase

    rng, gen = random_seed.rng(), random_seed.generator()
    images = [torch.randn(3, rng.randint(20, 90), rng.randint(20, 90), generator=gen) for _ in range(rng.randint(1, 3))]
    context = f"{random_seed} image sizes={[tuple(i.shape[1:]) for i in images]}"
    nt = nested_tensor_from_tensor_list(images)
    body = resnet18(weights=None, norm_layer=detr_fast_frozen_bn)
    backbone = BackboneBase(body, False, True, {"layer2": 128, "layer3": 256, "layer4": 512})
    fast = Joiner(backbone, PositionEmbeddingSine(16, normalize=True, offset=offset)).eval()
    ref = Joiner(backbone, PositionEmbeddingSine(16, normalize=True, offset=offset, backend="torch")).eval()
    import torch.nn.functional as F

    resized = []
    real_interpolate = F.interpolate

    def recording_interpolate(x, *args, **kwargs):
        resized.append(tuple(x.shape[-2:]))
        return real_interpolate(x, *args, **kwargs)

    with torch.no_grad():
        want_out, want_pos = ref(nt)
        monkeypatch.setattr(F, "interpolate", recording_interpolate)
        got_out, got_pos = fast(nt)
    # Only the B x H x 1 and B x 1 x W edges are resized, never the H x W mask.
    assert resized and tuple(nt.mask.shape[-2:]) not in resized, context
    for g, w, gp, wp in zip(got_out, want_out, got_pos, want_pos):
        assert torch.equal(g.mask, w.mask) and torch.equal(g.tensors, w.tensors), context
        assert torch.equal(gp, wp) and gp.stride() == wp.stride(), context
