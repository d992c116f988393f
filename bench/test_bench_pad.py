"""Padding a list of images into a batch and its mask: nested_tensor_from_tensor_list vs the
reference's zero fill + copies."""
STAGE = "pad"


def test_pad(run_stage, case, impl):
    run_stage(case, impl)
