"""The reference path: DETR's formulas written once, in plain PyTorch.

These functions are the oracle the kernels are tested against and the fallback the modules use
wherever the kernels do not apply (CPU, TorchScript, ONNX export). They follow the reference
code operation by operation, including its float32 rounding, and must stay that way: a change
here changes what "correct" means for every kernel.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import capturing
from .params import SineParams


def pad_images_reference(tensor_list: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Zero-fill a B x C x Hmax x Wmax batch and copy each image to its top-left corner.

    Returns (batch, mask) with mask True on padding.
    """
    max_size = [max(int(img.shape[d]) for img in tensor_list) for d in range(3)]
    b = len(tensor_list)
    first = tensor_list[0]
    batch = torch.zeros([b] + max_size, dtype=first.dtype, device=first.device)
    mask = torch.ones((b, max_size[1], max_size[2]), dtype=torch.bool, device=first.device)
    for img, pad_img, m in zip(tensor_list, batch, mask):
        pad_img[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        m[: img.shape[1], : img.shape[2]] = False
    return batch, mask


def downsample_mask_reference(mask: Tensor, size: List[int]) -> Tensor:
    """Nearest-neighbour resize of a B x H x W bool mask to B x size[0] x size[1]."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def sine_frequencies(num_pos_feats: int, temperature: float, device: torch.device, rule: str = "detr",
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """dim_t of the reference: temperature ** (2 * (i // 2) / num_pos_feats), in ``dtype``.

    ``rule`` "dab" rounds it as transformers' DAB-DETR does: temperature ** ((i // 2) * (2 / F)).
    """
    dim_t = torch.arange(num_pos_feats, dtype=dtype, device=device)
    if rule == "dab":
        return temperature ** ((dim_t // 2) * (2 / num_pos_feats))
    return temperature ** (2 * (dim_t // 2) / num_pos_feats)


_FREQUENCIES: Dict[Tuple[int, float, str, str], Tensor] = {}


def cached_frequencies(num_pos_feats: int, temperature: float, device: torch.device, rule: str = "detr") -> Tensor:
    """sine_frequencies in float32, computed once per (F, temperature, device, rule) for the fast
    paths (the reference itself recomputes them, as upstream does). Computed on the device itself,
    so the values are bit-identical to the reference's. Callers must not modify the returned tensor."""
    key = (num_pos_feats, float(temperature), str(device), rule)
    dim_t = _FREQUENCIES.get(key)
    if dim_t is None:
        dim_t = sine_frequencies(num_pos_feats, temperature, device, rule).contiguous()
        if not capturing(torch.device(device)):  # computed at replay only: not for eager calls
            _FREQUENCIES[key] = dim_t
    return dim_t


_FREQUENCY_PAIRS: Dict[Tuple[int, float, float, str, str], Tensor] = {}


def cached_frequency_pair(num_pos_feats: int, temperature: float, temperature_w: float, device: torch.device,
                          rule: str = "detr") -> Tensor:
    """The 2 x F float32 table of an embedding with one temperature per axis: row 0 the y half's
    frequencies (``temperature``), row 1 the x half's (``temperature_w``), each bit-identical to
    cached_frequencies'. Cached like it; callers must not modify the returned tensor."""
    key = (num_pos_feats, float(temperature), float(temperature_w), str(device), rule)
    table = _FREQUENCY_PAIRS.get(key)
    if table is None:
        table = torch.stack([sine_frequencies(num_pos_feats, t, device, rule) for t in (temperature, temperature_w)])
        if not capturing(torch.device(device)):
            _FREQUENCY_PAIRS[key] = table
    return table


def sine_embedding_reference(mask: Tensor, params: SineParams, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sine position embedding of a B x H x W padding mask (True = padding).

    Returns a B x 2F x H x W tensor (float32; ``dtype`` float64 computes it all in float64) that is a
    permuted view of a contiguous B x H x W x 2F
    buffer, like the reference. Channels [0, F) encode the row (y), [F, 2F) the column (x);
    within each half, even channels are sin and odd ones cos of the same frequency.
    ``params.offset`` is added to the cumulative position (-0.5 in Deformable-DETR); normalization
    divides by the image's un-offset extent, as Deformable-DETR does. The y half's frequencies use
    ``params.temperature``, the x half's ``params.temperature_w`` when set (DINO's PositionEmbeddingSineHW).
    """
    return sine_embedding_formula(mask, params.num_pos_feats, params.temperature, params.normalize,
                                  params.scale, params.offset, params.eps, params.frequencies, dtype,
                                  params.temperature_w)


def sine_embedding_formula(mask: Tensor, num_pos_feats: int, temperature: float, normalize: bool,
                           scale: float, offset: float, eps: float, frequencies: str = "detr",
                           dtype: torch.dtype = torch.float32, temperature_w: Optional[float] = None) -> Tensor:
    """sine_embedding_reference with the parameters spelled out (TorchScript cannot take a
    SineParams, so the scripted PositionEmbeddingSine calls this with its attributes), computed
    in ``dtype`` (float32 as the reference; float64 for float64 models). ``temperature`` is the
    row (y) half's, ``temperature_w`` (None: the same) the column (x) half's, as in DINO's
    PositionEmbeddingSineHW, which computes the two tables separately as done here."""
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=dtype)
    x_embed = not_mask.cumsum(2, dtype=dtype)
    y_embed = normalize_positions(y_embed, y_embed[:, -1:, :], normalize, scale, offset, eps)
    x_embed = normalize_positions(x_embed, x_embed[:, :, -1:], normalize, scale, offset, eps)
    dim_t = sine_frequencies(num_pos_feats, temperature, mask.device, frequencies, dtype)
    dim_t_x = dim_t
    if temperature_w is not None and temperature_w != temperature:
        dim_t_x = sine_frequencies(num_pos_feats, temperature_w, mask.device, frequencies, dtype)
    pos_y = sine_of_positions(y_embed, dim_t)
    pos_x = sine_of_positions(x_embed, dim_t_x)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def normalize_positions(embed: Tensor, total: Tensor, normalize: bool, scale: float, offset: float,
                        eps: float) -> Tensor:
    """The cumulative position ``embed`` plus ``offset``; with normalize, divided by the row's or
    column's un-offset ``total`` (+ eps) and multiplied by ``scale``."""
    if normalize:
        return (embed + offset) / (total + eps) * scale
    if offset != 0.0:
        return embed + offset
    return embed


def sine_of_positions(embed: Tensor, dim_t: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """(...) positions -> (..., F): sin(p / dim_t[c]) on even channels c, cos on odd ones.

    sin and cos run on stride-2 slices, as in the reference; callers that must match the reference
    bit for bit (the separable fallback) go through this same function. With ``out`` (a float32
    (..., F) tensor) sin and cos are written straight into its even and odd channels instead of
    being interleaved by torch.stack: the same values, without the reference's extra copy.
    """
    pos = embed[..., None] / dim_t
    if out is None:
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    torch.sin(pos[..., 0::2], out=out[..., 0::2])
    torch.cos(pos[..., 1::2], out=out[..., 1::2])
    return out


def learned_embedding_reference(row_weight: Tensor, col_weight: Tensor, batch: int, h: int, w: int) -> Tensor:
    """Learned position embedding: B x 2F x h x w, column (x) half first, then the row (y) half."""
    x_emb = col_weight[:w]
    y_emb = row_weight[:h]
    return torch.cat([
        x_emb.unsqueeze(0).repeat(h, 1, 1),
        y_emb.unsqueeze(1).repeat(1, w, 1),
    ], dim=-1).permute(2, 0, 1).unsqueeze(0).repeat(batch, 1, 1, 1)
