"""convert() on transformers' DETR family, with transformers itself as the oracle.

Every family (DETR, Conditional DETR, Deformable DETR, Table Transformer, DAB-DETR, DETR for
segmentation) x every backbone (timm ResNet-50 and -18, transformers' ResNet-50), random weights
and random frozen-BN statistics, float32; then DETR on timm ResNet-34, -101, a dilated (DC5)
ResNet-50, a non-ReLU ResNet and ResNets with blocks detr_fast leaves alone.
"""
import copy
import re
import warnings

import pytest
import torch
from torch import nn

import detr_fast
from detr_fast.conversion.transformers_modules import (
    TransformersSineEmbedding,
    TransformersSineEmbeddingLegacy,
)
from tests import hf_models
from tests.hf_models import BACKBONES, FAMILIES, build, inputs, outputs, transformers

pytestmark = pytest.mark.transformers  # CI runs these again under the declared floor of transformers


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _frozen_bn_modules(model: nn.Module):
    return [m for m in model.modules() if "frozenbatchnorm" in type(m).__name__.lower()]


def _sine_modules(model: nn.Module):
    return [m for m in model.modules() if type(m).__name__.endswith("SinePositionEmbedding")]


def _convert_quietly(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported model converts without any warning
        return detr_fast.convert(model)


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_model_matches_transformers(family, backbone):
    model = build(family, backbone)
    pixel_values, pixel_mask = inputs()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: (p, p.requires_grad) for k, p in model.named_parameters()}
    original_sines = _sine_modules(model)
    with torch.no_grad():
        expected = outputs(model, pixel_values, pixel_mask)

    assert _convert_quietly(model) is model
    report = detr_fast.conversion_report(model)
    assert report.folded == (20 if backbone == "timm-resnet18" else 53), str(report)

    calls = []
    for m in _frozen_bn_modules(model) + original_sines:
        m.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        got = outputs(model, pixel_values, pixel_mask)
    assert not calls, "a frozen BN or transformers' sine embedding still runs after conversion"
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].shape == expected[key].shape and got[key].dtype == expected[key].dtype
        assert _rel_err(got[key], expected[key]) <= 1e-4, key
    # Nothing persistent changed: the same keys and values, the same parameter objects and flags.
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {k: (p, p.requires_grad) for k, p in model.named_parameters()} == params


@pytest.mark.parametrize("family", ["detr", "deformable"])
def test_encoder_returns_features_and_masks_as_transformers(family):
    model = build(family, "timm-resnet18")
    encoder = model.model.backbone
    reference = copy.deepcopy(encoder)
    detr_fast.convert(model)
    pixel_values, pixel_mask = inputs(seed=3)
    for pv in (pixel_values, pixel_values.contiguous(memory_format=torch.channels_last)):
        with torch.no_grad():
            got, want = encoder(pv, pixel_mask), reference(pv, pixel_mask)
        assert len(got) == len(want)
        for (f, m), (rf, rm) in zip(got, want):
            assert f.dtype == rf.dtype and f.stride() == rf.stride() and m.dtype == rm.dtype == torch.bool
            assert torch.equal(m, rm) and _rel_err(f, rf) <= 1e-5


def _hf_sine_variants():
    t = transformers
    detr = t.models.detr.modeling_detr.DetrSinePositionEmbedding
    cond = t.models.conditional_detr.modeling_conditional_detr.ConditionalDetrSinePositionEmbedding
    deform = t.models.deformable_detr.modeling_deformable_detr.DeformableDetrSinePositionEmbedding
    table = t.models.table_transformer.modeling_table_transformer.TableTransformerSinePositionEmbedding
    dab = t.models.dab_detr.modeling_dab_detr.DabDetrSinePositionEmbedding
    return {
        "detr": lambda: detr(32, normalize=True), "detr-raw": lambda: detr(16, normalize=False),
        "detr-scale": lambda: detr(24, temperature=20, normalize=True, scale=3.0),
        "conditional": lambda: cond(32, normalize=True),
        "deformable": lambda: deform(32, normalize=True), "deformable-raw": lambda: deform(8, normalize=False),
        "table": lambda: table(32, normalize=True),
        "dab": lambda: dab(t.DabDetrConfig(hidden_size=64)),
        "dab-48": lambda: dab(t.DabDetrConfig(hidden_size=96, temperature_height=10, temperature_width=10)),
        "dab-two-temperatures": lambda: dab(t.DabDetrConfig(hidden_size=96, temperature_height=20,
                                                            temperature_width=7)),
    }


