"""Position embeddings of DETR: the sine one (the kernels' target) and the learned one."""
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .dispatch import backend_for_device, check_backend, compiling, requested_backend
from .nested_tensor import NestedTensor
from .reference import learned_embedding_reference, sine_embedding_reference
from .sine_separable import rectangle_sizes, sine_embedding_separable

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_mask(mask: Tensor, name: str = "mask") -> None:
    """ValueError unless ``mask`` is a 3-D (B x H x W) bool tensor."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = padding), got dtype {mask.dtype}")
    if mask.dim() != 3:
        raise ValueError(f"{name} must be 3-D (B x H x W), got shape {tuple(mask.shape)}")


def check_image_sizes(image_sizes: Tensor, mask: Tensor, name: str = "image_sizes") -> None:
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


def rectangular_sizes(tensor_list: NestedTensor) -> Optional[Tensor]:
    """The NestedTensor's per-image sizes if they still describe its mask, else None."""
    if not isinstance(tensor_list, NestedTensor):
        return None  # a duck-typed NestedTensor (e.g. the upstream class) carries no sizes
    if compiling():
        # Dynamo cannot follow the mask's version counter; a compiled model trusts the sizes
        # nested_tensor_from_tensor_list recorded (documented in the README).
        return tensor_list.image_sizes
    return tensor_list.rectangular_sizes()


def sine_path(backend: str, device: torch.device) -> str:
    """Which implementation the sine embedding runs for ``backend`` on ``device``: "triton" (the
    kernels), "reference" (asked for: backend "torch", DETR_FAST_BACKEND=torch or exporting; or
    traced by torch.compile) or "separable" (the PyTorch fallback, for rectangular masks)."""
    requested = requested_backend(backend)
    if backend_for_device(requested, device) == "triton":
        return "triton"
    if requested == "torch" or compiling():
        return "reference"
    return "separable"


def _sine_dispatch(mask: Tensor, image_sizes: Optional[Tensor], num_pos_feats: int, temperature: float,
                   normalize: bool, scale: float, offset: float, eps: float, dtype: torch.dtype,
                   backend: str) -> Tensor:
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype must be one of {_OUT_DTYPES}, got {dtype}")
    batch, height, width = mask.shape
    if image_sizes is not None:
        check_image_sizes(image_sizes, mask)
    path = sine_path(backend, mask.device)
    if path == "triton":
        from .ops import sine_masks_pos
        return sine_masks_pos(mask, image_sizes, height, width, num_pos_feats, temperature, normalize, scale,
                              offset, eps, dtype, False)[1]
    args = (num_pos_feats, temperature, normalize, scale, offset, eps)
    if path == "reference":
        pos = sine_embedding_reference(mask, *args)
    else:
        # The separable fallback; a CPU mask can be checked for rectangularity cheaply.
        sizes = image_sizes
        if sizes is None and mask.device.type == "cpu":
            sizes = rectangle_sizes(mask)
        if sizes is None:
            pos = sine_embedding_reference(mask, *args)
        else:
            pos = sine_embedding_separable(sizes, height, width, *args, device=mask.device)
    return pos if dtype == torch.float32 else pos.to(dtype)


def sine_position_embedding(mask: Tensor, num_pos_feats: int = 64, temperature: float = 10000,
                            normalize: bool = False, scale: Optional[float] = None, *, offset: float = 0.0,
                            eps: float = 1e-6, image_sizes: Optional[Tensor] = None,
                            dtype: torch.dtype = torch.float32, backend: str = "auto") -> Tensor:
    """Functional PositionEmbeddingSine: the B x 2F x H x W embedding of a B x H x W bool mask.

    ``image_sizes`` (optional, CPU integer B x 2): each image's valid (h, w), promising the mask is
    that top-left rectangle — the kernels then never read the mask. ``dtype``: float32, or
    bfloat16/float16 computed in float32 and rounded once. ``backend`` as for the module.
    """
    module = PositionEmbeddingSine(num_pos_feats, temperature, normalize, scale, offset=offset, eps=eps,
                                   backend=backend)
    check_mask(mask)
    return module.embed(mask, image_sizes, dtype)


