"""Triton kernels and their launchers (installed as detr_fast.kernels): tensors in, tensors out."""
from .sine_embedding import sine_embedding_general, sine_embedding_rect

__all__ = ["sine_embedding_general", "sine_embedding_rect"]
