"""Training and bf16 autocast as measured paths (issue 21): gradients of a converted Joiner against a
float64 copy, next to upstream's float32 ones; bf16 autocast outputs against float64; the profile's
--train / --autocast usage errors."""
import copy
import subprocess
import sys

import pytest
import torch

import detr_fast
from detr_fast.measure.training import autocast_unavailable_reason, elementwise_gradient_error, gradient_error
from tests.upstream_reference import DEFORMABLE_LAYERS, upstream_joiner, upstream_pad


def _images(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 96, 120, generator=gen), torch.randn(3, 80, 136, generator=gen)]


def _loss(out, pos):
    return sum(o.tensors.float().square().mean() + (o.tensors.float().mean(1, keepdim=True) * p.float()).mean()
               for o, p in zip(out, pos))


def _grads(model, images, pad, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    _loss(*model(pad([i.to(dtype) for i in images]))).backward()
    return {k: p.grad.double() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_training_gradients_within_10x_of_upstream_against_float64(name):
    """DETR's training configuration (layers 2-4 trainable, frozen BN, train mode). Both measures:
    norm-wise worst over parameters ||g - g64|| / ||g64|| and element-wise max|g - g64| / max|g64|."""
    upstream = upstream_joiner(name, DEFORMABLE_LAYERS, train_backbone=True, seed=0).train()
    exact = copy.deepcopy(upstream).double()
    converted = detr_fast.convert(copy.deepcopy(upstream)).train()
    images = _images()
    want = _grads(exact, images, upstream_pad, torch.float64)
    theirs = _grads(upstream, images, upstream_pad)
    ours = _grads(converted, images, detr_fast.nested_tensor_from_tensor_list)
    assert ours.keys() == want.keys() == theirs.keys() and len(ours) > 10
    for measure in (gradient_error, elementwise_gradient_error):
        err_ours, err_theirs = measure(ours, want), measure(theirs, want)
        assert err_ours <= max(10 * err_theirs, 1e-6), (measure.__name__, err_ours, err_theirs)


@pytest.mark.skipif(autocast_unavailable_reason(torch.device("cpu"), torch.bfloat16) is not None,
                    reason="this CPU has no bf16 hardware")
def test_bf16_autocast_at_least_as_accurate_as_upstream():
    """Under the same bf16 autocast, the converted Joiner's features vs float64 (norm-wise, worst
    level) are no worse than upstream's (5% slack for rounding luck)."""
    upstream = upstream_joiner("resnet50", DEFORMABLE_LAYERS, seed=0).eval()
    exact = copy.deepcopy(upstream).double()
    converted = detr_fast.convert(copy.deepcopy(upstream))
    images = _images(5)
    with torch.no_grad():
        want, _ = exact(upstream_pad([i.double() for i in images]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            theirs, _ = upstream(upstream_pad(images))
            ours, _ = converted(detr_fast.nested_tensor_from_tensor_list(images))

    def err(out):
        return max(float((o.tensors.double() - w.tensors).norm() / w.tensors.norm()) for o, w in zip(out, want))
    assert err(ours) <= 1.05 * err(theirs), (err(ours), err(theirs))


def _profile(*args):
    return subprocess.run([sys.executable, "-m", "detr_fast", "profile", "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=300)


def _saved_tensors(model, images):
    """(bytes, shape) of every tensor autograd saves for a training step's backward that is not a
    parameter of the model, and the gradients."""
    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append((t.numel() * t.element_size(), tuple(t.shape)))
        return t
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(*model(detr_fast.nested_tensor_from_tensor_list(images)))
    loss.backward()
    return saved, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_training_keeps_no_folded_weight_for_the_backward(monkeypatch, autocast):
    """The fold's training path saves the parameters (alive anyway), not a folded copy of each
    trainable weight (fold/recomputed.py), and its gradients are the differentiable fold's."""
    from detr_fast.fold import fused_conv

    converted = detr_fast.convert(upstream_joiner("resnet18", DEFORMABLE_LAYERS, train_backbone=True, seed=1)).train()
    weight_shapes = {tuple(p.shape) for n, p in converted.named_parameters() if p.requires_grad and p.dim() == 4}
    images = _images(5)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
        saved, grads = _saved_tensors(converted, images)
        monkeypatch.setattr(fused_conv, "recomputable", lambda conv, bn: False)  # the plain differentiable fold
        saved_plain, grads_plain = _saved_tensors(converted, images)
    assert not [shape for _, shape in saved if shape in weight_shapes]
    assert [shape for _, shape in saved_plain if shape in weight_shapes]  # what the test would catch
    assert sum(b for b, _ in saved) < sum(b for b, _ in saved_plain)
    assert grads.keys() == grads_plain.keys() and len(grads) > 10
    for name, g in grads.items():
        want = grads_plain[name]
        assert (g - want).abs().max() <= 1e-6 * want.abs().max() + 1e-12, name


@pytest.mark.parametrize("args", [["--train", "--dtype", "bfloat16"], ["--train", "--model", "detr"],
                                  ["--autocast", "bfloat16", "--model", "detr"]])
def test_profile_train_usage_errors(args):
    result = _profile(*args)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr


def test_profile_autocast_float16_on_a_cpu_without_it_is_a_usage_error():
    if autocast_unavailable_reason(torch.device("cpu"), torch.float16) is None:
        pytest.skip("this CPU has float16 hardware")
    result = _profile("--autocast", "float16")
    assert result.returncode == 2 and "float16" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("variant", ["layers2-4", "dino-4scale"])
def test_training_joiners_train_layers_2_to_4_of_their_variant(variant):
    from detr_fast.measure.training import build_train_joiner

    joiner = build_train_joiner(variant)
    trainable = {name.split(".")[2] for name, p in joiner.named_parameters() if p.requires_grad}
    assert joiner.training and trainable == {"layer2", "layer3", "layer4"}
    assert isinstance(joiner[1], detr_fast.PositionEmbeddingSineHW) == (variant == "dino-4scale")
    assert len(joiner[0].body.return_layers) == 3
