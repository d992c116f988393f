"""convert() on transformers' real-time DETRs (RT-DETR, RT-DETRv2: ResNet-vd; D-FINE: HGNetV2),
with transformers itself as the oracle: tiny heads, full-size backbones, random frozen-BN
statistics, float32."""
import copy
import warnings

import pytest
import torch

import detr_fast
from tests.hf_models import REALTIME, build_realtime, transformers

pytestmark = pytest.mark.transformers  # CI runs these again under the declared floor of transformers


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _images(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(seed))


def _predictions(model, pixel_values):
    out = model(pixel_values=pixel_values)
    return {"logits": out.logits, "pred_boxes": out.pred_boxes}


@pytest.mark.parametrize("name", list(REALTIME))
def test_converted_model_matches_transformers(name):
    model = build_realtime(name)
    pixel_values = _images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: (p, p.requires_grad) for k, p in model.named_parameters()}
    with torch.no_grad():
        expected = _predictions(model, pixel_values)
        expected_features = [f for f, _ in model.model.backbone(pixel_values, torch.ones(2, 128, 128))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detr_fast.convert(model)
    report = detr_fast.conversion_report(model)
    assert report.folded == REALTIME[name][1]
    # The report names what was folded: HGNetV2's stem and layers, ResNet-vd's residual layers.
    expected_structures = ("hgnet_stem", "hgnet_layer") if name == "dfine" else ("residual_layer",)
    assert all(s in str(report) for s in expected_structures), str(report)
    calls = []
    for m in model.model.backbone.modules():
        if "batchnorm" in type(m).__name__.lower():
            m.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got = _predictions(model, pixel_values)
        features = [f for f, _ in model.model.backbone(pixel_values, torch.ones(2, 128, 128))]
    assert not calls, "a frozen BN of the backbone still runs after conversion"
    for f, ef in zip(features, expected_features):
        assert f.stride() == ef.stride() and _rel_err(f, ef) <= 1e-5
    for key in expected:
        assert _rel_err(got[key], expected[key]) <= 1e-4, key
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {k: (p, p.requires_grad) for k, p in model.named_parameters()} == params
    detr_fast.convert(model)
    assert not detr_fast.conversion_report(model)  # a second convert changes nothing


def test_non_relu_activations_fold_the_bn_and_keep_the_activation():
    model = build_realtime("rtdetr-r18", backbone_config=transformers.RTDetrResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4],
        hidden_act="silu"))
    pixel_values = _images(seed=1)
    with torch.no_grad():
        expected = _predictions(model, pixel_values)
    detr_fast.convert(model)
    assert detr_fast.conversion_report(model).folded == 23
    with torch.no_grad():
        got = _predictions(model, pixel_values)
    assert all(_rel_err(got[k], expected[k]) <= 1e-4 for k in expected)


def test_trainable_batch_norm_is_left_exactly_as_it_was():
    model = build_realtime("rtdetr-r18", freeze_backbone_batch_norms=False)
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="trainable nn.BatchNorm2d"):
        detr_fast.convert(model)
    assert [type(m) for m in model.modules()] == classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert detr_fast.conversion_report(model).folded == 0


def test_save_pretrained_loads_in_plain_transformers(tmp_path):
    model = build_realtime("dfine")
    detr_fast.convert(model)
    model.save_pretrained(tmp_path)
    plain = transformers.DFineForObjectDetection.from_pretrained(tmp_path).eval()
    assert not any(type(m).__module__.startswith("detr_fast") for m in plain.modules())
    pixel_values = _images(seed=2)
    with torch.no_grad():
        got, want = _predictions(plain, pixel_values), _predictions(model, pixel_values)
    assert all(_rel_err(got[k], want[k]) <= 1e-4 for k in want)


