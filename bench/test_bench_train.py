"""One training step of the Joiner as DETR trains it (lr_backbone > 0: layers 2-4 trainable, frozen
BN): forward + backward of a loss over every level's features and position embeddings
(detr_fast.measure.training). Rows: reference, detr_fast (the converted copy) and compile
(torch.compile of the reference's forward + loss; backward through AOTAutograd), float32 and
bfloat16 autocast by default on every device; a CPU without bf16 hardware (avx512_bf16 / amx_bf16)
skips the bf16 rows with the reason. The error of a row is the norm-wise worst relative gradient
error against the float32 reference's; peak memory per step in extra_info (CPU: the profiler's
memory events). Select with -k train.
"""
STAGE = "train"


def test_train(run_stage, case, impl):
    run_stage(case, impl)
