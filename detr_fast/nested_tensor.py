"""NestedTensor: a padded batch of images and its padding mask.

Same class shape as DETR's ``util.misc.NestedTensor`` (and scriptable like it), plus one optional
piece of metadata: ``image_sizes``, the (height, width) of every image before padding, as a CPU
int64 tensor of shape B x 2. nested_tensor_from_tensor_list fills it in. With it the kernels know
that the mask is a top-left rectangle per image and never need to read the mask or synchronize
with the device to find its extent. The sizes are trusted only while the mask is unchanged: the
mask's memory, shape, strides and version counter at creation are recorded, and another mask (or
a view of it) put in its place or an in-place edit of it disables them (except for edits of
inference tensors, which have no version counter).
"""
import warnings
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from .dispatch import compiling

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch.jit.interface is deprecated (TorchScript as a whole is)

    @torch.jit.interface
    class NestedTensorLike:
        """What the scripted entry points of detr_fast's stages take: any NestedTensor class with
        ``decompose() -> (tensors, mask)`` — detr_fast's, or DETR's ``util.misc.NestedTensor``.

        TorchScript's class types are nominal: annotated with detr_fast's NestedTensor, a stage
        scripted inside an upstream model (which passes its own NestedTensor) would not compile.
        An interface is structural. In eager mode the annotation means nothing.
        """

        def decompose(self) -> Tuple[Tensor, Optional[Tensor]]:
            pass


