"""Checks of user-supplied inputs, each raising a TypeError/ValueError that names the argument."""
import math
from typing import Any

import torch
from torch import Tensor, nn

from .dispatch import compiling


def check_module(value: Any, name: str = "module") -> None:
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be an nn.Module, got {type(value).__name__}")


def check_eps(value: Any, name: str = "eps") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_nested_tensor(value: Any, name: str = "tensor_list") -> None:
    """TypeError unless ``value`` looks like a NestedTensor (detr_fast's, DETR's or any class with
    ``.tensors`` and ``.mask``): the most common mistake is passing the list of images, or the
    padded tensor alone, where the padded batch with its mask is expected."""
    if hasattr(value, "tensors") and hasattr(value, "mask"):
        return
    hint = ""
    if isinstance(value, (list, tuple)):
        hint = " (pad a list of images with detr_fast.nested_tensor_from_tensor_list first)"
    elif isinstance(value, Tensor):
        hint = " (wrap the padded batch with its mask: detr_fast.NestedTensor(images, mask))"
    raise TypeError(f"{name} must be a NestedTensor with .tensors and .mask, got {type(value).__name__}{hint}")


def check_mask(mask: Any, name: str = "mask") -> None:
    """ValueError unless ``mask`` is a 3-D (B x H x W) bool tensor."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = padding), got dtype {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B x H x W), got shape {tuple(mask.shape)}")


def check_image_sizes(image_sizes: Any, mask: Tensor, name: str = "image_sizes") -> None:
    """ValueError unless ``image_sizes`` is an integer B x 2 tensor of (h, w) that fit the mask."""
    batch, height, width = mask.shape
    if not isinstance(image_sizes, Tensor) or image_sizes.dtype.is_floating_point \
            or image_sizes.dtype == torch.bool or image_sizes.is_complex():
        raise ValueError(f"{name} must be an integer tensor of per-image (h, w), got {image_sizes!r}")
    if tuple(image_sizes.shape) != (batch, 2):
        raise ValueError(f"{name} must have shape ({batch}, 2) to match the mask, got {tuple(image_sizes.shape)}")
    # Values are checked on the host only: reading device memory would synchronize, and a
    # compiled graph cannot branch on them.
    if image_sizes.device.type == "cpu" and not compiling():
        for b, (h, w) in enumerate(image_sizes.tolist()):
            if not (0 <= h <= height and 0 <= w <= width):
                raise ValueError(f"{name}[{b}] = ({h}, {w}) does not fit the {height} x {width} mask")
