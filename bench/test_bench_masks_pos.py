"""One level of the Joiner after the backbone: the mask downsampled to the level and its position
embedding in the features' dtype (detr_fast: Joiner.masks_and_pos, one fused step)."""
STAGE = "masks_pos"


def test_masks_pos(run_stage, case, impl):
    run_stage(case, impl)