def _masks(seed: int):
    """Masks True on valid pixels: padded rectangles (odd sizes, fully padded rows and columns,
    an image without padding) and arbitrary ones."""
    gen = torch.Generator().manual_seed(seed)
    rect = torch.ones(3, 13, 21, dtype=torch.bool)
    rect[0, 9:] = False
    rect[1, :, 4:] = False
    holes = torch.rand(2, 8, 5, generator=gen) > 0.4
    holes[0, :, 2] = False
    return [rect, holes, torch.ones(1, 1, 30, dtype=torch.bool)]


@pytest.mark.parametrize("variant", list(_hf_sine_variants()))
def test_sine_module_is_bit_identical_to_transformers(variant):
    original = _hf_sine_variants()[variant]()
    holder = nn.Sequential(original)
    _convert_quietly(holder)
    ours = holder[0]
    assert isinstance(ours, (TransformersSineEmbedding, TransformersSineEmbeddingLegacy))
    shape_call = isinstance(ours, TransformersSineEmbedding)
    for mask in _masks(seed=1):
        size = torch.Size([mask.shape[0], 7, *mask.shape[1:]])
        with torch.no_grad():
            if shape_call:
                want, got = original(size, "cpu", torch.float32, mask), ours(size, "cpu", torch.float32, mask)
            else:
                fm = torch.zeros(size)
                want, got = original(fm, mask), ours(fm, mask)
        assert got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(got, want), f"{variant}: max diff {(got - want).abs().max()}"
    if shape_call:  # mask=None: no padding
        size = torch.Size([2, 7, 9, 14])
        assert torch.equal(ours(size, "cpu", torch.float32, None), original(size, "cpu", torch.float32, None))
    # Attributes that code reads on transformers' module are still there.
    for name in ("temperature", "normalize", "num_position_features", "embedding_dim"):
        if hasattr(original, name):
            assert getattr(ours, name) == getattr(original, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_sine_is_more_accurate_than_transformers(dtype):
    """transformers computes the embedding in the model's dtype; detr_fast in float32, rounded
    once. Both against float64 (the README quotes these numbers)."""
    detr = transformers.models.detr.modeling_detr.DetrSinePositionEmbedding
    original = detr(128, normalize=True)
    ours = nn.Sequential(detr(128, normalize=True))
    _convert_quietly(ours)
    mask = torch.ones(2, 25, 42, dtype=torch.bool)
    mask[1, 20:] = False
    mask[1, :, 33:] = False
    size = torch.Size([2, 256, 25, 42])
    truth = original(size, "cpu", torch.float64, mask)
    theirs = (original(size, "cpu", dtype, mask).double() - truth).abs().max().item()
    mine = (ours[0](size, "cpu", dtype, mask).double() - truth).abs().max().item()
    print(f"{dtype}: transformers {theirs:.3g}, detr_fast {mine:.3g} (max abs error against float64)")
    assert mine <= torch.finfo(dtype).eps  # one rounding of values in [-1, 1]
    assert mine < theirs


def test_save_pretrained_loads_in_plain_transformers(tmp_path):
    model = build("detr", "timm-resnet18")
    detr_fast.convert(model)
    model.save_pretrained(tmp_path)
    plain = transformers.DetrForObjectDetection.from_pretrained(tmp_path).eval()
    assert not any(type(m).__module__.startswith("detr_fast") for m in plain.modules())
    pixel_values, pixel_mask = inputs(seed=2)
    with torch.no_grad():
        got, want = outputs(plain, pixel_values, pixel_mask), outputs(model, pixel_values, pixel_mask)
    for key in want:
        assert _rel_err(got[key], want[key]) <= 1e-4


@pytest.mark.parametrize("backbone", ["timm-resnet18", "hf-resnet50"])
def test_training_gradients_as_accurate_as_transformers(backbone):
    """Train mode, grad enabled: the converted model's gradients against a float64 copy of the
    unconverted one are no worse than transformers' own float32 gradients (the fold is then
    recomputed differentiably at every call)."""
    model = build("detr", backbone)
    # transformers' own freezing leaves timm backbones trainable and its ResNet frozen (see the
    # README); train the whole backbone here so that every folded convolution gets a gradient.
    for p in model.parameters():
        p.requires_grad_(True)
    exact = copy.deepcopy(model).double()
    detr_fast_model = copy.deepcopy(model)
    detr_fast.convert(detr_fast_model)
    pixel_values, pixel_mask = inputs(seed=4)

    def grads(m, dtype):
        m.train()
        m.zero_grad()
        out = outputs(m, pixel_values.to(dtype), pixel_mask)
        (out["logits"].sum() + out["pred_boxes"].sum()).backward()
        return {k: p.grad.double() for k, p in m.named_parameters() if "backbone" in k and p.grad is not None}

    want, theirs, ours = grads(exact, torch.float64), grads(model, torch.float32), grads(detr_fast_model, torch.float32)
    assert ours.keys() == want.keys() == theirs.keys()
    assert len(ours) == (53 if "50" in backbone else 20)
    for k in want:
        scale = want[k].abs().max().clamp_min(1e-30)
        err_ours = float((ours[k] - want[k]).abs().max() / scale)
        err_theirs = float((theirs[k] - want[k]).abs().max() / scale)
        assert err_ours <= max(4 * err_theirs, 1e-5), (k, err_ours, err_theirs)


def test_unsupported_backbone_is_left_as_it_was_with_a_warning():
    swin = transformers.SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], out_features=["stage4"])
    model = hf_models.build("detr", "hf-resnet50", backbone_config=swin)
    encoder = model.model.backbone
    classes = [type(m) for m in encoder.modules()]
    with pytest.warns(UserWarning, match="model.backbone: .*no conv \\+ frozen BatchNorm pair"):
        detr_fast.convert(model)
    assert [type(m) for m in encoder.modules()] == classes
    assert "model.backbone" in dict(detr_fast.conversion_report(model).skipped)


