"""The whole stage: images -> padded batch -> backbone -> per-level masks and position embeddings."""
STAGE = "joiner"


def test_joiner(run_stage, case, impl):
    run_stage(case, impl)