def test_training_gradients_as_accurate_as_transformers():
    model = build_realtime("rtdetr-r18")
    exact = copy.deepcopy(model).double()
    converted = copy.deepcopy(model)
    detr_fast.convert(converted)
    pixel_values = _images(seed=3)

    def grads(m, dtype):
        m.train()
        m.zero_grad()
        out = _predictions(m, pixel_values.to(dtype))
        (out["logits"].sum() + out["pred_boxes"].sum()).backward()
        return {k: p.grad.double() for k, p in m.named_parameters() if ".backbone." in k and p.grad is not None}

    want, theirs, ours = grads(exact, torch.float64), grads(model, torch.float32), grads(converted, torch.float32)
    assert ours.keys() == want.keys() == theirs.keys() and len(ours) == 23
    for k in want:
        scale = want[k].abs().max().clamp_min(1e-30)
        err_ours = float((ours[k] - want[k]).abs().max() / scale)
        err_theirs = float((theirs[k] - want[k]).abs().max() / scale)
        assert err_ours <= max(4 * err_theirs, 1e-5), (k, err_ours, err_theirs)


# ---------------------------------------------------------------- HGNetV2's concatenations

def _count_piecewise_calls(monkeypatch, threshold: int = 0):
    """Make every concatenation 'large' (threshold bytes) and count the piecewise convolutions."""
    from detr_fast.fold import fused_conv, onednn
    calls = []
    piecewise = onednn.conv_pieces
    monkeypatch.setattr(fused_conv, "FRESH_PAGES_BYTES", threshold)
    monkeypatch.setattr(onednn, "conv_pieces",
                        lambda pieces, *args: calls.append(len(pieces)) or piecewise(pieces, *args))
    return calls


@pytest.mark.parametrize("shape", [(1, 3, 45, 77), (2, 3, 64, 64)])
def test_hgnet_concatenations_convolved_piece_by_piece_match_transformers(monkeypatch, shape):
    model = build_realtime("dfine")
    reference = copy.deepcopy(model.model.backbone)
    detr_fast.convert(model)
    pixel_values = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(shape[0], *shape[2:])
    calls = _count_piecewise_calls(monkeypatch)
    with torch.no_grad():
        got = [f for f, _ in model.model.backbone(pixel_values, mask)]
        want = [f for f, _ in reference(pixel_values, mask)]
    # The stem's two branches, then each basic layer's input and its conv units' outputs.
    layers = [b for stage in model.model.backbone.model.encoder.stages for b in stage.blocks]
    assert calls == [2] + [1 + len(b.layers) for b in layers]
    for f, w in zip(got, want):
        assert f.shape == w.shape and f.stride() == w.stride() and _rel_err(f, w) <= 1e-5


def test_hgnet_small_concatenations_stay_concatenations(monkeypatch):
    model = build_realtime("dfine")
    detr_fast.convert(model)
    calls = _count_piecewise_calls(monkeypatch, threshold=32 * 2**20)
    with torch.no_grad():
        model.model.backbone(torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64))
    assert calls == []


def test_hgnet_pieces_only_without_graph_and_hooks(monkeypatch):
    model = build_realtime("dfine")
    detr_fast.convert(model)
    stem = model.model.backbone.model.embedder
    calls = _count_piecewise_calls(monkeypatch)
    pixel_values = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)  # as the encoder runs it
    stem(pixel_values).sum().backward()  # training: transformers' own computation
    assert calls == [] and stem.stem3.convolution.weight.grad is not None
    seen = []
    stem.stem3.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        stem(pixel_values)
    assert calls == [] and seen == [stem.stem3.convolution.in_channels]  # the hook saw the concatenation


def test_conv_bn_pieces_equals_bn_of_conv_of_the_concatenation(monkeypatch):
    from detr_fast.fold.fused_conv import conv_bn_pieces
    gen = torch.Generator().manual_seed(6)
    conv = torch.nn.Conv2d(13, 6, 3, stride=2, padding=1, bias=False)
    bn = detr_fast.FrozenBatchNorm2d(6)
    for buffer in (bn.weight, bn.bias, bn.running_mean):
        buffer.copy_(torch.randn(6, generator=gen))
    bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    pieces = [torch.randn(2, c, 9, 7, generator=gen).contiguous(memory_format=torch.channels_last) for c in (8, 5)]
    calls = _count_piecewise_calls(monkeypatch)
    with torch.no_grad():
        got = conv_bn_pieces(pieces, conv, bn, relu=True)
        y = conv(torch.cat(pieces, dim=1))
        scale = bn.weight / (bn.running_var + 1e-5).sqrt()
        want = (y * scale[:, None, None] + (bn.bias - bn.running_mean * scale)[:, None, None]).relu()
    assert calls == [2] and _rel_err(got, want) <= 1e-5


