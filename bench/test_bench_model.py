"""Whole detectors, full forward: transformers' DetrForObjectDetection (default config: timm
ResNet-50) and RTDetrForObjectDetection (RT-DETR-R50), random weights (detr_fast.measure.model_zoo).

On CPU: DETR on two 400x600 images with their pixel_mask (issue 10's target), RT-DETR on one 640x640
image; on CUDA: DETR's pair (800x1066, 750x1333) and 640x640. Implementations: the model as
transformers runs it (reference), detr_fast.convert of a deep copy with the same weights
(detr_fast), torch.compile of the reference (compile; inductor's freezing on CPU); the error of a
row is the larger relative error of its logits and boxes against the float32 reference. Skipped
with the reason without transformers (the 'hf' extra). Pick other detectors with
--bench-models detr,deformable-detr,rtdetr,dfine; select these rows with -k model.
"""
STAGE = "model"


def test_model(run_stage, case, impl):
    run_stage(case, impl)
