"""The sine position embedding of one level's mask (strides 8, 16, 32), cast to the features' dtype."""
STAGE = "pos"


def test_pos(run_stage, case, impl):
    run_stage(case, impl)
