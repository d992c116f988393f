"""The CPU inference path of a converted backbone: oneDNN weights prepacked per input shape and
residuals written in place. Nothing may go stale, nothing visible may be overwritten, and a
converted model still copies and saves. The oracle is the unconverted upstream stand-in."""
import copy
import io

import pytest
import torch

import detr_fast
from detr_fast.fold import onednn
from detr_fast.fold.cache import CACHE_ATTRS
from tests.upstream_reference import DEFORMABLE_LAYERS, DETR_SEGMENTATION_LAYERS, upstream_joiner

pytestmark = pytest.mark.skipif(not onednn.usable(torch.float32, "packed"),
                                reason="oneDNN's prepacked convolutions are not available in this torch build")


def _bodies(layers=DEFORMABLE_LAYERS, seed=0):
    reference = upstream_joiner("resnet18", layers, seed=seed).eval()
    converted = detr_fast.convert(copy.deepcopy(reference))
    return reference[0].body, converted[0].body


def _close(got, want, tol=1e-4):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].stride() == want[k].stride()
        assert (got[k] - want[k]).abs().max() <= tol * want[k].abs().max(), k


def test_several_input_shapes_and_a_bounded_cache():
    reference, converted = _bodies()
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 64, 96), (1, 3, 64, 96), (2, 3, 50, 70), (1, 3, 33, 47), (3, 3, 40, 40), (2, 3, 64, 96)]
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape, generator=gen)
            _close(converted(x), reference(x))
    caches = [m.__dict__[CACHE_ATTRS[1]].value for m in converted.modules() if CACHE_ATTRS[1] in m.__dict__]
    assert caches and all(len(c) <= onednn.MAX_SHAPES for c in caches)


def test_weight_changes_reach_the_packed_weights():
    reference, converted = _bodies()
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        converted(x)  # fill the caches
        for body in (reference, converted):
            body.layer2[0].conv1.weight.mul_(1.5)          # an in-place edit
            body.layer3[1].bn2.running_var.add_(0.25)      # a frozen-BN buffer
        _close(converted(x), reference(x))
        state = {k: v * 0.9 if v.is_floating_point() else v for k, v in reference.state_dict().items()}
        reference.load_state_dict(state)
        converted.load_state_dict(state)
        _close(converted(x), reference(x))


def test_inputs_and_earlier_outputs_are_never_written():
    reference, converted = _bodies(DETR_SEGMENTATION_LAYERS)  # layer1 returned: read by layer2 too
    gen = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(2, 3, 64, 96, generator=gen), torch.randn(2, 3, 64, 96, generator=gen)
    for x in (x1, x1.contiguous(memory_format=torch.channels_last)):
        before = x.clone()
        with torch.no_grad():
            first = converted(x)
            kept = {k: v.clone() for k, v in first.items()}
            converted(x2)
        assert torch.equal(x, before)
        assert all(torch.equal(first[k], kept[k]) for k in first)
        with torch.no_grad():
            _close(first, reference(x))


def test_a_hook_keeps_the_block_output_it_saw():
    reference, converted = _bodies()
    seen = {}
    for name, body in (("reference", reference), ("converted", converted)):
        body.layer2[0].register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference(x)
        converted(x)
    # layer2[1] adds its residual into its input unless a hook could hold it: this one does.
    assert (seen["converted"] - seen["reference"]).abs().max() <= 1e-4 * seen["reference"].abs().max()


def test_a_converted_model_copies_and_saves_after_running():
    reference, converted = _bodies()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = converted(x)  # caches filled: they must not break copying or saving
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (loaded, copy.deepcopy(converted)):
        with torch.no_grad():
            _close(other(x), want, tol=1e-6)


def test_inference_mode_gives_the_reference_features():
    reference, converted = _bodies(DETR_SEGMENTATION_LAYERS)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the NCHW copies run on parallel threads only with two or more
    try:
        with torch.inference_mode():  # the pool's threads write inference tensors
            got, want = converted(x), reference(x)
    finally:
        torch.set_num_threads(threads)
    _close(got, want)


def test_the_shape_used_at_every_call_keeps_its_packed_weight():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
    every_call = torch.empty(1, 8, 10, 10)
    others = [torch.empty(1, 8, 10 + k, 10) for k in range(1, onednn.MAX_SHAPES + 1)]
    onednn._packed(conv, weight, every_call)
    cache = conv.__dict__[CACHE_ATTRS[1]].value
    for other in others:  # more shapes than the cache holds, the first one used in between
        onednn._packed(conv, weight, other)
        assert tuple(every_call.shape) in cache
        onednn._packed(conv, weight, every_call)
    assert len(cache) == onednn.MAX_SHAPES and tuple(others[0].shape) not in cache  # the least recently used
