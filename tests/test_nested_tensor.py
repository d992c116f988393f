"""NestedTensor and nested_tensor_from_tensor_list: padding values, mask, metadata and bad input."""
import pickle

import pytest
import torch

from detr_fast import NestedTensor, nested_tensor_from_tensor_list
from detr_fast.sine.reference import pad_images_reference
from tests.helpers import HAS_CUDA, requires_cuda
from tests.upstream_reference import upstream_pad


def test_pad_hand_written_case():
    # Two 1-channel images: 1x2 and 2x1. Batch is 2 x 1 x 2 x 2, zeros bottom/right.
    a = torch.tensor([[[1.0, 2.0]]])
    b = torch.tensor([[[3.0], [4.0]]])
    nt = nested_tensor_from_tensor_list([a, b])
    expected = torch.tensor([[[[1.0, 2.0], [0.0, 0.0]]],
                             [[[3.0, 0.0], [4.0, 0.0]]]])
    expected_mask = torch.tensor([[[False, False], [True, True]],
                                  [[False, True], [False, True]]])
    assert torch.equal(nt.tensors, expected)
    assert torch.equal(nt.mask, expected_mask)
    assert nt.tensors.dtype == torch.float32 and nt.mask.dtype == torch.bool
    assert torch.equal(nt.image_sizes, torch.tensor([[1, 2], [2, 1]]))


def test_pad_single_image_has_no_padding():
    img = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    nt = nested_tensor_from_tensor_list([img])
    assert torch.equal(nt.tensors, img[None])
    assert not nt.mask.any()
    assert nt.mask.shape == (1, 3, 4)


def test_pad_padding_is_zero_even_when_memory_was_dirty(monkeypatch):
    # Uninitialized memory must never leak into the padding. Make every torch.empty return NaNs, so
    # that an implementation that allocates without a fill and forgets part of the padding fails.
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out.fill_(7)

    monkeypatch.setattr(torch, "empty", nan_empty)
    imgs = [torch.randn(2, 7, 3), torch.randn(2, 4, 9), torch.randn(2, 5, 5)]
    nt = nested_tensor_from_tensor_list(imgs)
    monkeypatch.undo()
    assert not torch.isnan(nt.tensors).any()
    for i, img in enumerate(imgs):
        h, w = img.shape[1:]
        assert torch.equal(nt.tensors[i, :, :h, :w], img)
        assert (nt.tensors[i, :, h:, :] == 0).all()
        assert (nt.tensors[i, :, :, w:] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pad_equals_upstream(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 12, (int(torch.randint(1, 5, (1,), generator=g)), 2), generator=g)
    imgs = [(torch.randn(3, int(h), int(w), generator=g) * 50).to(dtype) for h, w in sizes]
    nt = nested_tensor_from_tensor_list(imgs)
    up = upstream_pad(imgs)
    assert nt.tensors.dtype == dtype
    assert torch.equal(nt.tensors, up.tensors)
    assert torch.equal(nt.mask, up.mask)
    assert torch.equal(nt.image_sizes, sizes.to(torch.int64))
    # The reference path's own pad agrees too (it is the oracle the pad kernel will be tested with).
    ref_batch, ref_mask = pad_images_reference(imgs)
    assert torch.equal(ref_batch, up.tensors) and torch.equal(ref_mask, up.mask)


def test_tuple_input_is_accepted():
    imgs = (torch.ones(1, 2, 2), torch.ones(1, 3, 1))
    nt = nested_tensor_from_tensor_list(imgs)
    assert nt.tensors.shape == (2, 1, 3, 2)


def test_image_sizes_metadata():
    imgs = [torch.zeros(3, 5, 8), torch.zeros(3, 9, 2)]
    nt = nested_tensor_from_tensor_list(imgs)
    sizes = nt.rectangular_sizes()
    assert sizes is not None
    assert sizes.dtype == torch.int64 and sizes.device.type == "cpu" and sizes.shape == (2, 2)
    assert sizes.tolist() == [[5, 8], [9, 2]]


def test_rectangular_sizes_none_after_inplace_mask_edit():
    nt = nested_tensor_from_tensor_list([torch.zeros(1, 4, 4), torch.zeros(1, 2, 3)])
    assert nt.rectangular_sizes() is not None
    nt.mask[0, 0, 0] = True
    assert nt.rectangular_sizes() is None
    # image_sizes itself is kept as given; only the trust in it is withdrawn.
    assert nt.image_sizes is not None


def test_rectangular_sizes_none_without_sizes_or_mask():
    t = torch.zeros(1, 1, 2, 2)
    assert NestedTensor(t, torch.zeros(1, 2, 2, dtype=torch.bool)).rectangular_sizes() is None
    assert NestedTensor(t, None, torch.tensor([[2, 2]])).rectangular_sizes() is None


def test_to_keeps_values_and_sizes():
    nt = nested_tensor_from_tensor_list([torch.randn(2, 3, 4), torch.randn(2, 4, 2)])
    moved = nt.to(torch.device("cpu"))
    assert isinstance(moved, NestedTensor)
    assert torch.equal(moved.tensors, nt.tensors) and torch.equal(moved.mask, nt.mask)
    assert moved.rectangular_sizes() is not None
    assert moved.rectangular_sizes().tolist() == [[3, 4], [4, 2]]
    # After the mask was edited, the copy must not claim the (now stale) sizes either.
    nt.mask[1, 0, 0] = True
    assert nt.to(torch.device("cpu")).rectangular_sizes() is None


def test_to_without_mask():
    t = torch.randn(1, 2, 3, 3)
    moved = NestedTensor(t, None).to(torch.device("cpu"), non_blocking=True)
    assert moved.mask is None and torch.equal(moved.tensors, t)


@requires_cuda
def test_to_cuda_and_record_stream():
    nt = nested_tensor_from_tensor_list([torch.randn(3, 5, 6), torch.randn(3, 6, 4)])
    moved = nt.to(torch.device("cuda"), non_blocking=True)
    assert moved.tensors.is_cuda and moved.mask.is_cuda
    assert torch.equal(moved.tensors.cpu(), nt.tensors) and torch.equal(moved.mask.cpu(), nt.mask)
    # The sizes stay on the host: they are launch metadata.
    assert moved.rectangular_sizes() is not None and moved.rectangular_sizes().device.type == "cpu"
    stream = torch.cuda.Stream()
    moved.record_stream(stream)
    NestedTensor(moved.tensors, None).record_stream(stream)
    torch.cuda.synchronize()


def test_decompose_and_repr():
    t = torch.arange(4.0).reshape(1, 1, 2, 2)
    m = torch.tensor([[[False, True], [False, True]]])
    nt = NestedTensor(t, m)
    tensors, mask = nt.decompose()
    assert tensors is t and mask is m
    assert repr(nt) == str(t)


def test_empty_list_raises_value_error():
    with pytest.raises(ValueError, match="empty"):
        nested_tensor_from_tensor_list([])


@pytest.mark.parametrize("shape", [(3, 4), (1, 3, 4, 5), (5,)])
def test_non_3d_raises_value_error(shape):
    with pytest.raises(ValueError, match=r"tensor_list\[1\].*3-D"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(shape)])