def test_dab_with_two_temperatures_is_converted_like_one():
    model = build("dab", "timm-resnet18", temperature_height=20, temperature_width=10)
    pixel_values, pixel_mask = inputs()
    with torch.no_grad():
        expected = outputs(model, pixel_values, pixel_mask)
    _convert_quietly(model)  # no warning
    embedding = model.model.backbone.position_embedding
    assert isinstance(embedding, TransformersSineEmbeddingLegacy)
    assert embedding.params.temperatures == (20.0, 10.0)
    assert (embedding.temperature_height, embedding.temperature_width) == (20, 10)  # its attributes are kept
    report = detr_fast.conversion_report(model)
    assert report.folded == 20 and not report.skipped
    assert any("temperature_w=10.0" in line for line in report.swapped)
    with torch.no_grad():
        got = outputs(model, pixel_values, pixel_mask)
    for key in expected:
        assert _rel_err(got[key], expected[key]) <= 1e-4, key


def test_second_convert_changes_nothing():
    model = build("deformable", "timm-resnet18")
    detr_fast.convert(model)
    classes = [type(m) for m in model.modules()]
    detr_fast.convert(model)
    report = detr_fast.conversion_report(model)
    assert not report and report.folded == 0 and not report.skipped
    assert "already converted" in str(report) and "0 change(s)" not in str(report)
    assert [type(m) for m in model.modules()] == classes


def _timm_detr(**config) -> nn.Module:
    """A tiny DETR on a timm backbone picked by name (the builders' `backbone` argument is the
    test's backbone key, so these configs are spelled out here)."""
    torch.manual_seed(0)
    settings = {**hf_models.TINY, **FAMILIES["detr"][2], "use_pretrained_backbone": False, **config}
    model = transformers.DetrForObjectDetection(transformers.DetrConfig(**settings)).eval()
    hf_models.randomize_backbone(model, 0)
    return model


def _convs(module: nn.Module):
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _assert_same_predictions(model: nn.Module, expected: dict) -> None:
    with torch.no_grad():
        got = outputs(model, *inputs())
    for key in expected:
        assert _rel_err(got[key], expected[key]) <= 1e-4, key


