"""Tiny transformers DETR-family models for the tests: random weights, built offline from configs.

Every builder gives the model in eval mode with random, non-identity frozen-BN statistics (a
freshly built model's are the identity and timm zero-initialises the last BN of each block, which
would hide folding mistakes).
"""
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn

from detr_fast.model_zoo import constant_query_scores, randomize_backbone

transformers = pytest.importorskip("transformers", reason="the transformers tests need the 'hf' extra")
pytest.importorskip("timm", reason="the transformers tests need the 'hf' extra (timm)")

TINY = dict(encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2,
            decoder_attention_heads=2, num_queries=10)

# family -> (config class, model class, extra config)
FAMILIES: Dict[str, Tuple[str, str, dict]] = {
    "detr": ("DetrConfig", "DetrForObjectDetection", dict(d_model=64)),
    "conditional": ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection", dict(d_model=64)),
    "deformable": ("DeformableDetrConfig", "DeformableDetrForObjectDetection",
                   dict(d_model=64, decoder_layers=2, encoder_n_points=2, decoder_n_points=2)),
    "table": ("TableTransformerConfig", "TableTransformerForObjectDetection", dict(d_model=64)),
    "dab": ("DabDetrConfig", "DabDetrForObjectDetection", dict(hidden_size=64)),
    "detr_segmentation": ("DetrConfig", "DetrForSegmentation", dict(d_model=64, encoder_attention_heads=8)),
}


def _hf_resnet(family: str) -> dict:
    # Deformable DETR uses three levels; the segmentation head needs all four.
    stages = {"deformable": ["stage2", "stage3", "stage4"],
              "detr_segmentation": ["stage1", "stage2", "stage3", "stage4"]}.get(family, ["stage4"])
    return dict(use_timm_backbone=False, backbone_config=transformers.ResNetConfig(out_features=stages))


BACKBONES: Dict[str, Callable[[str], dict]] = {
    "timm-resnet50": lambda family: dict(use_pretrained_backbone=False),
    "timm-resnet18": lambda family: dict(backbone="resnet18", use_pretrained_backbone=False),
    "hf-resnet50": _hf_resnet,
}


def config(family: str, backbone: str, **overrides):
    config_name, _, extra = FAMILIES[family]
    return getattr(transformers, config_name)(**{**TINY, **extra, **BACKBONES[backbone](family), **overrides})


def build(family: str, backbone: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config(family, backbone, **overrides)).eval()
    randomize_backbone(model, seed)
    return model


def inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two images of 96 x 128, the second padded at the bottom and right, as an image processor
    gives them: pixel_values and an int64 pixel_mask with 1 on valid pixels."""
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 96, 128, generator=gen).to(dtype)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.int64)
    pixel_mask[1, 70:] = 0
    pixel_mask[1, :, 90:] = 0
    pixel_values[1] *= pixel_mask[1]
    return pixel_values, pixel_mask


def outputs(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The model's predictions: logits, boxes and (segmentation) masks."""
    out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return {k: getattr(out, k) for k in ("logits", "pred_boxes", "pred_masks") if getattr(out, k, None) is not None}


# ---------------------------------------------------------------- the real-time DETRs

_REALTIME_HEAD = dict(encoder_hidden_dim=64, encoder_ffn_dim=128, encoder_attention_heads=4, encoder_layers=1,
                      d_model=64, decoder_ffn_dim=128, decoder_attention_heads=4, decoder_layers=2, num_queries=20,
                      num_denoising=0, num_labels=5)


def _hgnetv2_b0():
    """D-FINE's smallest backbone (HGNetV2-B0, as D-FINE-N/S use it), levels 2-4."""
    return transformers.HGNetV2Config(
        hidden_sizes=[128, 256, 512, 1024], embedding_size=32, stem_channels=[3, 16, 16],
        stage_in_channels=[16, 64, 256, 512], stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024], stage_num_blocks=[1, 1, 2, 1],
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], use_learnable_affine_block=True,
        out_indices=[2, 3, 4])


def realtime_config(name: str, **overrides):
    t = transformers
    kwargs = dict(_REALTIME_HEAD, decoder_in_channels=[64, 64, 64])
    if name == "rtdetr-r50":
        kwargs.update(backbone_config=t.RTDetrResNetConfig(out_indices=[2, 3, 4]),
                      encoder_in_channels=[512, 1024, 2048])
    elif name == "rtdetr-r18":
        kwargs.update(backbone_config=t.RTDetrResNetConfig(layer_type="basic", depths=[2, 2, 2, 2],
                                                           hidden_sizes=[64, 128, 256, 512], out_indices=[2, 3, 4]),
                      encoder_in_channels=[128, 256, 512], hidden_expansion=0.5)
    elif name == "dfine":
        kwargs.update(backbone_config=_hgnetv2_b0(), encoder_in_channels=[256, 512, 1024], feat_strides=[8, 16, 32],
                      num_feature_levels=3, decoder_n_points=[4, 4, 4], encode_proj_layers=[2], depth_mult=0.34,
                      hidden_expansion=0.5)
    elif name != "rtdetr-v2":
        raise ValueError(f"unknown real-time DETR {name!r}")
    kwargs.update(overrides)
    config_class = {"rtdetr-v2": t.RTDetrV2Config, "dfine": t.DFineConfig}.get(name, t.RTDetrConfig)
    return config_class(**kwargs)


REALTIME = {"rtdetr-r50": ("RTDetrForObjectDetection", 55), "rtdetr-r18": ("RTDetrForObjectDetection", 23),
            "rtdetr-v2": ("RTDetrV2ForObjectDetection", 55), "dfine": ("DFineForObjectDetection", 42)}


def build_realtime(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny real-time DETR (full-size backbone) with random frozen-BN statistics and HGNetV2
    learnable affines, its query selection made deterministic (model_zoo.constant_query_scores)."""
    torch.manual_seed(seed)
    model = getattr(transformers, REALTIME[name][0])(realtime_config(name, **overrides)).eval()
    randomize_backbone(model, seed)
    constant_query_scores(model)
    return model
