"""Which transformers releases convert() handles, and how.

- Every family the tests know (DETR, Conditional DETR, Deformable DETR, Table Transformer, DAB-DETR,
  DETR for segmentation, RT-DETR, RT-DETRv2, D-FINE, and the model zoo's detectors) converts
  completely: a new transformers release that changes a family so that convert() no longer folds
  all of its backbone or no longer swaps its sine embedding fails here (a slower model would pass
  every output test).
- A transformers older than the declared floor (TRANSFORMERS_FLOOR; setup.py's 'hf' extra says the
  same) is left as it was, with the reason in the report and a warning.

CI runs these (marked `transformers`, as every test that needs transformers) twice: under the
newest release and under the floor.
"""
import sys
import warnings

import pytest
import torch

import detr_fast
from detr_fast.conversion.transformers import TRANSFORMERS_FLOOR, is_sine_embedding, release
from detr_fast.measure import model_zoo
from tests.hf_models import build, build_realtime, inputs, outputs, transformers

pytestmark = pytest.mark.transformers

SINE_SWAP = " -> detr_fast.TransformersSineEmbedding"  # also matches ...Legacy
ENCODER_SWAP = "runs its folded backbone in channels_last"

# name -> (builder, conv+BN pairs folded, sine embeddings swapped). The real-time DETRs have no sine
# embedding module (theirs is mask-free and computed inside the encoder).
FAMILY_TABLE = {
    "detr": (lambda: build("detr", "timm-resnet18"), 20, 1),
    "detr-hf-resnet50": (lambda: build("detr", "hf-resnet50"), 53, 1),  # transformers' own ResNet
    "conditional-detr": (lambda: build("conditional", "timm-resnet18"), 20, 1),
    "deformable-detr": (lambda: build("deformable", "timm-resnet18"), 20, 1),
    "table-transformer": (lambda: build("table", "timm-resnet18"), 20, 1),
    "dab-detr": (lambda: build("dab", "timm-resnet18"), 20, 1),
    "detr-segmentation": (lambda: build("detr_segmentation", "timm-resnet18"), 20, 1),
    "rtdetr-r50": (lambda: build_realtime("rtdetr-r50"), 55, 0),
    "rtdetr-r18": (lambda: build_realtime("rtdetr-r18"), 23, 0),
    "rtdetr-v2": (lambda: build_realtime("rtdetr-v2"), 55, 0),
    "dfine": (lambda: build_realtime("dfine"), 42, 0),
    "zoo-detr": (lambda: model_zoo.build("detr", tiny=True), 20, 1),
    "zoo-deformable-detr": (lambda: model_zoo.build("deformable-detr", tiny=True), 20, 1),
    "zoo-rtdetr": (lambda: model_zoo.build("rtdetr", tiny=True), 23, 0),
    "zoo-dfine": (lambda: model_zoo.build("dfine", tiny=True), 42, 0),
}


def test_the_table_covers_the_model_zoo():
    assert {name for name in FAMILY_TABLE if name.startswith("zoo-")} == {f"zoo-{n}" for n in model_zoo.MODELS}


@pytest.mark.parametrize("name", list(FAMILY_TABLE))
def test_every_family_converts_completely(name):
    builder, folded, sines = FAMILY_TABLE[name]
    model = builder()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a supported family converts without a warning
        detr_fast.convert(model)
    report = detr_fast.conversion_report(model)
    assert report.folded == folded, str(report)
    assert not report.skipped, str(report)
    assert sum(ENCODER_SWAP in line for line in report.swapped) == 1, str(report)
    assert sum(SINE_SWAP in line for line in report.swapped) == sines, str(report)
    assert not [type(m).__name__ for m in model.modules() if is_sine_embedding(m)], str(report)


def test_installed_transformers_is_not_older_than_the_floor():
    assert release(transformers.__version__) >= release(TRANSFORMERS_FLOOR), transformers.__version__


def _pretend_version(monkeypatch, version: str) -> None:
    # convert() reads the version of the transformers in sys.modules; transformers replaces that
    # module object as it builds models (5.25 does), so patch the one there now, after building.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


@pytest.mark.parametrize("version", ["5.16.2", "4.57.1", "not a version"])
def test_older_transformers_is_left_as_it_was_with_the_reason(monkeypatch, version):
    model = build("detr", "timm-resnet18")
    pixel_values, pixel_mask = inputs()
    with torch.no_grad():
        expected = outputs(model, pixel_values, pixel_mask)
    classes = [type(m) for m in model.modules()]
    _pretend_version(monkeypatch, version)
    why = "older than " + TRANSFORMERS_FLOOR if release(version) else "a version detr_fast cannot read"
    with pytest.warns(UserWarning, match=f"transformers {version}, {why}") as caught:
        detr_fast.convert(model)
    assert len([w for w in caught if "detr_fast.convert" in str(w.message)]) == 2  # the encoder, the embedding
    report = detr_fast.conversion_report(model)
    assert not report and report.folded == 0
    assert [path for path, _ in report.skipped] == ["model.backbone", "model.position_embedding"]
    assert all(f">= {TRANSFORMERS_FLOOR}" in reason for _, reason in report.skipped)
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        got = outputs(model, pixel_values, pixel_mask)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    monkeypatch.undo()  # the installed transformers: the same model converts
    detr_fast.convert(model)
    assert detr_fast.conversion_report(model).folded == 20


@pytest.mark.parametrize("version", [TRANSFORMERS_FLOOR, "5.17.1", "5.30.0.dev0", "6.0.0"])
def test_the_floor_and_newer_releases_convert(monkeypatch, version):
    model = build("detr", "timm-resnet18")
    _pretend_version(monkeypatch, version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        detr_fast.convert(model)
    assert detr_fast.conversion_report(model).folded == 20
