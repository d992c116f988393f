"""A stand-in for the upstream DETR and Deformable-DETR backbone code, for tests only.

The tests need modules built the way the upstream repositories build them (their class layout,
state_dict keys and formulas) without importing those repositories. This file restates them
independently of detr_fast: nothing here imports detr_fast, so comparing detr_fast against these
classes is a comparison against a second, separately written implementation.
"""
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter


class UpstreamNestedTensor:
    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device) -> "UpstreamNestedTensor":
        mask = self.mask
        return UpstreamNestedTensor(self.tensors.to(device), None if mask is None else mask.to(device))

    def decompose(self):  # un-annotated, as upstream's: TorchScript infers (Tensor, Optional[Tensor])
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
        out: Dict[str, UpstreamNestedTensor] = {}
        for name, x in self.body(nt.tensors).items():
            m = nt.mask
            assert m is not None
            mask = F.interpolate(m[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
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
        m = nt.mask
        assert m is not None
        not_mask = ~m
        y = not_mask.cumsum(1, dtype=torch.float32)
        x = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            shift = 0.5 if self.deformable else 0.0
            y = (y - shift) / (y[:, -1:, :] + 1e-6) * self.scale
            x = (x - shift) / (x[:, :, -1:] + 1e-6) * self.scale
        i = torch.arange(self.num_pos_feats, dtype=torch.float32, device=m.device)
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
        out: List[UpstreamNestedTensor] = []
        pos: List[Tensor] = []
        for x in xs.values():  # in the order of the levels ("0", "1", ...)
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


# ---------------------------------------------------------------- whole models, as upstream scripts them
# DETR's test_all.py scripts the whole hub model (detection, panoptic, and a module wrapping it): these
# restate that model at toy size (DETR's post-norm transformer, query embeddings, class and box heads,
# DETRsegm's attention map and mask head), scriptable as upstream's is.


def upstream_nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> UpstreamNestedTensor:
    """Zero-pad C x H x W images (or a B x C x H x W tensor, eager) to one batch; mask True on padding."""
    max_size = [0, 0, 0]
    for img in tensor_list:
        for i in range(3):
            max_size[i] = max(max_size[i], int(img.shape[i]))
    b = len(tensor_list)
    first = tensor_list[0]
    batch = torch.zeros([b] + max_size, dtype=first.dtype, device=first.device)
    mask = torch.ones([b, max_size[1], max_size[2]], dtype=torch.bool, device=first.device)
    for i in range(b):
        img = tensor_list[i]
        batch[i, : img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        mask[i, : img.shape[1], : img.shape[2]] = False
    return UpstreamNestedTensor(batch, mask)


class UpstreamMLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.num_layers = num_layers

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class UpstreamEncoderLayer(nn.Module):
    """Post-norm: self-attention with pos added to queries and keys, then the feed-forward."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.self_attn(q, q, value=src, key_padding_mask=mask)[0])
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class UpstreamDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, q, value=tgt)[0])
        attended = self.cross_attn(tgt + query_pos, memory + pos, value=memory, key_padding_mask=mask)[0]
        tgt = self.norm2(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class UpstreamTransformer(nn.Module):
    """DETR's transformer: returns (every decoder layer's normed output, L x B x Q x C; the memory, B x C x h x w)."""

    def __init__(self, d_model: int = 32, nhead: int = 4, num_encoder_layers: int = 1, num_decoder_layers: int = 2,
                 dim_feedforward: int = 64):
        super().__init__()
        self.encoder = nn.ModuleList(UpstreamEncoderLayer(d_model, nhead, dim_feedforward)
                                     for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(UpstreamDecoderLayer(d_model, nhead, dim_feedforward)
                                     for _ in range(num_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> Tuple[Tensor, Tensor]:
        bs, c, h, w = src.shape
        memory = src.flatten(2).permute(2, 0, 1)
        pos = pos_embed.flatten(2).permute(2, 0, 1)
        query_pos = query_embed.unsqueeze(1).repeat(1, bs, 1)
        mask = mask.flatten(1)
        for layer in self.encoder:
            memory = layer(memory, mask, pos)
        out = torch.zeros_like(query_pos)
        hs: List[Tensor] = []
        for layer in self.decoder:
            out = layer(out, memory, mask, pos, query_pos)
            hs.append(self.decoder_norm(out))
        return torch.stack(hs).transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)


class UpstreamDETR(nn.Module):
    """models.detr.DETR: forward takes a NestedTensor, a B x C x H x W tensor or a list of C x H x W images."""

    def __init__(self, backbone: nn.Module, transformer: UpstreamTransformer, num_classes: int = 3,
                 num_queries: int = 5):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = UpstreamMLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone[0].num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, samples: UpstreamNestedTensor) -> Dict[str, Tensor]:
        if isinstance(samples, (list, torch.Tensor)):
            samples = upstream_nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        assert mask is not None
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos[-1])[0]
        outputs_class = self.class_embed(hs)
        outputs_coord = self.bbox_embed(hs).sigmoid()
        return {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}


class UpstreamMHAttentionMap(nn.Module):
    """Each query's softmax attention, per head, over the h x w memory positions: B x Q x heads x h x w."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.k_linear = nn.Linear(dim, dim)
        self.normalize_fact = float(dim / num_heads) ** -0.5

    def forward(self, q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
        q = self.q_linear(q)
        k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
        b, n, c = q.shape
        qh = q.view(b, n, self.num_heads, c // self.num_heads)
        kh = k.view(b, self.num_heads, c // self.num_heads, k.shape[-2], k.shape[-1])
        weights = torch.einsum("bqnc,bnchw->bqnhw", qh * self.normalize_fact, kh)
        weights = weights.masked_fill(mask[:, None, None], float("-inf"))
        return F.softmax(weights.flatten(2), dim=-1).view(weights.shape)


def _conv_gn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU())


class UpstreamMaskHead(nn.Module):
    """DETRsegm's mask head, FPN-style: per query, the projected features and its attention map, upsampled
    through the three finer backbone levels (fpns: strides 16, 8, 4), to one mask logit map."""

    def __init__(self, dim: int, fpn_dims: List[int]):
        super().__init__()
        self.lay1 = _conv_gn(dim, 16)
        self.adapter1 = nn.Conv2d(fpn_dims[0], 16, 1)
        self.lay2 = _conv_gn(16, 8)
        self.adapter2 = nn.Conv2d(fpn_dims[1], 8, 1)
        self.lay3 = _conv_gn(8, 4)
        self.adapter3 = nn.Conv2d(fpn_dims[2], 4, 1)
        self.out_lay = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x: Tensor, bbox_mask: Tensor, fpns: List[Tensor]) -> Tensor:
        q = bbox_mask.shape[1]
        x = torch.cat([x[:, None].expand(-1, q, -1, -1, -1).flatten(0, 1), bbox_mask.flatten(0, 1)], 1)
        x = self.lay1(x)
        x = self._up(x, self.adapter1(fpns[0]), q)
        x = self._up(self.lay2(x), self.adapter2(fpns[1]), q)
        x = self._up(self.lay3(x), self.adapter3(fpns[2]), q)
        return self.out_lay(x)

    @staticmethod
    def _up(x: Tensor, fpn: Tensor, q: int) -> Tensor:
        fpn = fpn[:, None].expand(-1, q, -1, -1, -1).flatten(0, 1)
        return fpn + F.interpolate(x, size=fpn.shape[-2:], mode="nearest")


class UpstreamDETRsegm(nn.Module):
    """models.segmentation.DETRsegm: calls self.detr's parts itself, its backbone included."""

    def __init__(self, detr: UpstreamDETR, fpn_dims: List[int]):
        super().__init__()
        self.detr = detr
        hidden_dim, nheads = detr.transformer.d_model, detr.transformer.nhead
        self.bbox_attention = UpstreamMHAttentionMap(hidden_dim, nheads)
        self.mask_head = UpstreamMaskHead(hidden_dim + nheads, fpn_dims)

    def forward(self, samples: UpstreamNestedTensor) -> Dict[str, Tensor]:
        if isinstance(samples, (list, torch.Tensor)):
            samples = upstream_nested_tensor_from_tensor_list(samples)
        features, pos = self.detr.backbone(samples)
        bs = features[-1].tensors.shape[0]
        src, mask = features[-1].decompose()
        assert mask is not None
        src_proj = self.detr.input_proj(src)
        hs, memory = self.detr.transformer(src_proj, mask, self.detr.query_embed.weight, pos[-1])
        out = {"pred_logits": self.detr.class_embed(hs)[-1], "pred_boxes": self.detr.bbox_embed(hs).sigmoid()[-1]}
        bbox_mask = self.bbox_attention(hs[-1], memory, mask)
        seg_masks = self.mask_head(src_proj, bbox_mask, [features[2].tensors, features[1].tensors, features[0].tensors])
        out["pred_masks"] = seg_masks.view(bs, self.detr.num_queries, seg_masks.shape[-2], seg_masks.shape[-1])
        return out


class UpstreamWrappedDETR(nn.Module):
    """test_all.py's WrappedDETR: a list of images in, padded, then the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: List[Tensor]) -> Dict[str, Tensor]:
        return self.model(upstream_nested_tensor_from_tensor_list(inputs))


def upstream_detr(name: str = "resnet18", masks: bool = False, hidden_dim: int = 32, seed: int = 0,
                  backbone: Optional[nn.Module] = None) -> nn.Module:
    """A toy DETR (masks=True: DETRsegm around it) in eval mode. ``backbone``: a Joiner to use instead of
    the stand-in's (e.g. one built from detr_fast's drop-in classes)."""
    if backbone is None:
        layers = DETR_SEGMENTATION_LAYERS if masks else DETR_DETECTION_LAYERS
        backbone = upstream_joiner(name, layers, hidden_dim=hidden_dim, deformable=False, seed=seed)
    torch.manual_seed(seed)
    detr = UpstreamDETR(backbone, UpstreamTransformer(hidden_dim))
    if masks:
        channels = [64, 128, 256] if name in ("resnet18", "resnet34") else [256, 512, 1024]
        detr = UpstreamDETRsegm(detr, channels[::-1])
    return detr.eval()


class UpstreamMiniDeformableDETR(nn.Module):
    """How Deformable-DETR's forward uses its backbone: every level projected, and one more level made
    from the last by a stride-2 convolution, its mask downsampled and its pos computed by calling
    ``self.backbone[1]`` with a NestedTensor of this file's class. Upstream's deformable transformer
    (MSDeformAttn: a custom autograd Function over a CUDA extension, not scriptable) is replaced by
    pooling every level over its valid positions."""

    def __init__(self, backbone: nn.Module, channels: List[int], hidden_dim: int = 32, num_queries: int = 5,
                 num_classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.input_proj = nn.ModuleList([nn.Conv2d(c, hidden_dim, 1) for c in channels])
        self.extra_proj = nn.Conv2d(channels[-1], hidden_dim, 3, stride=2, padding=1)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = UpstreamMLP(hidden_dim, hidden_dim, 4, 3)

    def forward(self, samples: UpstreamNestedTensor) -> Dict[str, Tensor]:
        features, pos = self.backbone(samples)
        srcs: List[Tensor] = []
        masks: List[Tensor] = []
        i = 0
        for proj in self.input_proj:
            src, mask = features[i].decompose()
            assert mask is not None
            srcs.append(proj(src))
            masks.append(mask)
            i += 1
        m = samples.mask
        assert m is not None
        src = self.extra_proj(features[-1].tensors)
        mask = F.interpolate(m[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
        pos.append(self.backbone[1](UpstreamNestedTensor(src, mask)).to(src.dtype))
        srcs.append(src)
        masks.append(mask)
        pooled = torch.zeros_like(self.query_embed.weight[:1]).expand(srcs[0].shape[0], -1)
        for s, p, mk in zip(srcs, pos, masks):
            valid = (~mk)[:, None].to(s.dtype)
            pooled = pooled + ((s + p) * valid).sum([2, 3]) / valid.sum([2, 3]).clamp(min=1)
        hs = self.query_embed.weight[None] + pooled[:, None]
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid()}
