"""Tests of detr_fast/fold/: frozen BN, the fold, the fused convolutions."""