class NestedTensor(object):
    def __init__(self, tensors: Tensor, mask: Optional[Tensor], image_sizes: Optional[Tensor] = None):
        self.tensors = tensors
        self.mask = mask
        self.image_sizes = image_sizes
        # Which mask image_sizes describe, as it was then (_mask_stamp); [] when there are no sizes.
        self.mask_stamp: List[int] = []
        if image_sizes is not None and mask is not None:
            self.mask_stamp = _mask_stamp(mask)

    @torch.jit.unused
    def __reduce__(self) -> Tuple[Any, Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
        # Pickled (e.g. from a DataLoader worker), the mask arrives as a new tensor with another
        # address and version: the sizes travel only if they describe the mask now, and are then
        # recorded against the new mask.
        return NestedTensor, (self.tensors, self.mask, self.rectangular_sizes())

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        cast_tensor = self.tensors.to(device, non_blocking=non_blocking)
        mask = self.mask
        cast_mask: Optional[Tensor] = None
        if mask is not None:
            cast_mask = mask.to(device, non_blocking=non_blocking)
        sizes: Optional[Tensor] = None
        if self.rectangular_sizes() is not None:
            # The sizes stay on the host: they are launch metadata, not data.
            sizes = self.image_sizes
        return NestedTensor(cast_tensor, cast_mask, sizes)

    @torch.jit.unused
    def record_stream(self, *args, **kwargs) -> None:
        self.tensors.record_stream(*args, **kwargs)
        if self.mask is not None:
            self.mask.record_stream(*args, **kwargs)

    def decompose(self) -> Tuple[Tensor, Optional[Tensor]]:
        return self.tensors, self.mask

    def rectangular_sizes(self) -> Optional[Tensor]:
        """The per-image (h, w) if they still describe the mask, else None."""
        sizes = self.image_sizes
        mask = self.mask
        if sizes is None or mask is None:
            return None
        if _mask_stamp(mask) != self.mask_stamp:
            return None  # edited in place, or another mask (or a view of it) put in its place
        return sizes

    def __repr__(self) -> str:
        return str(self.tensors)


def trusted_image_sizes(tensor_list: Any) -> Optional[Tensor]:
    """The NestedTensor's per-image sizes if they still describe its mask, else None."""
    if not isinstance(tensor_list, NestedTensor):
        return None  # a duck-typed NestedTensor (e.g. the upstream class) carries no sizes
    if compiling():
        # Dynamo cannot follow the mask's version counter; a compiled model trusts the sizes
        # nested_tensor_from_tensor_list recorded (documented in docs/api.md).
        return tensor_list.image_sizes
    return tensor_list.rectangular_sizes()


def nested_like(template: Any, tensors: Tensor, mask: Optional[Tensor],
                image_sizes: Optional[Tensor] = None) -> Any:
    """A padded batch of ``template``'s class: a converted stage given upstream's NestedTensor
    returns upstream's class (code downstream may check isinstance or call its own methods);
    detr_fast's class keeps the image sizes."""
    cls = type(template)
    if cls is NestedTensor or not (hasattr(template, "tensors") and hasattr(template, "mask")):
        return NestedTensor(tensors, mask, image_sizes)
    try:
        return cls(tensors, mask)
    except TypeError:  # a class with another constructor: detr_fast's has the same fields
        return NestedTensor(tensors, mask, image_sizes)


@torch.jit.unused
def script_nested_tensor() -> None:
    """Compile detr_fast's NestedTensor as a TorchScript class (once; a scripted stage's
    ``__prepare_scriptable__`` calls it). TorchScript hands a Python object to a NestedTensorLike
    argument only if the object's class is compiled: without this a stage scripted on its own (an
    embedding, say) could not be called with detr_fast's NestedTensor."""
    if not _SCRIPTED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            torch.jit.script(NestedTensor)
        _SCRIPTED.append(True)


_SCRIPTED: List[bool] = []


def _mask_stamp(t: Tensor) -> List[int]:
    """Version counter, address, shape and strides: an in-place edit changes the first, a mask (or
    a view of it) put in the place of another one of the others."""
    # Neither TorchScript nor Dynamo reads versions or addresses (a graph break): scripted code
    # never uses the sizes (reference path) and compiled code trusts them as recorded
    # (trusted_image_sizes).
    if torch.jit.is_scripting():
        return []
    if compiling():
        return []
    # Inference tensors keep no version counter: under torch.inference_mode an in-place edit of
    # the mask after padding cannot be detected (documented in docs/api.md).
    version = 0 if t.is_inference() else int(t._version)
    return [version, int(t.data_ptr())] + list(t.shape) + list(t.stride())


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Pad C x H x W images to one B x C x Hmax x Wmax batch, zeros at the bottom and right.

    The mask is True on padding. Unlike a zero fill followed by copies, every element of the
    batch is written exactly once: the images are copied in and only the padding is zeroed.
    """
    if not isinstance(tensor_list, (list, tuple)):
        raise TypeError(f"tensor_list must be a list of 3-D tensors, got {type(tensor_list).__name__}")
    if len(tensor_list) == 0:
        raise ValueError("tensor_list must hold at least one image, got an empty list")
    first = tensor_list[0]
    for i, img in enumerate(tensor_list):
        if not isinstance(img, Tensor):
            raise TypeError(f"tensor_list[{i}] must be a torch.Tensor, got {type(img).__name__}")
        if img.dim() != 3:
            raise ValueError(f"tensor_list[{i}] must be 3-D (C x H x W), got shape {tuple(img.shape)}")
        if img.shape[0] != first.shape[0]:
            raise ValueError(
                f"tensor_list[{i}] has {img.shape[0]} channels, expected {first.shape[0]} like tensor_list[0]")
        if img.dtype != first.dtype:
            raise ValueError(f"tensor_list[{i}] has dtype {img.dtype}, expected {first.dtype} like tensor_list[0]")
        if img.device != first.device:
            raise ValueError(f"tensor_list[{i}] is on {img.device}, expected {first.device} like tensor_list[0]")

    sizes = [(int(img.shape[1]), int(img.shape[2])) for img in tensor_list]
    b, c = len(tensor_list), int(first.shape[0])
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    batch = torch.empty((b, c, h, w), dtype=first.dtype, device=first.device)
    mask = torch.ones((b, h, w), dtype=torch.bool, device=first.device)
    for img, pad_img, m, (ih, iw) in zip(tensor_list, batch, mask, sizes):
        pad_img[:, :ih, :iw].copy_(img)
        pad_img[:, ih:, :].zero_()
        pad_img[:, :ih, iw:].zero_()
        m[:ih, :iw] = False
    image_sizes = torch.tensor(sizes, dtype=torch.int64).reshape(b, 2)
    return NestedTensor(batch, mask, image_sizes)
