"""A stand-in for IDEA-Research's DINO backbone code (DINO, DN-DETR, DAB-DETR, Mask DINO, Grounding
DINO share it), for tests only.

Written here from the description of that code, independently of detr_fast (nothing here imports
it): its own NestedTensor and FrozenBatchNorm2d, a BackboneBase that picks layers with
``return_interm_indices``, a Joiner that casts each level's pos to the feature dtype, and
PositionEmbeddingSineHW with separate height and width temperatures, computed in float32; and
``dino_sine_hw_float64``, that embedding's formula element by element in float64 NumPy (no torch op
shared with the float32 paths), for the accuracy tests.
"""
import math
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter


class DinoNestedTensor:
    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def decompose(self):
        return self.tensors, self.mask


def dino_pad(images: List[Tensor]) -> DinoNestedTensor:
    """nested_tensor_from_tensor_list: zero padding at the bottom and right, mask True on padding."""
    c = images[0].shape[0]
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return DinoNestedTensor(batch, mask)


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        eps = 1e-5
        scale = w * (rv + eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


class BackboneBase(nn.Module):
    def __init__(self, backbone: nn.Module, train_backbone: bool, num_channels: List[int],
                 return_interm_indices: List[int]):
        super().__init__()
        for name, parameter in backbone.named_parameters():
            if not train_backbone or ("layer2" not in name and "layer3" not in name and "layer4" not in name):
                parameter.requires_grad_(False)
        return_layers = {}
        for idx, layer_index in enumerate(return_interm_indices):
            return_layers["layer{}".format(5 - len(return_interm_indices) + idx)] = "{}".format(layer_index)
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels

    def forward(self, tensor_list: DinoNestedTensor) -> Dict[str, DinoNestedTensor]:
        xs = self.body(tensor_list.tensors)
        out: Dict[str, DinoNestedTensor] = {}
        for name, x in xs.items():
            m = tensor_list.mask
            assert m is not None
            mask = F.interpolate(m[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = DinoNestedTensor(x, mask)
        return out


class Backbone(BackboneBase):
    """ResNet with frozen BN. DINO itself accepts only resnet50/101; resnet18 is allowed here to keep
    the tests small (its channels are then 64..512)."""

    def __init__(self, name: str, train_backbone: bool, dilation: bool, return_interm_indices: List[int],
                 batch_norm=FrozenBatchNorm2d):
        backbone = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=batch_norm)
        assert return_interm_indices in [[0, 1, 2, 3], [1, 2, 3], [3]]
        base = 64 if name in ("resnet18", "resnet34") else 256
        num_channels_all = [base, base * 2, base * 4, base * 8]
        num_channels = num_channels_all[4 - len(return_interm_indices):]
        super().__init__(backbone, train_backbone, num_channels, return_interm_indices)


class Joiner(nn.Sequential):
    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: DinoNestedTensor):
        xs = self[0](tensor_list)
        out: List[DinoNestedTensor] = []
        pos = []
        for name, x in xs.items():
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


class PositionEmbeddingSineHW(nn.Module):
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

    def forward(self, tensor_list: DinoNestedTensor) -> Tensor:
        x = tensor_list.tensors
        mask = tensor_list.mask
        assert mask is not None
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_tx = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_tx = self.temperatureW ** (2 * (dim_tx // 2) / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_tx

        dim_ty = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_ty = self.temperatureH ** (2 * (dim_ty // 2) / self.num_pos_feats)
        pos_y = y_embed[:, :, :, None] / dim_ty

        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def build_position_encoding(args) -> nn.Module:
    n_steps = args.hidden_dim // 2
    if args.position_embedding in ("v2", "sine"):
        return PositionEmbeddingSineHW(n_steps, temperatureH=args.pe_temperatureH, temperatureW=args.pe_temperatureW,
                                       normalize=True)
    raise ValueError(f"not supported {args.position_embedding}")


def build_backbone(args) -> Joiner:
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    if not train_backbone:
        raise ValueError("Please set lr_backbone > 0")
    return_interm_indices = args.return_interm_indices
    assert return_interm_indices in [[0, 1, 2, 3], [1, 2, 3], [3]]
    backbone = Backbone(args.backbone, train_backbone, args.dilation, return_interm_indices,
                        batch_norm=FrozenBatchNorm2d)
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model


def randomize_frozen_bn_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-identity statistics in every frozen BN, so that a wrong fold cannot pass a test."""
    for name, buf in module.named_buffers():
        if name.endswith(("weight", "running_var")):
            buf.copy_(torch.rand(buf.shape, generator=generator) * 0.5 + 0.75)
        elif name.endswith(("bias", "running_mean")):
            buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
    return module


def dino_joiner(name: str = "resnet18", return_interm_indices=(1, 2, 3), temperatures=(20, 20),
                hidden_dim: int = 256, normalize: bool = True, scale=None, seed: int = 0) -> Joiner:
    """DINO's Joiner (build_backbone's layout) with random weights and non-identity frozen BN."""
    torch.manual_seed(seed)
    backbone = Backbone(name, True, False, list(return_interm_indices))
    randomize_frozen_bn_(backbone, torch.Generator().manual_seed(seed))
    pos = PositionEmbeddingSineHW(hidden_dim // 2, temperatures[0], temperatures[1], normalize, scale)
    joiner = Joiner(backbone, pos)
    joiner.num_channels = backbone.num_channels
    return joiner


class TinyNonResNet(nn.Module):
    """A small non-ResNet body standing in for DINO's Swin / ConvNeXt: patchify, LayerNorm over
    channels, strided convs; forward(NestedTensor) -> {"1": ..., "2": ...} of NestedTensors, as
    DINO's SwinTransformer.forward does (no ``.body``, its own mask downsampling)."""

    def __init__(self, dims=(16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], 4, stride=4)
        self.norm = nn.LayerNorm(dims[0])
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(dims, dims[1:]))
        self.num_features = list(dims[1:])

    def forward(self, tensor_list: DinoNestedTensor) -> Dict[str, DinoNestedTensor]:
        x = self.stem(tensor_list.tensors)
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out: Dict[str, DinoNestedTensor] = {}
        for i, stage in enumerate(self.stages):
            x = F.gelu(stage(x))
            mask = F.interpolate(tensor_list.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[str(i + 1)] = DinoNestedTensor(x, mask)
        return out


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
