"""Position embeddings of DETR: the sine one (the kernels' target), DINO's sine one with a temperature
per axis, and the learned one."""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..dispatch import check_backend
from ..nested_tensor import NestedTensorLike, script_nested_tensor, trusted_image_sizes
from ..validation import check_mask, check_nested_tensor
from .levels import compute_levels, precomputed_pos
from .params import SineParams
from .reference import learned_embedding_reference, sine_embedding_formula


def sine_position_embedding(mask: Tensor, num_pos_feats: int = 64, temperature: float = 10000,
                            normalize: bool = False, scale: Optional[float] = None, *, offset: float = 0.0,
                            eps: float = 1e-6, image_sizes: Optional[Tensor] = None,
                            dtype: torch.dtype = torch.float32, backend: str = "auto",
                            temperature_w: Optional[float] = None) -> Tensor:
    """Functional PositionEmbeddingSine: the B x 2F x H x W embedding of a B x H x W bool mask.

    ``image_sizes`` (optional, integer B x 2): each image's valid (h, w), promising the mask is
    that top-left rectangle — the kernels then never read the mask. ``dtype``: float32, or
    bfloat16/float16 computed in float32 and rounded once. ``backend`` as for the module.
    ``temperature_w``: the column (x) half's temperature, ``temperature`` then being the row (y)
    half's, as PositionEmbeddingSineHW (None: ``temperature`` for both).
    """
    params = SineParams.from_args(num_pos_feats, temperature, normalize, scale, offset, eps, temperature_w)
    check_backend(backend)
    check_mask(mask)
    return compute_levels(mask, image_sizes, [tuple(mask.shape[1:])], params, backend, dtype,
                          need_masks=False).pos[0]


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
        params = SineParams.from_args(num_pos_feats, temperature, normalize, scale, offset, eps)
        self.num_pos_feats = params.num_pos_feats
        self.temperature = params.temperature
        self.normalize = params.normalize
        self.scale = params.scale
        self.offset = params.offset
        self.eps = params.eps
        self.backend = check_backend(backend)

    @torch.jit.unused
    def __prepare_scriptable__(self) -> "PositionEmbeddingSine":
        script_nested_tensor()  # so that the scripted module takes detr_fast's NestedTensor too
        return self

    def forward(self, tensor_list: NestedTensorLike) -> Tensor:
        if torch.jit.is_scripting():
            mask = tensor_list.decompose()[1]
            if mask is None:
                raise ValueError("PositionEmbeddingSine needs tensor_list.mask, got a NestedTensor without a mask")
            return self.reference(mask)
        return self._forward_eager(tensor_list)

    def reference(self, mask: Tensor) -> Tensor:
        """The reference computation for a B x H x W bool mask."""
        return sine_embedding_formula(mask, self.num_pos_feats, self.temperature, self.normalize,
                                      self.scale, self.offset, self.eps)

    @torch.jit.unused
    def sine_params(self) -> SineParams:
        """This module's parameters (validated; rebuilt only when an attribute was reassigned)."""
        key = self._params_key()
        cached: Optional[Tuple[tuple, SineParams]] = self.__dict__.get("_sine_params")
        if cached is None or cached[0] != key:
            cached = (key, SineParams(*key))
            self.__dict__["_sine_params"] = cached
        return cached[1]

    @torch.jit.unused
    def _params_key(self) -> tuple:
        """SineParams' positional arguments, from this module's attributes."""
        return (self.num_pos_feats, self.temperature, self.normalize, self.scale, self.offset, self.eps)

    @torch.jit.unused
    def _forward_eager(self, tensor_list: NestedTensorLike) -> Tensor:
        check_nested_tensor(tensor_list)
        mask = tensor_list.mask
        if mask is None:
            raise ValueError("PositionEmbeddingSine needs tensor_list.mask, got a NestedTensor without a mask")
        check_mask(mask, "tensor_list.mask")
        tensors = tensor_list.tensors
        if isinstance(tensors, Tensor) and tensors.dim() > 0 and tensors.shape[0] != mask.shape[0]:
            raise ValueError(f"tensor_list.mask has batch {mask.shape[0]} but tensor_list.tensors has batch "
                             f"{tensors.shape[0]}; expected the same")
        params = self.sine_params()
        pos = precomputed_pos(mask, params, self.backend)
        if pos is not None:
            return pos  # computed with the mask by the Joiner's backbone (see detr_fast.sine.levels)
        return compute_levels(mask, trusted_image_sizes(tensor_list), [tuple(mask.shape[1:])], params,
                              self.backend, need_masks=False).pos[0]

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale}, offset={self.offset}, eps={self.eps}, "
                f"backend={self.backend!r}")


class PositionEmbeddingSineHW(PositionEmbeddingSine):
    """DINO's PositionEmbeddingSineHW (DN-DETR, DAB-DETR, DINO, Grounding DINO): DETR's sine
    embedding with one temperature per axis, ``temperatureH`` for the row (y) half (channels
    [0, F)) and ``temperatureW`` for the column (x) half ([F, 2F)); no offset, eps 1e-6.

    Same constructor and attributes as DINO's (plus the keyword ``backend``), no parameters or
    buffers (DINO's state_dicts load strictly both ways); forward(NestedTensor) -> B x 2F x H x W
    float32 as PositionEmbeddingSine, whose dispatch it shares (kernels, separable CPU fallback,
    TorchScript's reference path, the Joiner's fused masks/pos).
    """

    def __init__(self, num_pos_feats: int = 64, temperatureH: float = 10000, temperatureW: float = 10000,
                 normalize: bool = False, scale: Optional[float] = None, *, backend: str = "auto"):
        for name, value in (("temperatureH", temperatureH), ("temperatureW", temperatureW)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        super().__init__(num_pos_feats, temperatureH, normalize, scale, backend=backend)
        params = SineParams.from_args(num_pos_feats, temperatureH, normalize, scale, temperature_w=temperatureW)
        # DINO's attribute names: one temperature per axis, no offset or eps (0.0 and 1e-6).
        del self.temperature, self.offset, self.eps
        self.temperatureH, self.temperatureW = params.temperatures

    def reference(self, mask: Tensor) -> Tensor:
        """The reference computation (DINO's formula) for a B x H x W bool mask."""
        return sine_embedding_formula(mask, self.num_pos_feats, self.temperatureH, self.normalize, self.scale,
                                      0.0, 1e-6, "detr", torch.float32, self.temperatureW)

    @torch.jit.unused
    def _params_key(self) -> tuple:
        return (self.num_pos_feats, self.temperatureH, self.normalize, self.scale, 0.0, 1e-6, "detr",
                self.temperatureW)

    def extra_repr(self) -> str:
        return (f"num_pos_feats={self.num_pos_feats}, temperatureH={self.temperatureH}, "
                f"temperatureW={self.temperatureW}, normalize={self.normalize}, scale={self.scale}, "
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

    @torch.jit.unused
    def __prepare_scriptable__(self) -> "PositionEmbeddingLearned":
        script_nested_tensor()  # so that the scripted module takes detr_fast's NestedTensor too
        return self

    def forward(self, tensor_list: Union[NestedTensorLike, Tensor]) -> Tensor:
        if isinstance(tensor_list, Tensor):
            x = tensor_list
        elif torch.jit.is_scripting():
            x = tensor_list.decompose()[0]
        else:
            x = tensor_list.tensors
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
