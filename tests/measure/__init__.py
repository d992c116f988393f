"""Tests of detr_fast/measure/ and bench/: the profile, the stages the benchmarks time."""
