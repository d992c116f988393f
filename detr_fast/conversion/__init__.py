"""convert(): existing models (upstream DETR code, transformers) wired to detr_fast, one table per family.

(Named conversion, not convert, so that the package never hides the function detr_fast.convert.)
"""
from .api import conversion_report, convert
from .machinery import ConversionReport

__all__ = ["ConversionReport", "conversion_report", "convert"]
