"""Tests of detr_fast/conversion/: convert() against the unconverted model of each family (its own library or
a stand-in of it)."""
