"""The ResNet-50 body with frozen BatchNorm: layer4 alone (DETR) and layers 2-4 (Deformable-DETR)."""
STAGE = "backbone"


def test_backbone(run_stage, case, impl):
    run_stage(case, impl)
