"""The sine embedding of rectangular padding masks in plain PyTorch (the CPU fallback).

When every image's valid region is a top-left rectangle (h_b, w_b) — what padding produces — the
reference's cumulative sums are min(i + 1, h_b) in a valid column (0 in a padding column) and
min(j + 1, w_b) in a valid row (0 in a padding row). So the y half of the embedding takes one
value per (image, row) in valid columns and one constant in padding columns, and the x half one
value per (image, column) in valid rows and one constant in padding rows.

Those per-row and per-column values are obtained by running the reference itself on a tiny
B x H x 2 (resp. B x 2 x W) mask with the same valid extent — so the arithmetic is literally the
reference's and the result is bit-identical — and are then broadcast into the output with one
write of it. Cost: O(B·(H+W)·F) sin/cos instead of O(B·H·W·F), plus the output write.
"""
from typing import Optional

import torch
from torch import Tensor

from .reference import sine_embedding_reference


def rectangle_sizes(mask: Tensor) -> Optional[Tensor]:
    """Each image's valid (h, w) if the B x H x W bool mask (True = padding) is a top-left
    rectangle per image, else None. Reads the mask: meant for CPU tensors (on CUDA it would sync)."""
    batch, height, width = mask.shape
    not_mask = ~mask
    if height == 0 or width == 0:
        return torch.zeros((batch, 2), dtype=torch.int64)
    valid_h = not_mask[:, :, 0].sum(1)
    valid_w = not_mask[:, 0, :].sum(1)
    rows = torch.arange(height, device=mask.device)[None, :, None] < valid_h[:, None, None]
    cols = torch.arange(width, device=mask.device)[None, None, :] < valid_w[:, None, None]
    if not torch.equal(rows & cols, not_mask):
        return None
    return torch.stack([valid_h, valid_w], dim=1).cpu()


def _edge_mask(extents: Tensor, length: int, along_rows: bool) -> Tensor:
    """B x length x 2 (along_rows) or B x 2 x length mask: index 0 valid up to the extent, index 1
    all padding."""
    batch = extents.shape[0]
    valid = torch.arange(length)[None, :] < extents[:, None]  # B x length
    edge = torch.stack([~valid, torch.ones_like(valid)], dim=2)  # B x length x 2
    return edge if along_rows else edge.transpose(1, 2)


def sine_embedding_separable(sizes: Tensor, height: int, width: int, num_pos_feats: int,
                             temperature: float, normalize: bool, scale: float, offset: float,
                             eps: float, device: torch.device = torch.device("cpu")) -> Tensor:
    """The reference embedding (B x 2F x H x W float32, a permuted view of a contiguous
    B x H x W x 2F buffer) of the mask whose image b is valid on [0, sizes[b, 0]) x [0, sizes[b, 1]).

    ``sizes``: CPU integer tensor B x 2 with 0 <= h_b <= height and 0 <= w_b <= width.
    """
    sizes = sizes.to(torch.int64).cpu()
    batch = int(sizes.shape[0])
    f = num_pos_feats
    out = torch.empty((batch, height, width, 2 * f), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out.permute(0, 3, 1, 2)
    args = (num_pos_feats, temperature, normalize, scale, offset, eps)
    # y half: column 0 of the tiny mask is a valid column, column 1 a padding one.
    y_edge = sine_embedding_reference(_edge_mask(sizes[:, 0], height, True).to(device), *args)
    y_valid = y_edge[:, :f, :, 0].permute(0, 2, 1)  # B x H x F
    y_pad = y_edge[:, :f, 0, 1]  # B x F
    # x half: row 0 of the tiny mask is a valid row, row 1 a padding one.
    x_edge = sine_embedding_reference(_edge_mask(sizes[:, 1], width, False).to(device), *args)
    x_valid = x_edge[:, f:, 0, :].permute(0, 2, 1)  # B x W x F
    x_pad = x_edge[:, f:, 1, 0]  # B x F
    for b, (h_b, w_b) in enumerate(sizes.tolist()):
        y_half = out[b, :, :, :f]
        x_half = out[b, :, :, f:]
        y_half[:, :w_b].copy_(y_valid[b, :, None, :].expand(height, w_b, f))
        y_half[:, w_b:].copy_(y_pad[b].expand(height, width - w_b, f))
        x_half[:h_b].copy_(x_valid[b, None, :, :].expand(h_b, width, f))
        x_half[h_b:].copy_(x_pad[b].expand(height - h_b, width, f))
    return out.permute(0, 3, 1, 2)
