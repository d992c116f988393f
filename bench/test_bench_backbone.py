"""The ResNet-50 body with frozen BatchNorm: layer4 alone (DETR) and layers 2-4 (Deformable-DETR).

Beside the reference and detr_fast: torch.compile of the reference (with inductor's freezing on CPU)
and, on CPU, the reference exported to ONNX and run by ONNX Runtime (when onnxruntime is installed).
"""
STAGE = "backbone"


def test_backbone(run_stage, case, impl):
    run_stage(case, impl)
