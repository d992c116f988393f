"""Independent oracles for DINO's PositionEmbeddingSineHW (one sine temperature per axis).

- ``DinoPositionEmbeddingSineHW``: a stand-in of IDEA-Research's module (DINO, DN-DETR, DAB-DETR,
  Grounding DINO: models/dino/position_encoding.py), written from its code, float32 as there. The
  A/B bench (bench/compare_sine_hw.py) times it against detr_fast's PositionEmbeddingSineHW.
- ``dino_sine_hw_float64``: DINO's formula in float64 NumPy, written element by element from the
  formula (no detr_fast code, no torch ops shared with the float32 paths), for the accuracy tests.

Neither imports detr_fast.
"""
import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn


class DinoPositionEmbeddingSineHW(nn.Module):
    """DINO's PositionEmbeddingSineHW: DETR's sine embedding with temperatureH for the y half
    (first F channels) and temperatureW for the x half; normalize divides by the extent + 1e-6."""

    def __init__(self, num_pos_feats=64, temperatureH=10000, temperatureW=10000, normalize=False, scale=None):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperatureH = temperatureH
        self.temperatureW = temperatureW
        self.normalize = normalize
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        if scale is None:
            scale = 2 * math.pi
        self.scale = scale

    def forward(self, tensor_list) -> Tensor:
        mask = tensor_list.mask
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_tx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_tx = self.temperatureW ** (2 * (torch.div(dim_tx, 2, rounding_mode='floor')) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_tx

        dim_ty = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_ty = self.temperatureH ** (2 * (torch.div(dim_ty, 2, rounding_mode='floor')) / self.num_pos_feats)
        pos_y = y_embed[:, :, :, None] / dim_ty

        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def dino_sine_hw_float64(mask: Tensor, num_pos_feats: int, temperature_h: float, temperature_w: float,
                         normalize: bool = False, scale: Optional[float] = None) -> np.ndarray:
    """B x 2F x H x W float64 array of DINO's formula for a B x H x W bool mask (True = padding).

    Channel c < F: the row position p_y(b, i, j) = number of valid pixels in column j up to row i
    (divided by the column's valid count + 1e-6 and times ``scale`` with normalize), then
    sin(p_y / Th ** (2 * (c // 2) / F)) for even c and cos for odd c. Channel F + c: the same with
    the column position along row i and Tw.
    """
    scale = 2 * math.pi if scale is None else scale
    valid = ~np.asarray(mask.cpu(), dtype=bool)
    batch, height, width = valid.shape
    f = num_pos_feats
    out = np.zeros((batch, 2 * f, height, width), dtype=np.float64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                p_y = float(valid[b, : i + 1, j].sum())
                p_x = float(valid[b, i, : j + 1].sum())
                if normalize:
                    p_y = p_y / (float(valid[b, :, j].sum()) + 1e-6) * scale
                    p_x = p_x / (float(valid[b, i, :].sum()) + 1e-6) * scale
                for c in range(f):
                    wave = math.sin if c % 2 == 0 else math.cos
                    out[b, c, i, j] = wave(p_y / temperature_h ** (2 * (c // 2) / f))
                    out[b, f + c, i, j] = wave(p_x / temperature_w ** (2 * (c // 2) / f))
    return out
