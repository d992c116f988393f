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


def _edge_mask(extents: Tensor, length: int) -> Tensor:
    """N x length x 2 mask: column 0 valid in rows [0, extent), column 1 all padding."""
    valid = torch.arange(length)[None, :] < extents[:, None]  # N x length
    return torch.stack([~valid, torch.ones_like(valid)], dim=2)


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
    # The x formula along a row is the y formula along a column, so one reference call on a
    # 2B x L x 2 mask gives both: the first B entries are the images' row extents, the next B
    # their column extents. Column 0 is a valid column/row, column 1 a padding one.
    length = max(height, width)
    edge = _edge_mask(torch.cat([sizes[:, 0], sizes[:, 1]]), length).to(device)
    values = sine_embedding_reference(edge, num_pos_feats, temperature, normalize, scale, offset, eps)
    values = values[:, :f].permute(0, 2, 3, 1)  # 2B x L x 2 x F, the y half
    y_valid, y_pad = values[:batch, :height, 0], values[:batch, :1, 1]  # B x H x F, B x 1 x F
    x_valid, x_pad = values[batch:, :width, 0], values[batch:, :1, 1]  # B x W x F, B x 1 x F
    col_valid = torch.arange(width, device=device)[None, :] < sizes[:, 1, None].to(device)  # B x W
    row_valid = torch.arange(height, device=device)[None, :] < sizes[:, 0, None].to(device)  # B x H
    # Two selections written straight into the two halves of the output: one write of it.
    torch.where(col_valid[:, None, :, None], y_valid[:, :, None, :], y_pad[:, :, None, :], out=out[..., :f])
    torch.where(row_valid[:, :, None, None], x_valid[:, None, :, :], x_pad[:, :, None, :], out=out[..., f:])
    return out.permute(0, 3, 1, 2)