@pytest.mark.parametrize("config", [dict(backbone="resnet34"), dict(backbone="resnet101"), dict(dilation=True)],
                         ids=["resnet34", "resnet101", "resnet50-dc5"])
def test_every_resnet_depth_and_dilation_folds_completely(config):
    model = _timm_detr(**config)
    with torch.no_grad():
        expected = outputs(model, *inputs())
    convs = _convs(model.model.backbone)
    if config.get("dilation"):  # output stride 16: the last stage really is dilated
        assert any(c.dilation == (2, 2) for c in convs)
    _convert_quietly(model)
    assert detr_fast.conversion_report(model).folded == len(convs)  # every conv has its frozen BN
    calls = []
    for m in _frozen_bn_modules(model):
        m.register_forward_hook(lambda *args: calls.append(1))
    _assert_same_predictions(model, expected)
    assert not calls, "a frozen BN still runs after conversion"


def test_non_relu_timm_resnet_keeps_its_activation_apart_from_the_fold():
    model = build("detr", "timm-resnet18")
    for parent in list(model.model.backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.SiLU(inplace=True))
    with torch.no_grad():
        expected = outputs(model, *inputs())
    _convert_quietly(model)
    assert detr_fast.conversion_report(model).folded == 20
    calls = []
    for m in model.model.backbone.modules():
        if isinstance(m, nn.SiLU):
            m.register_forward_hook(lambda *args: calls.append(1))
    _assert_same_predictions(model, expected)
    assert len(calls) == 17  # the stem's and both of every block's: SiLU is never fused as a ReLU


@pytest.mark.parametrize("timm_name, reason, folded", [
    ("seresnet18", "se is SEModule, not absent", 1),  # only the stem: every block has squeeze-excitation
    ("resnet18d", "downsample is Sequential, not Sequential(conv, frozen BN)", 10),  # avg-pool shortcuts
], ids=["seresnet18", "resnet18d"])
def test_blocks_it_cannot_fold_are_left_with_their_reason(timm_name, reason, folded):
    model = _timm_detr(backbone=timm_name)
    with torch.no_grad():
        expected = outputs(model, *inputs())
    with pytest.warns(UserWarning, match=re.escape(reason)):
        detr_fast.convert(model)
    report = detr_fast.conversion_report(model)
    assert report.folded == folded
    assert any(reason in why for _, why in report.skipped)
    _assert_same_predictions(model, expected)


def test_a_hook_inside_a_block_keeps_the_input_it_saw():
    """transformers' residual layer calls its first conv units as modules: a pre-hook there sees the
    block's input, which therefore must not receive the block's residual add."""
    model = build("detr", "hf-resnet50")
    reference = copy.deepcopy(model)
    _convert_quietly(model)
    seen = {}
    for name, m in (("reference", reference), ("converted", model)):
        stage = m.model.backbone.model.encoder.stages[0]
        stage.layers[1].layer[0].register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, (args[0], args[0].clone())))
    x = torch.randn(2, 64, 24, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for m in (reference, model):
            m.model.backbone.model.encoder.stages[0].layers(x.contiguous(memory_format=torch.channels_last))
    for name in seen:
        kept, copied = seen[name]
        assert torch.equal(kept, copied), f"{name}: the input a hook kept was overwritten"


def test_a_one_unit_residual_layer_never_writes_into_what_it_reads():
    model = build("detr", "hf-resnet50", backbone_config=transformers.ResNetConfig(
        layer_type="basic", depths=[3, 1, 1, 1], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"]))
    for layer in model.model.backbone.model.encoder.stages[0].layers[1:]:  # identity shortcuts
        layer.layer = nn.Sequential(layer.layer[1])  # its one unit: conv + BN, no activation
    reference = copy.deepcopy(model)
    _convert_quietly(model)
    # Called as a layer (transformers' stage loops over its layers itself; a user may not).
    x = torch.randn(2, 64, 24, 32, generator=torch.Generator().manual_seed(7))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = reference.model.backbone.model.encoder.stages[0].layers(x)
        got = model.model.backbone.model.encoder.stages[0].layers(x)
    assert _rel_err(got, want) <= 1e-5