def test_mismatched_channels_raise_value_error():
    with pytest.raises(ValueError, match="channels"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(1, 4, 5)])


def test_mismatched_dtypes_raise_value_error():
    with pytest.raises(ValueError, match="dtype"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(3, 4, 5, dtype=torch.float16)])


@pytest.mark.skipif(not HAS_CUDA, reason="mismatched devices need a CUDA GPU")
def test_mismatched_devices_raise_value_error():
    with pytest.raises(ValueError, match="cuda|cpu"):
        nested_tensor_from_tensor_list([torch.zeros(3, 4, 5), torch.zeros(3, 4, 5, device="cuda")])


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [torch.zeros(1, 2, 2), "image"]])
def test_non_tensor_elements_raise_type_error(bad):
    with pytest.raises(TypeError, match="torch.Tensor"):
        nested_tensor_from_tensor_list(bad)


def test_non_list_raises_type_error():
    with pytest.raises(TypeError, match="tensor_list"):
        nested_tensor_from_tensor_list(torch.zeros(2, 3, 4, 5))


def test_rectangular_sizes_none_after_the_mask_is_replaced():
    nt = nested_tensor_from_tensor_list([torch.zeros(1, 4, 4), torch.zeros(1, 2, 3)])
    other = nested_tensor_from_tensor_list([torch.zeros(1, 2, 2), torch.zeros(1, 4, 4)])
    assert nt.mask._version == other.mask._version  # the version counter alone cannot tell them apart
    nt.mask = other.mask
    assert nt.rectangular_sizes() is None
    # A view of the same memory (same address and version) is another mask too.
    nt = nested_tensor_from_tensor_list([torch.zeros(1, 4, 6), torch.zeros(1, 2, 3)])
    nt.mask = nt.mask[:, :3, :5]
    assert nt.rectangular_sizes() is None
    square = nested_tensor_from_tensor_list([torch.zeros(1, 5, 5), torch.zeros(1, 2, 3)])
    square.mask = square.mask.transpose(1, 2)
    assert square.rectangular_sizes() is None


def test_sizes_survive_pickling_only_while_they_describe_the_mask():
    """A DataLoader worker pickles its batches: the mask arrives as a new tensor."""
    nt = nested_tensor_from_tensor_list([torch.zeros(1, 4, 6), torch.zeros(1, 2, 3)])
    back = pickle.loads(pickle.dumps(nt))
    assert torch.equal(back.mask, nt.mask) and back.rectangular_sizes().tolist() == [[4, 6], [2, 3]]
    nt.mask[1, 3, 5] = False  # no longer what the sizes say
    assert pickle.loads(pickle.dumps(nt)).rectangular_sizes() is None
