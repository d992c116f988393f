"""A stand-in for the upstream DETR and Deformable-DETR backbone code, for tests only.

The tests need modules built the way the upstream repositories build them (their class layout,
state_dict keys and formulas) without importing those repositories. This file restates them
independently of detr_fast: nothing here imports detr_fast, so comparing detr_fast against these
classes is a comparison against a second, separately written implementation.
"""
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter


class UpstreamNestedTensor:
    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def decompose(self):
        return self.tensors, self.mask


def upstream_pad(images: List[Tensor]) -> UpstreamNestedTensor:
    c = images[0].shape[0]
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    batch = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    return UpstreamNestedTensor(batch, mask)


class UpstreamFrozenBatchNorm2d(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros),
                           ("running_mean", torch.zeros), ("running_var", torch.ones)):
            self.register_buffer(name, init(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + 1e-5).rsqrt()
        return x * scale + (b - rm * scale)


class UpstreamBackbone(nn.Module):
    """DETR's (layers=1-4 or 4) or Deformable-DETR's (layers=2-4 or 4) Backbone."""

    def __init__(self, name: str, train_backbone: bool, return_layers: Dict[str, str], dilation: bool = False):
        super().__init__()
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation],
            norm_layer=UpstreamFrozenBatchNorm2d)
        for pname, p in resnet.named_parameters():
            if not train_backbone or ("layer2" not in pname and "layer3" not in pname and "layer4" not in pname):
                p.requires_grad_(False)
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        self.num_channels = 512 if name in ("resnet18", "resnet34") else 2048

    def forward(self, nt: UpstreamNestedTensor) -> Dict[str, UpstreamNestedTensor]:
        out = {}
        for name, x in self.body(nt.tensors).items():
            mask = F.interpolate(nt.mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = UpstreamNestedTensor(x, mask)
        return out


DETR_DETECTION_LAYERS = {"layer4": "0"}
DETR_SEGMENTATION_LAYERS = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
DEFORMABLE_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}


class UpstreamPositionEmbeddingSine(nn.Module):
    """DETR's sine embedding; deformable=True subtracts 0.5 before normalizing, as Deformable-DETR."""

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None, deformable=False):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.deformable = deformable

    def forward(self, nt: UpstreamNestedTensor) -> Tensor:
        not_mask = ~nt.mask
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            shift = 0.5 if self.deformable else 0.0
            y = (y - shift) / (y[:, -1:, :] + 1e-6) * self.scale
            x = (x - shift) / (x[:, :, -1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=nt.mask.device)
        dim_t = self.temperature ** (2 * (i // 2) / self.num_pos_feats)
        px = x[..., None] / dim_t
        py = y[..., None] / dim_t
        px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
        py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class UpstreamJoiner(nn.Sequential):
    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, nt: UpstreamNestedTensor):
        xs = self[0](nt)
        out, pos = [], []
        for _, x in sorted(xs.items()):
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def randomize_frozen_bn_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Non-identity statistics in every frozen BN, so that a wrong fold cannot pass a test."""
    for name, buf in module.named_buffers():
        if name.endswith(("weight", "running_var")):
            buf.copy_(torch.rand(buf.shape, generator=generator) * 0.5 + 0.75)
        elif name.endswith(("bias", "running_mean")):
            buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
    return module


def upstream_joiner(name: str = "resnet50", return_layers: Dict[str, str] = DEFORMABLE_LAYERS,
                    train_backbone: bool = False, dilation: bool = False, hidden_dim: int = 256,
                    deformable: bool = True, seed: int = 0) -> UpstreamJoiner:
    torch.manual_seed(seed)
    backbone = UpstreamBackbone(name, train_backbone, return_layers, dilation)
    randomize_frozen_bn_(backbone, torch.Generator().manual_seed(seed))
    pos = UpstreamPositionEmbeddingSine(hidden_dim // 2, normalize=True, deformable=deformable)
    return UpstreamJoiner(backbone, pos)


class UpstreamMiniDETR(nn.Module):
    """The parts of models.detr.DETR around its backbone: backbone, input_proj, query heads."""

    def __init__(self, backbone: UpstreamJoiner, hidden_dim: int = 32, num_queries: int = 5, num_classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone[0].num_channels, hidden_dim, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = nn.Linear(hidden_dim, 4)

    def forward(self, samples):
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        memory = (self.input_proj(src) + pos[-1][:, : self.query_embed.weight.shape[1]])
        memory = memory.masked_fill(mask[:, None], 0).flatten(2).mean(-1)
        hs = self.query_embed.weight[None] + memory[:, None]
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()}