class PositionEmbeddingSine(nn.Module):
    """Sine position embedding of a padding mask, as in DETR (offset=0.0) and Deformable-DETR
    (offset=-0.5, normalize=True).

    forward(NestedTensor) -> B x 2*num_pos_feats x H x W float32, a permuted view of a contiguous
    B x H x W x 2F buffer, exactly like the reference.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: Optional[float] = None, *, offset: float = 0.0, eps: float = 1e-6,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(num_pos_feats, int) or isinstance(num_pos_feats, bool) or num_pos_feats <= 0 \
                or num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even int, got {num_pos_feats!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_pos_feats = num_pos_feats
        self.temperature = float(temperature)
        self.normalize = bool(normalize)
        self.scale = float(2 * math.pi if scale is None else scale)
        self.offset = float(offset)
        self.eps = float(eps)
        self.backend = check_backend(backend)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs tensor_list.mask, got a NestedTensor without a mask")
        if torch.jit.is_scripting():
            return self.reference(mask)
        return self._forward_eager(tensor_list)

    def reference(self, mask: Tensor) -> Tensor:
        """The reference computation for a B x H x W bool mask."""
        return sine_embedding_reference(mask, self.num_pos_feats, self.temperature, self.normalize,
                                        self.scale, self.offset, self.eps)

    @torch.jit.unused
    def _forward_eager(self, tensor_list: NestedTensor) -> Tensor:
        mask = tensor_list.mask
        assert mask is not None
        check_mask(mask, "tensor_list.mask")
        tensors = tensor_list.tensors
        if isinstance(tensors, Tensor) and tensors.dim() > 0 and tensors.shape[0] != mask.shape[0]:
            raise ValueError(f"tensor_list.mask has batch {mask.shape[0]} but tensor_list.tensors has batch "
                             f"{tensors.shape[0]}; expected the same")
        return self.embed(mask, rectangular_sizes(tensor_list), torch.float32)

    @torch.jit.unused
    def uses_kernels(self, device: torch.device) -> bool:
        """Whether forward runs the Triton kernels for tensors on ``device``."""
        return sine_path(self.backend, device) == "triton"

    @torch.jit.unused
    def uses_separable(self, device: torch.device) -> bool:
        """Whether forward runs the separable PyTorch fallback (for rectangular masks) on ``device``:
        not the kernels, and neither the reference path the user asked for nor a compiled region."""
        return sine_path(self.backend, device) == "separable"

    @torch.jit.unused
    def embed(self, mask: Tensor, image_sizes: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """This module's embedding of a checked B x H x W bool mask, in ``dtype`` (computed in
        float32, rounded once). ``image_sizes``: the images' valid (h, w) if the mask is known
        to be rectangular (CPU int64 B x 2), else None."""
        return _sine_dispatch(mask, image_sizes, self.num_pos_feats, self.temperature, self.normalize,
                              self.scale, self.offset, self.eps, dtype, self.backend)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}, offset={self.offset}, eps={self.eps}, "
                f"backend={self.backend!r}")


class PositionEmbeddingLearned(nn.Module):
    """Absolute position embedding learned per row and per column (at most 50 of each).

    Takes a NestedTensor (as DETR) or a Tensor (as the seed); returns B x 2F x H x W.
    """

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        if not isinstance(num_pos_feats, int) or isinstance(num_pos_feats, bool) or num_pos_feats <= 0:
            raise ValueError(f"num_pos_feats must be a positive int, got {num_pos_feats!r}")
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: Union[NestedTensor, Tensor]) -> Tensor:
        if isinstance(tensor_list, NestedTensor):
            x = tensor_list.tensors
        else:
            x = tensor_list
        h, w = x.shape[-2], x.shape[-1]
        if h > 50 or w > 50:
            raise ValueError("PositionEmbeddingLearned supports feature maps of at most 50 x 50 "
                             "(its embedding tables have 50 rows and 50 columns)")
        return learned_embedding_reference(self.row_embed.weight, self.col_embed.weight, x.shape[0], h, w)


def build_position_encoding(args) -> nn.Module:
    """From args.hidden_dim and args.position_embedding ('v2'/'sine' or 'v3'/'learned')."""
    hidden_dim = getattr(args, "hidden_dim", None)
    if not isinstance(hidden_dim, int) or hidden_dim <= 0 or hidden_dim % 2 != 0:
        raise ValueError(f"args.hidden_dim must be a positive even int, got {hidden_dim!r}")
    n_steps = hidden_dim // 2
    kind = getattr(args, "position_embedding", None)
    if kind in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True)
    if kind in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"args.position_embedding must be one of 'v2', 'sine', 'v3', 'learned', got {kind!r}")
