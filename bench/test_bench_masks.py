"""Downsampling the padding mask to one level (strides 8, 16, 32): nearest interpolation of a bool mask."""
STAGE = "masks"


def test_masks(run_stage, case, impl):
    run_stage(case, impl)
