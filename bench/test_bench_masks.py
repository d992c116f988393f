"""Downsampling the padding mask to one level (strides 8, 16, 32): nearest interpolation of a bool mask.

detr_fast's row is its masks computed alone (on CPU from the image sizes, without reading the mask);
on CUDA that is the reference's own function, so the row is skipped: its fused version is masks_pos.
"""
STAGE = "masks"


def test_masks(run_stage, case, impl):
    run_stage(case, impl)
