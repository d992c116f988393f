"""The Joiner's fused masks/pos stage, the custom op under torch.compile, and TorchScript."""
import pytest
import torch

import detr_fast.sine.custom_op  # noqa: F401  (registers torch.ops.detr_fast.sine_masks_pos)
from detr_fast import PositionEmbeddingLearned, PositionEmbeddingSine, nested_tensor_from_tensor_list
from detr_fast.nested_tensor import NestedTensor
from detr_fast.sine.reference import downsample_mask_reference
from tests.helpers import kernel_devices, tiny_joiner

DEVICES = kernel_devices()
needs_kernels = pytest.mark.skipif(not DEVICES, reason="no device can run the Triton kernels here")


def images(device="cpu"):
    return [torch.randn(3, 37, 50, device=device), torch.randn(3, 29, 61, device=device)]


def assert_same_levels(got, ref, atol=2e-5):
    (out, pos), (ref_out, ref_pos) = got, ref
    assert len(out) == len(ref_out) == len(pos) == len(ref_pos)
    for x, rx, p, rp in zip(out, ref_out, pos, ref_pos):
        assert torch.equal(x.tensors, rx.tensors)
        assert torch.equal(x.mask, rx.mask)
        assert p.dtype == rp.dtype and p.shape == rp.shape and p.stride() == rp.stride()
        assert (p.float() - rp.float()).abs().max().item() <= atol


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_sizes", [True, False])
def test_fused_joiner_matches_reference_joiner(device, with_sizes):
    nt = nested_tensor_from_tensor_list(images(device))
    if not with_sizes:
        nt = NestedTensor(nt.tensors, nt.mask)
    kwargs = dict(normalize=True, offset=-0.5)
    fast = tiny_joiner(PositionEmbeddingSine(8, backend="triton", **kwargs)).to(device)
    ref = tiny_joiner(PositionEmbeddingSine(8, backend="torch", **kwargs)).to(device)
    with torch.no_grad():
        assert_same_levels(fast(nt), ref(nt))
        features = list(fast[0].body(nt.tensors).values())
        masks, pos = fast.masks_and_pos(nt, features)
    for f, m in zip(features, masks):
        assert torch.equal(m, downsample_mask_reference(nt.mask, [f.shape[-2], f.shape[-1]]))
    # Backbone.forward alone still returns the reference masks.
    for x, f in zip(fast[0](nt).values(), features):
        assert torch.equal(x.mask, downsample_mask_reference(nt.mask, [f.shape[-2], f.shape[-1]]))


@needs_kernels
@pytest.mark.parametrize("device", DEVICES)
def test_fused_joiner_low_precision_features(device):
    nt = nested_tensor_from_tensor_list(images(device))
    fast, ref = (tiny_joiner(PositionEmbeddingSine(8, normalize=True, backend=backend))
                 .to(device=device, dtype=torch.bfloat16) for backend in ("triton", "torch"))
    nt = NestedTensor(nt.tensors.to(torch.bfloat16), nt.mask, nt.image_sizes)
    with torch.no_grad():
        (_, pos), (_, ref_pos) = fast(nt), ref(nt)
    for p, rp in zip(pos, ref_pos):
        assert p.dtype == torch.bfloat16 and p.stride() == rp.stride()
        # one bf16 rounding step of values in [-1, 1]
        assert (p.float() - rp.float()).abs().max().item() <= 2.0 ** -8


def test_generic_path_cpu_auto_and_learned():
    nt = nested_tensor_from_tensor_list(images())
    with torch.no_grad():
        auto = tiny_joiner(PositionEmbeddingSine(8, normalize=True))
        ref = tiny_joiner(PositionEmbeddingSine(8, normalize=True, backend="torch"))
        assert_same_levels(auto(nt), ref(nt), atol=0.0)
        features = list(auto[0].body(nt.tensors).values())
        masks, pos = auto.masks_and_pos(nt, features)
        _, ref_pos = ref(nt)
        assert all(torch.equal(p, r) for p, r in zip(pos, ref_pos))
        learned = tiny_joiner(PositionEmbeddingLearned(4))
        out, pos = learned(nt)
        assert [p.shape[1] for p in pos] == [8, 8, 8]
        with pytest.raises(ValueError, match="batch"):
            auto.masks_and_pos(nt, [features[0][:1]])


@needs_kernels
def test_torchscript_takes_reference_path():
    device = DEVICES[0]
    nt = nested_tensor_from_tensor_list(images(device))
    fast = tiny_joiner(PositionEmbeddingSine(8, normalize=True, backend="triton")).to(device)
    scripted = torch.jit.script(fast)
    with torch.no_grad():
        assert_same_levels(scripted(nt), fast(nt))


@needs_kernels
def test_compile_fullgraph_module_and_joiner():
    device = DEVICES[0]
    nt = nested_tensor_from_tensor_list(images(device))
    embedding = PositionEmbeddingSine(8, normalize=True, offset=-0.5, backend="triton")
    torch._dynamo.reset()
    out = torch.compile(embedding, fullgraph=True, backend="aot_eager")(nt)
    assert (out - embedding.reference(nt.mask)).abs().max().item() <= 2e-5

    def build_and_embed(tensors, mask, sizes):
        # A NestedTensor built inside the compiled region, as DETR's forward does.
        return embedding(NestedTensor(tensors, mask, sizes))

    out = torch.compile(build_and_embed, fullgraph=True, backend="aot_eager")(nt.tensors, nt.mask, nt.image_sizes)
    assert (out - embedding.reference(nt.mask)).abs().max().item() <= 2e-5

    fast = tiny_joiner(embedding).to(device)

    def run(x):
        out, pos = fast(x)
        return [o.mask for o in out], pos

    with torch.no_grad():
        masks, pos = torch.compile(run, fullgraph=True, backend="aot_eager")(nt)
        eager_out, eager_pos = fast(nt)
    assert all(torch.equal(m, o.mask) for m, o in zip(masks, eager_out))
    assert all(torch.equal(p, e) for p, e in zip(pos, eager_pos))


@needs_kernels
def test_custom_op_opcheck():
    opcheck = getattr(torch.library, "opcheck", None)
    if opcheck is None:
        pytest.skip("torch.library.opcheck needs a newer torch")
    device = DEVICES[0]
    nt = nested_tensor_from_tensor_list(images(device))
    full_h, full_w = int(nt.mask.shape[1]), int(nt.mask.shape[2])
    # A level smaller than the mask, and the mask's own size (where the arbitrary-mask path skips
    # the resize: its output must still not alias the input mask), with and without the mask.
    for sizes in (nt.image_sizes, None):
        for height, width, need_mask in ((5, 7, True), (full_h, full_w, True), (full_h, full_w, False)):
            opcheck(torch.ops.detr_fast.sine_masks_pos.default,
                    (nt.mask, sizes, height, width, 4, 10000.0, True, 6.28, -0.5, 1e-6, "detr", torch.float32,
                     need_mask),
                    test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
