"""Tests of detr_fast/sine/ and kernels/: the reference against hand-computed values, the fallback and the
kernels against the reference."""
