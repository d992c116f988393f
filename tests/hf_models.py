"""Tiny transformers DETR-family models for the tests: random weights, built offline from configs.

Every builder gives the model in eval mode with random, non-identity frozen-BN statistics (a
freshly built model's are the identity and timm zero-initialises the last BN of each block, which
would hide folding mistakes).
"""
from typing import Callable, Dict, Tuple

import pytest
import torch
from torch import nn

from detr_fast.measure.model_zoo import (
    TINY_REALTIME_HEAD,
    constant_query_scores,
    randomize_backbone,
    tiny_realtime_settings,
)

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

def realtime_config(name: str, **overrides):
    t = transformers
    if name in ("rtdetr-r18", "dfine"):  # the model zoo's tiny configurations
        kwargs = tiny_realtime_settings(t, name.split("-")[0])
    elif name in ("rtdetr-r50", "rtdetr-v2"):
        kwargs = dict(TINY_REALTIME_HEAD)
        if name == "rtdetr-r50":
            kwargs.update(backbone_config=t.RTDetrResNetConfig(out_indices=[2, 3, 4]),
                          encoder_in_channels=[512, 1024, 2048])
    else:
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
