"""Triton kernel: DETR's sine position embedding (and the nearest-downsampled padding mask).

One launch writes, for one feature level, the B x H x W x 2F embedding buffer (the caller views it
as B x 2F x H x W, the reference layout). Two kernels share the position transform, the sin/cos
and PyTorch's nearest index rule:

- _sine_rect_kernel: every image's valid region is a top-left rectangle whose size (in the *input*
  mask) is given per image. Nothing is read but those sizes: the level's B x H x W mask follows
  from the nearest index rule (and is written in the same launch), and the embedding is separable,
  so sin/cos are evaluated per row and per column of a tile and broadcast on the store.
- _sine_general_kernel: an arbitrary mask. The launcher passes the cumulative sums of the (already
  downsampled) not-mask along rows and along columns (two float32 B x H x W tensors, 1/F of the
  output); the kernel normalizes them and evaluates sin/cos per element.

Both take two frequency tables, the y half's and the x half's (DINO's PositionEmbeddingSineHW has
one temperature per axis); each program computes one half and loads one table, so with a single
temperature the launchers pass the same table twice and nothing per element changes.

Precision: the arithmetic replays the reference's float32 operations in the same order
((pos + offset) / (last + eps) * scale, then / dim_t, then sin or cos). Triton's plain `/` on
NVIDIA GPUs is an approximate division (up to 2 ulp) and `tl.sin` may be a hardware
approximation; at positions ~1e3 (normalize=False) or ~1e6 (padding when normalize=True with an
offset) a 1-ulp change of the argument changes the sine in the 4th digit, so we use IEEE division
(div_rn) and libdevice's sin/cos, which have proper range reduction, as CUDA's sinf does.
"""
import contextlib
import os
import struct
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRETED:
    # The interpreter maps tl.sin/tl.cos to numpy's float32 sin/cos and does not support extern
    # (libdevice) calls.
    @triton.jit
    def _sin(x):
        return tl.sin(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)
else:
    # Where libdevice lives depends on the Triton version: triton.language.extra.libdevice
    # (3.x dispatcher), triton.language.extra.cuda.libdevice (3.0), tl.math (2.x, libdevice-backed).
    try:
        from triton.language.extra import libdevice as _libdevice
    except ImportError:  # pragma: no cover - depends on the installed Triton
        try:
            from triton.language.extra.cuda import libdevice as _libdevice
        except ImportError:
            _libdevice = tl.math

    @triton.jit
    def _sin(x):
        return _libdevice.sin(x)

    @triton.jit
    def _cos(x):
        return _libdevice.cos(x)


@triton.jit
def _normalized(pos, last, offset, eps, scale, NORMALIZE: tl.constexpr):
    """The reference's position transform, same operations, same order."""
    if NORMALIZE:
        return tl.math.div_rn(pos + offset, last + eps) * scale
    else:
        return pos + offset


@triton.jit
def _sin_cos(pos, dim_t, odd):
    """Channel c of the reference: sin(pos / dim_t[c]) for even c, cos for odd c."""
    arg = tl.math.div_rn(pos, dim_t)
    return tl.where(odd, _cos(arg), _sin(arg))


@triton.jit
def _source_index(dst, scale, in_size):
    """PyTorch's 'nearest' rule: min(floor(float(dst) * scale), in_size - 1), scale = in/out in
    float32. The product is non-negative, so truncation is floor."""
    return tl.minimum((dst.to(tl.float32) * scale).to(tl.int32), in_size - 1)