def test_hgnet_layer_with_a_hooked_aggregation_concatenates(monkeypatch):
    model = build_realtime("dfine")
    detr_fast.convert(model)
    layer = model.model.backbone.model.encoder.stages[0].blocks[0]
    seen = []
    layer.aggregation[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    calls = _count_piecewise_calls(monkeypatch)
    x = torch.randn(1, layer.layers[0].convolution.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        layer(x)
    assert calls == [] and seen == [layer.aggregation[0].convolution.in_channels]


def test_hgnet_modules_edited_after_conversion_compute_what_they_hold(monkeypatch):
    model = build_realtime("dfine")
    reference = copy.deepcopy(model.model.backbone)
    detr_fast.convert(model)
    backbone = model.model.backbone
    # A replaced stem3 (now a structure no recipe knows) and a layer's aggregation with one more module.
    backbone.model.embedder.stem3 = torch.nn.Sequential(copy.deepcopy(reference.model.embedder.stem3))
    reference.model.embedder.stem3 = torch.nn.Sequential(reference.model.embedder.stem3)
    for m in (backbone, reference):
        m.model.encoder.stages[0].blocks[0].aggregation.append(torch.nn.Hardtanh(-0.5, 0.5))
    calls = _count_piecewise_calls(monkeypatch)
    pixel_values, mask = torch.randn(1, 3, 64, 64), torch.ones(1, 64, 64)
    for again in (False, True):
        if again:
            detr_fast.convert(model)  # unfolds what no recipe knows any more
        with torch.no_grad():
            got = [f for f, _ in backbone(pixel_values, mask)]
            want = [f for f, _ in reference(pixel_values, mask)]
        assert all(_rel_err(f, w) <= 1e-5 for f, w in zip(got, want))
    assert calls and 2 not in calls  # the other layers still run piecewise; the stem does not
    edited = backbone.model.encoder.stages[0].blocks[0]
    assert type(edited) is type(reference.model.encoder.stages[0].blocks[0])  # unfolded by the second convert


def test_conv_bn_pieces_falls_back_where_the_concatenation_is_needed(monkeypatch):
    from detr_fast.fold.fused_conv import conv_bn_pieces
    conv, bn = torch.nn.Conv2d(13, 6, 1, bias=False), detr_fast.FrozenBatchNorm2d(6)
    calls = _count_piecewise_calls(monkeypatch)
    cl = torch.channels_last
    with torch.no_grad():
        with pytest.raises(RuntimeError):  # 11 channels into a 13-channel conv, as PyTorch raises
            conv_bn_pieces([torch.randn(1, 8, 5, 5).contiguous(memory_format=cl),
                            torch.randn(1, 3, 5, 5).contiguous(memory_format=cl)], conv, bn)
        conv_bn_pieces([torch.randn(1, 8, 5, 5), torch.randn(1, 5, 5, 5)], conv, bn)  # NCHW
        bf16 = [torch.randn(1, c, 5, 5, dtype=torch.bfloat16).contiguous(memory_format=cl) for c in (8, 5)]
        conv_bn_pieces(bf16, copy.deepcopy(conv).bfloat16(), copy.deepcopy(bn).bfloat16())  # rounds once
    assert calls == []


def test_hgnet_stem_with_a_channel_mismatch_raises():
    model = build_realtime("dfine")
    detr_fast.convert(model)
    with pytest.raises(ValueError, match="channel"):  # as transformers raises
        model.model.backbone.model.embedder(torch.randn(1, 4, 32, 32))
