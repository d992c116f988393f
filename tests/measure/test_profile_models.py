"""Whole detectors (detr_fast.measure.model_zoo) and `python -m detr_fast profile --model NAME`: the
builders give models that convert without a warning and keep their outputs, and the profile's
model mode runs end to end, on tiny configurations and small images. Without transformers (the
'hf' extra) these tests skip; bad --model values are tested in test_profile_cli.py."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the whole-detector profile needs the 'hf' extra (transformers)")
pytest.importorskip("timm", reason="the DETR family's default backbone needs the 'hf' extra (timm)")
pytestmark = pytest.mark.transformers  # CI runs these again under the declared floor of transformers

import detr_fast  # noqa: E402
from detr_fast import measure  # noqa: E402
from detr_fast.measure import model_zoo, profile  # noqa: E402
from detr_fast.measure import report as table_report  # noqa: E402
from tests.helpers import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT
CPU = torch.device("cpu")
SCALE = 0.1  # DETR's pair becomes 80x107 and 75x133, the real-time DETRs' image 64x64
MODELS = list(model_zoo.MODELS)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12))


def _frozen_bn_weights(model):
    return [buf for name, buf in model.named_buffers()
            if "backbone" in name and name.endswith(".weight") and buf.dim() == 1]


@pytest.mark.parametrize("name", MODELS)
def test_tiny_models_convert_without_warning_and_keep_their_outputs(name):
    model = model_zoo.build(name, tiny=True)
    assert not model.training
    # Random, non-identity frozen-BN statistics: folding is really exercised.
    weights = _frozen_bn_weights(model)
    assert weights and all(0.75 <= float(w.min()) and float(w.max()) <= 1.25 for w in weights)
    assert any(not torch.allclose(w, torch.ones_like(w)) for w in weights)
    inputs = model_zoo.inputs(name, model_zoo.image_sizes(name, SCALE), CPU)
    assert ("pixel_mask" in inputs) == (model_zoo.spec(name).family == "detr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = measure.make_fast_model(model)
    report = detr_fast.conversion_report(fast)
    assert report.folded > 0 and not report.skipped
    with torch.no_grad():
        expected, got = model(**inputs), fast(**inputs)
    errors = measure.prediction_errors(got, expected)
    assert set(errors) == {"logits", "pred_boxes"}
    assert all(0 <= e <= 1e-4 for e in errors.values()), errors


@pytest.mark.parametrize("name", MODELS)
def test_default_models_are_the_documented_ones(name):
    # The full-size builders: the default config's backbone, randomized; the real-time DETRs'
    # score head biased down (no exact ties in the top-k query selection). Not run: too slow here.
    model = model_zoo.build(name)
    backbone = model_zoo.backbone_of(model).model
    expected_backbone = {"detr": "FeatureListNet", "deformable-detr": "FeatureListNet",
                         "rtdetr": "RTDetrResNetBackbone", "dfine": "HGNetV2Backbone"}[name]
    assert type(backbone).__name__ == expected_backbone
    assert type(model).__name__ == model_zoo.spec(name).model_class
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    if name in ("detr", "deformable-detr", "rtdetr"):
        assert len(convs) in (53, 55)  # ResNet-50 (timm), ResNet-50-vd (its 3-conv stem and avg-pool shortcuts)
    assert (model_zoo.position_embedding_of(model) is not None) == model_zoo.spec(name).has_pos
    weights = _frozen_bn_weights(model)
    assert any(not torch.allclose(w, torch.ones_like(w)) for w in weights)
    if model_zoo.spec(name).family == "realtime":
        assert torch.all(model.model.enc_score_head.bias == -100.0)
        assert not model.model.enc_score_head.weight.any()  # every anchor scores exactly -100: same top-k
        # 640x640 gives enough anchors for the queries; 64x64 does not (the profile says so).
        assert model_zoo.query_check(model, name, model_zoo.image_sizes(name)) is None
        assert "larger" in model_zoo.query_check(model, name, model_zoo.image_sizes(name, SCALE))


def test_inputs_follow_the_image_processors():
    sizes = model_zoo.image_sizes("detr", SCALE, batch=2)
    assert sizes == [(80, 107), (75, 133)] * 2
    inputs = model_zoo.inputs("detr", sizes, CPU)
    assert inputs["pixel_values"].shape == (4, 3, 80, 133)
    mask = inputs["pixel_mask"]
    assert mask.dtype == torch.int64 and mask.shape == (4, 80, 133)
    assert int(mask[0].sum()) == 80 * 107 and int(mask[1].sum()) == 75 * 133
    assert torch.all(inputs["pixel_values"][0, :, :, 107:] == 0)  # zero padding
    realtime = model_zoo.inputs("rtdetr", model_zoo.image_sizes("rtdetr", 0.2, batch=3), CPU)
    assert list(realtime) == ["pixel_values"] and realtime["pixel_values"].shape == (3, 3, 128, 128)
    pixel_values, ones = model_zoo.backbone_inputs(realtime)
    assert ones.dtype == torch.int64 and ones.shape == (3, 128, 128) and bool(ones.all())
    with pytest.raises(ValueError, match="unpadded"):
        model_zoo.inputs("rtdetr", [(64, 64), (64, 32)], CPU)
    with pytest.raises(ValueError, match="model"):
        model_zoo.spec("yolo")


@pytest.mark.parametrize("name", ["detr", "rtdetr"])
def test_model_profile_runs_end_to_end(name):
    report = profile.run_model_profile(name, CPU, 1, "float32", SCALE, reps=2, min_time=0.0, tiny=True)
    rows = report["stages"]
    expected_rows = ["backbone", "pos", "total"] if name == "detr" else ["backbone", "total"]
    assert list(rows) == expected_rows
    assert rows["total"]["stage"] == measure.MODEL_STAGE
    for row_name, row in rows.items():
        assert row["reference_ms"] > 0 and row["detr_fast_ms"] > 0, row_name
        assert row["speedup_p25"] <= row["speedup"] <= row["speedup_p75"], row_name
        assert row["pairs"] == 2 and not row["same_function"], row_name
    assert rows["backbone"]["max_error"] <= 1e-4 and rows["total"]["max_error"] <= 1e-4
    if name == "detr":
        assert rows["pos"]["max_error"] <= 2e-5
    assert set(rows["total"]["errors"]) == {"logits", "pred_boxes"}
    assert rows["total"]["max_error"] == max(rows["total"]["errors"].values())
    # The backbone's share, timed inside the very forwards of the total row (forward hooks).
    share = report["backbone_share"]
    assert set(share) == {"reference", "detr_fast"} and all(0 < v < 1 for v in share.values())
    for side, inside in report["backbone_in_forward"].items():
        assert inside["share"] == share[side] and 0 < inside["backbone_ms"] and 0 < inside["rest_ms"]
        assert inside["backbone_ms"] + inside["rest_ms"] <= 1.5 * rows["total"][f"{side}_ms"]
    assert report["model"] == name and report["tiny"] and report["padded"] == (name == "detr")
    assert report["batch"] == (2 if name == "detr" else 1)
    assert "folded" in report["conversion"]
    table = table_report.format_table(report)
    assert f"model: {name} = " in table and "backbone share of the forward" in table
    assert "differ from the backbone row" in table  # two measurements, and the line says why they differ
    assert "logits" in table and "pred_boxes" in table


def test_model_profile_command_line(tmp_path):
    report_path, trace_path = tmp_path / "report.json", tmp_path / "trace.json"
    env = dict(os.environ)
    env.pop("DETR_FAST_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "detr_fast", "profile", "--model", "deformable-detr", "--tiny",
                           "--device", "cpu", "--scale", str(SCALE), "--reps", "1", "--json", str(report_path),
                           "--trace", str(trace_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for row in ("backbone", "pos", "total"):
        assert any(line.startswith(row + " ") for line in lines), proc.stdout
    assert any(line.startswith("backbone share of the forward") for line in lines), proc.stdout
    report = json.loads(report_path.read_text())
    assert report["model"] == "deformable-detr" and report["image_sizes"] == [[80, 107], [75, 133]]
    assert list(report["stages"]) == ["backbone", "pos", "total"]
    names = {event.get("name") for event in json.loads(trace_path.read_text())["traceEvents"]}
    assert {f"{impl}/{row}" for impl in ("reference", "detr_fast") for row in ("backbone", "pos", "total")} <= names