@triton.jit
def _level_extent(valid_in, out_size, scale, in_size, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """How many output indices map to a source index < valid_in. The source index is monotone in
    the output index, so the valid outputs are a prefix of this length. ITERS * BLOCK >= out_size.
    (A compile-time trip count: Triton 3.6's interpreter cannot loop to a runtime bound.)"""
    count = 0
    for start in tl.static_range(0, ITERS * BLOCK, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        inside = (idx < out_size) & (_source_index(idx, scale, in_size) < valid_in)
        count += tl.sum(inside.to(tl.int32), axis=0)
    return count


@triton.jit
def _tile(height, width, num_pos_feats, n_chunks, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """This program's tile: image b, half (0 = the row/y half, 1 = the column/x half), its rows,
    columns and channels with their in-bounds flags, and the element offsets into the contiguous
    B x H x W x 2F buffer. Grid axis 2 enumerates (image, half, channel chunk)."""
    pid_z = tl.program_id(2)
    b = pid_z // (2 * n_chunks)
    half = (pid_z // n_chunks) % 2
    chunk = pid_z % n_chunks
    rows = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    chans = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
    row_in = rows < height
    col_in = cols < width
    chan_in = chans < num_pos_feats
    # int64: batch 8 at stride 4 already passes 2**31 elements.
    pix = (b * height + rows).to(tl.int64)[:, None] * width + cols[None, :]
    offs = pix[:, :, None] * (2 * num_pos_feats) + (half * num_pos_feats + chans)[None, None, :]
    store_mask = row_in[:, None, None] & col_in[None, :, None] & chan_in[None, None, :]
    return b, half, rows, cols, chans, row_in, col_in, chan_in, pix, offs, store_mask


@triton.jit
def _half_frequencies(dim_t_ptr, dim_t_x_ptr, half, chans, chan_in):
    """This program's frequencies: the y half's table (temperature H) or the x half's
    (temperature W, DINO's PositionEmbeddingSineHW). One load of BLOCK_C values per program either
    way; with one temperature the launcher passes the same table twice."""
    if half == 0:
        dim_t = tl.load(dim_t_ptr + chans, mask=chan_in, other=1.0)
    else:
        dim_t = tl.load(dim_t_x_ptr + chans, mask=chan_in, other=1.0)
    return dim_t


@triton.jit
def _sine_rect_kernel(
    pos_ptr, mask_ptr, dim_t_ptr, dim_t_x_ptr, sizes_ptr,
    height, width, in_height, in_width, scale_h, scale_w,
    num_pos_feats, n_chunks, offset, eps, scale,
    NORMALIZE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    EXTENT_BLOCK: tl.constexpr, EXTENT_ITERS: tl.constexpr,
):
    """Rectangular masks: only the images' valid sizes (in the input mask) are read. The level
    mask is always written (1 byte per pixel next to the embedding's 2F values)."""
    b, half, rows, cols, chans, row_in, col_in, chan_in, pix, offs, store_mask = _tile(
        height, width, num_pos_feats, n_chunks, BLOCK_H, BLOCK_W, BLOCK_C)
    dim_t = _half_frequencies(dim_t_ptr, dim_t_x_ptr, half, chans, chan_in)
    odd = (chans % 2) == 1
    valid_h = tl.load(sizes_ptr + 2 * b).to(tl.int32)
    valid_w = tl.load(sizes_ptr + 2 * b + 1).to(tl.int32)
    # The level mask is the input mask sampled at the nearest source row/column.
    row_valid = _source_index(rows, scale_h, in_height) < valid_h
    col_valid = _source_index(cols, scale_w, in_width) < valid_w
    if half == 0 and tl.program_id(2) % n_chunks == 0:
        is_pad = ~(row_valid[:, None] & col_valid[None, :])
        tl.store(mask_ptr + pix, is_pad.to(tl.uint8), mask=row_in[:, None] & col_in[None, :])
    # The level mask is a top-left rectangle too: the cumulative position in a valid column is
    # min(i + 1, level_h) and the column's total is level_h. Padding columns are all zero.
    zero = tl.zeros([1], dtype=tl.float32)
    pad_value = _sin_cos(_normalized(zero, zero, offset, eps, scale, NORMALIZE)[:, None],
                         dim_t[None, :], odd[None, :])  # 1 x C
    if half == 0:
        level_h = _level_extent(valid_h, height, scale_h, in_height, EXTENT_BLOCK, EXTENT_ITERS)
        y = tl.minimum(rows + 1, level_h).to(tl.float32)
        total_h = tl.zeros([BLOCK_H], dtype=tl.float32) + level_h.to(tl.float32)
        y_value = _sin_cos(_normalized(y, total_h, offset, eps, scale, NORMALIZE)[:, None],
                           dim_t[None, :], odd[None, :])  # BLOCK_H x C
        tile = tl.where(col_valid[None, :, None], y_value[:, None, :], pad_value[:, None, :])
    else:
        level_w = _level_extent(valid_w, width, scale_w, in_width, EXTENT_BLOCK, EXTENT_ITERS)
        x = tl.minimum(cols + 1, level_w).to(tl.float32)
        total_w = tl.zeros([BLOCK_W], dtype=tl.float32) + level_w.to(tl.float32)
        x_value = _sin_cos(_normalized(x, total_w, offset, eps, scale, NORMALIZE)[:, None],
                           dim_t[None, :], odd[None, :])  # BLOCK_W x C
        tile = tl.where(row_valid[:, None, None], x_value[None, :, :], pad_value[:, None, :])
    tl.store(pos_ptr + offs, tile, mask=store_mask)


@triton.jit
def _sine_general_kernel(
    pos_ptr, dim_t_ptr, dim_t_x_ptr, ycum_ptr, xcum_ptr,
    height, width, num_pos_feats, n_chunks, offset, eps, scale,
    NORMALIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Arbitrary masks: the cumulative sums of the not-mask along rows and columns are read."""
    b, half, rows, cols, chans, row_in, col_in, chan_in, pix, offs, store_mask = _tile(
        height, width, num_pos_feats, n_chunks, BLOCK_H, BLOCK_W, BLOCK_C)
    dim_t = _half_frequencies(dim_t_ptr, dim_t_x_ptr, half, chans, chan_in)
    odd = (chans % 2) == 1
    # Triton requires a variable assigned in both branches of a runtime `if` to have one type
    # (shape included), so each branch broadcasts its total to the full tile itself.
    in_tile = row_in[:, None] & col_in[None, :]
    if half == 0:
        cum = tl.load(ycum_ptr + pix, mask=in_tile, other=0.0)
        # The column's total is the cumulative sum at the last row.
        col_last = (b * height + height - 1).to(tl.int64) * width + cols
        total = tl.broadcast_to(tl.load(ycum_ptr + col_last, mask=col_in, other=0.0)[None, :],
                                (BLOCK_H, BLOCK_W))
    else:
        cum = tl.load(xcum_ptr + pix, mask=in_tile, other=0.0)
        row_last = (b * height + rows).to(tl.int64) * width + width - 1
        total = tl.broadcast_to(tl.load(xcum_ptr + row_last, mask=row_in, other=0.0)[:, None],
                                (BLOCK_H, BLOCK_W))
    value = _normalized(cum, total, offset, eps, scale, NORMALIZE)
    tile = _sin_cos(value[:, :, None], dim_t[None, None, :], odd[None, None, :])
    tl.store(pos_ptr + offs, tile, mask=store_mask)


def _pow2(n: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(int(n), 1)), cap))


def nearest_scale(in_size: int, out_size: int) -> float:
    """PyTorch's float32 scale in/out of 'nearest' (as a Python float holding a float32 value).

    Computed on the host without tensors (it runs once per launch on a launch-bound path): the
    sizes are exact in float32, and rounding their quotient to double and then to float32 equals
    rounding it to float32 directly, because double has more than 2 * 24 + 2 bits (Figueroa's
    double-rounding theorem for division).
    """
    return struct.unpack("f", struct.pack("f", in_size / out_size))[0]


def extent_constants(height: int, width: int) -> Tuple[int, int]:
    """(EXTENT_BLOCK, EXTENT_ITERS) of a rectangular level: compile-time constants, so every
    distinct pair is one more compiled kernel. Extents are counted in one pass of up to 1024
    rows/columns (every DETR level; the block is a power of two, so few variants), in more passes
    beyond."""
    block = _pow2(max(height, width), 1024)
    return block, triton.cdiv(max(height, width), block)


class Tiles(NamedTuple):
    block_h: int
    block_w: int
    block_c: int
    num_warps: int


def choose_tiles(height: int, width: int, num_pos_feats: int, rect: bool, for_gpu: bool) -> Tiles:
    """Block sizes of a launch. On a GPU (not tuned on hardware yet: chosen from the layout):
    the buffer is contiguous along channels, so a 64-channel block gives each pixel's store 256
    contiguous bytes (float32); 8 rows x 16 columns x 64 channels is 8192 stores per program of
    4 warps (64 per thread, enough in flight for bandwidth) while the rect kernel evaluates sin/cos
    only on 8 + 16 row/column vectors. The general kernel evaluates sin/cos per element, so its
    tiles are half as wide to bound registers. In the interpreter every program is a Python call:
    few, large programs run fastest there."""
    if not for_gpu:
        return Tiles(_pow2(height, 16), _pow2(width, 64), _pow2(num_pos_feats, 128), 4)
    return Tiles(_pow2(height, 8), _pow2(width, 16 if rect else 8), _pow2(num_pos_feats, 64), 4)


def _grid(batch: int, height: int, width: int, num_pos_feats: int, tiles: Tiles) -> Tuple[Tuple[int, int, int], int]:
    n_chunks = triton.cdiv(num_pos_feats, tiles.block_c)
    return (triton.cdiv(width, tiles.block_w), triton.cdiv(height, tiles.block_h), batch * 2 * n_chunks), n_chunks


def _x_table(dim_t: torch.Tensor, dim_t_x: Optional[torch.Tensor]) -> torch.Tensor:
    """The x half's frequency table: ``dim_t`` itself unless a separate one is given."""
    if dim_t_x is None or dim_t_x is dim_t:
        return dim_t
    if dim_t_x.shape != dim_t.shape or dim_t_x.device != dim_t.device or dim_t_x.dtype != dim_t.dtype:
        raise ValueError(f"dim_t_x must match dim_t ({tuple(dim_t.shape)}, {dim_t.dtype}, {dim_t.device}), got "
                         f"{tuple(dim_t_x.shape)}, {dim_t_x.dtype}, {dim_t_x.device}")
    return dim_t_x


def _launch_device(device: torch.device):
    """Triton launches on the current CUDA device, whatever device the tensors are on: make it
    theirs (a no-op on one GPU, and on CPU under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sine_embedding_rect(sizes: torch.Tensor, in_hw: Tuple[int, int], out_hw: Tuple[int, int],
                        dim_t: torch.Tensor, normalize: bool, scale: float, offset: float, eps: float,
                        out_dtype: torch.dtype, *, gpu_tiles: Optional[bool] = None,
                        dim_t_x: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Level mask and embedding buffer for rectangular padding masks.

    sizes: B x 2 integer tensor on the output device, each image's valid (h, w) in the input mask
    of size in_hw. dim_t: the F float32 frequencies (reference.sine_frequencies) on that device;
    ``dim_t_x``: the x half's, when its temperature differs (None: dim_t for both halves).
    Returns (mask B x h x w bool, pos B x h x w x 2F of out_dtype, contiguous).
    ``gpu_tiles``: use the GPU's block sizes (default: unless interpreted), so that tests can run
    the GPU's tiling in the interpreter.
    """
    batch = sizes.shape[0]
    height, width = out_hw
    in_h, in_w = in_hw
    num_pos_feats = dim_t.numel()
    device = dim_t.device
    pos = torch.empty((batch, height, width, 2 * num_pos_feats), dtype=out_dtype, device=device)
    mask = torch.empty((batch, height, width), dtype=torch.bool, device=device)
    if pos.numel() == 0:
        return mask, pos
    tiles = choose_tiles(height, width, num_pos_feats, True, not _INTERPRETED if gpu_tiles is None else gpu_tiles)
    grid, n_chunks = _grid(batch, height, width, num_pos_feats, tiles)
    extent_block, extent_iters = extent_constants(height, width)
    with _launch_device(device):
        _sine_rect_kernel[grid](
            pos, mask.view(torch.uint8), dim_t, _x_table(dim_t, dim_t_x), sizes.contiguous(),
            height, width, in_h, in_w, nearest_scale(in_h, height), nearest_scale(in_w, width),
            num_pos_feats, n_chunks, float(offset), float(eps), float(scale),
            NORMALIZE=bool(normalize),
            BLOCK_H=tiles.block_h, BLOCK_W=tiles.block_w, BLOCK_C=tiles.block_c,
            EXTENT_BLOCK=extent_block, EXTENT_ITERS=extent_iters, num_warps=tiles.num_warps,
        )
    return mask, pos


def sine_embedding_general(mask: torch.Tensor, dim_t: torch.Tensor, normalize: bool, scale: float,
                           offset: float, eps: float, out_dtype: torch.dtype, *,
                           gpu_tiles: Optional[bool] = None, dim_t_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Embedding buffer (B x H x W x 2F, contiguous) of an arbitrary B x H x W bool mask.

    The cumulative sums are taken with torch.cumsum (exact in float32: they are integers below
    2**24); the kernel does the normalization and the sin/cos per element. ``dim_t_x`` as for
    sine_embedding_rect.
    """
    batch, height, width = mask.shape
    num_pos_feats = dim_t.numel()
    pos = torch.empty((batch, height, width, 2 * num_pos_feats), dtype=out_dtype, device=mask.device)
    if pos.numel() == 0:
        return pos
    not_mask = ~mask
    ycum = not_mask.cumsum(1, dtype=torch.float32).contiguous()
    xcum = not_mask.cumsum(2, dtype=torch.float32).contiguous()
    tiles = choose_tiles(height, width, num_pos_feats, False, not _INTERPRETED if gpu_tiles is None else gpu_tiles)
    grid, n_chunks = _grid(batch, height, width, num_pos_feats, tiles)
    with _launch_device(mask.device):
        _sine_general_kernel[grid](
            pos, dim_t, _x_table(dim_t, dim_t_x), ycum, xcum, height, width, num_pos_feats, n_chunks,
            float(offset), float(eps), float(scale),
            NORMALIZE=bool(normalize), BLOCK_H=tiles.block_h, BLOCK_W=tiles.block_w, BLOCK_C=tiles.block_c,
            num_warps=tiles.num_warps,
        )
    return pos
