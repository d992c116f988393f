"""Whole detectors for the profile and the benchmarks, defined once: transformers' DETR family and
real-time DETRs built offline from their configs, with random weights.

``python -m detr_fast profile --model NAME`` (detr_fast.measure.profile) and the benchmarks' ``model``
stage (bench/test_bench_model.py, through detr_fast.measure.stages) take their models and inputs from here:

- ``detr``: DetrForObjectDetection, default DetrConfig (timm ResNet-50, layer4; 6 + 6 transformer
  layers, 100 queries);
- ``deformable-detr``: DeformableDetrForObjectDetection, default DeformableDetrConfig (timm
  ResNet-50, layers 2-4; 4 levels, 300 queries);
- ``rtdetr``: RTDetrForObjectDetection, default RTDetrConfig (ResNet-50-vd, RT-DETR-R50);
- ``dfine``: DFineForObjectDetection, default DFineConfig (HGNetV2, D-FINE-L's layout).

The weights are random (no network: ``use_pretrained_backbone=False``), and the backbone's frozen
BatchNorm gets random non-identity statistics (weight and variance in [0.75, 1.25], bias and mean
~N(0, 0.1)): a freshly built model's are the identity, and timm zero-initialises the last BN of
each block, which would hide a folding mistake. The real-time DETRs' encoder score head is set to
score every anchor alike (see build: their top-k query selection). ``tiny=True`` (the tests, and
the profile's hidden ``--tiny``) builds the same families with small heads and small backbones
(ResNet-18, RT-DETR-R18, HGNetV2-B0) so that a whole run takes seconds.

Inputs follow each family's image processor: the DETR family gets DETR's two image sizes (800x1066
and 750x1333, scaled), zero-padded to the largest into ``pixel_values`` with an int64
``pixel_mask`` (1 = valid pixel); the real-time DETRs get 640x640 images, unpadded, and no mask.

Nothing here imports transformers until a model is built; without it (or without timm, which the
DETR family's default backbone needs) ``unavailable_reason`` says why and ``build`` raises
``Unavailable`` with that reason.
"""
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

JOINER = "joiner"
DINO_JOINER = "dino-4scale"
# The backbone-stage profiles (`profile --model NAME`, stage by stage) and the Joiner each one times
# (measure/implementations.py builds them): Deformable-DETR's (layers 2-4, the default) and DINO-4scale's.
JOINER_VARIANTS = {JOINER: "layers2-4", DINO_JOINER: "dino-4scale"}
DETR_IMAGE_SIZES = ((800, 1066), (750, 1333))  # DETR's pair of images (repeated to a batch)
REALTIME_IMAGE_SIZES = ((640, 640),)           # the real-time DETRs' input size, batch 1
ISSUE_10_CPU_SIZES = ((400, 600), (400, 600))  # "two 400x600 images": the CPU target of issue 10


class Unavailable(Exception):
    """Something that cannot run here (the reason says why): benchmarks skip on it, the profile
    reports it as a usage error. (detr_fast.measure exports it.)"""


class NotMeasured(Unavailable):
    """An implementation that runs here but is not measured for this stage (e.g. ONNX Runtime
    outside the backbone): the benchmarks say so instead of calling it unavailable."""


# ---------------------------------------------------------------- the configurations

# Small transformer heads for tiny=True (a few ms per forward at the tests' sizes; the tests use them too).
_TINY_DETR_HEAD = dict(encoder_layers=1, decoder_layers=1, encoder_ffn_dim=64, decoder_ffn_dim=64,
                       encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, d_model=64)
TINY_REALTIME_HEAD = dict(encoder_hidden_dim=64, encoder_ffn_dim=128, encoder_attention_heads=4, encoder_layers=1,
                           d_model=64, decoder_ffn_dim=128, decoder_attention_heads=4, decoder_layers=2,
                           num_queries=20, num_denoising=0, num_labels=5, decoder_in_channels=[64, 64, 64])


def _detr_config(t: Any, tiny: bool) -> Any:
    if not tiny:
        return t.DetrConfig(use_pretrained_backbone=False)
    return t.DetrConfig(backbone="resnet18", use_pretrained_backbone=False, **_TINY_DETR_HEAD)


def _deformable_config(t: Any, tiny: bool) -> Any:
    if not tiny:
        return t.DeformableDetrConfig(use_pretrained_backbone=False)
    return t.DeformableDetrConfig(backbone="resnet18", use_pretrained_backbone=False,
                                  **dict(_TINY_DETR_HEAD, decoder_layers=2, encoder_n_points=2, decoder_n_points=2))


def _hgnetv2_b0_config(t: Any) -> Any:
    """HGNetV2-B0 (D-FINE-N/S's backbone), with its learnable affine blocks, levels 2-4."""
    return t.HGNetV2Config(
        hidden_sizes=[128, 256, 512, 1024], embedding_size=32, stem_channels=[3, 16, 16],
        stage_in_channels=[16, 64, 256, 512], stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 256, 512, 1024], stage_num_blocks=[1, 1, 2, 1],
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], use_learnable_affine_block=True,
        out_indices=[2, 3, 4])


def tiny_realtime_settings(t: Any, name: str) -> Dict[str, Any]:
    """The config keywords of a tiny real-time DETR (the tests build these too): "rtdetr" on
    ResNet-18-vd, "dfine" on HGNetV2-B0, both with a small head."""
    if name == "rtdetr":
        backbone = t.RTDetrResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                        out_indices=[2, 3, 4])
        return dict(TINY_REALTIME_HEAD, backbone_config=backbone, encoder_in_channels=[128, 256, 512],
                    hidden_expansion=0.5)
    if name == "dfine":
        return dict(TINY_REALTIME_HEAD, backbone_config=_hgnetv2_b0_config(t), encoder_in_channels=[256, 512, 1024],
                    feat_strides=[8, 16, 32], num_feature_levels=3, decoder_n_points=[4, 4, 4], encode_proj_layers=[2],
                    depth_mult=0.34, hidden_expansion=0.5)
    raise ValueError(f"no tiny configuration of {name!r}")


def _rtdetr_config(t: Any, tiny: bool) -> Any:
    return t.RTDetrConfig(**tiny_realtime_settings(t, "rtdetr")) if tiny else t.RTDetrConfig()


def _dfine_config(t: Any, tiny: bool) -> Any:
    return t.DFineConfig(**tiny_realtime_settings(t, "dfine")) if tiny else t.DFineConfig()


@dataclass(frozen=True)
class ModelSpec:
    """One detector: how to build it and its inputs, and where its backbone stage lives.

    ``family``: "detr" (padded batches with a pixel_mask, a sine position embedding at
    ``model.model.position_embedding``) or "realtime" (unpadded batches, no mask, no sine
    embedding). ``sizes``: the image sizes of one batch at scale 1 (repeated ``--batch`` times).
    ``bench_cpu_sizes``: the benchmarks' case on CPU (the issue's target), scale 1.
    """
    name: str
    model_class: str
    config: Callable[[Any, bool], Any]
    family: str
    description: str
    tiny_description: str
    sizes: Tuple[Tuple[int, int], ...]
    bench_cpu_sizes: Tuple[Tuple[int, int], ...]
    needs_timm: bool

    @property
    def has_pos(self) -> bool:
        return self.family == "detr"


MODELS: Dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("detr", "DetrForObjectDetection", _detr_config, "detr",
              "DetrForObjectDetection, default DetrConfig (timm ResNet-50)",
              "DetrForObjectDetection, tiny (timm ResNet-18, d_model 64, 1+1 layers)",
              DETR_IMAGE_SIZES, ISSUE_10_CPU_SIZES, needs_timm=True),
    ModelSpec("deformable-detr", "DeformableDetrForObjectDetection", _deformable_config, "detr",
              "DeformableDetrForObjectDetection, default DeformableDetrConfig (timm ResNet-50, layers 2-4)",
              "DeformableDetrForObjectDetection, tiny (timm ResNet-18, d_model 64)",
              DETR_IMAGE_SIZES, ISSUE_10_CPU_SIZES, needs_timm=True),
    ModelSpec("rtdetr", "RTDetrForObjectDetection", _rtdetr_config, "realtime",
              "RTDetrForObjectDetection, default RTDetrConfig (ResNet-50-vd: RT-DETR-R50)",
              "RTDetrForObjectDetection, tiny (ResNet-18-vd, d_model 64)",
              REALTIME_IMAGE_SIZES, REALTIME_IMAGE_SIZES, needs_timm=False),
    ModelSpec("dfine", "DFineForObjectDetection", _dfine_config, "realtime",
              "DFineForObjectDetection, default DFineConfig (HGNetV2, D-FINE-L layout)",
              "DFineForObjectDetection, tiny (HGNetV2-B0, d_model 64)",
              REALTIME_IMAGE_SIZES, REALTIME_IMAGE_SIZES, needs_timm=False),
)}
NAMES = tuple(JOINER_VARIANTS) + tuple(MODELS)  # what `profile --model` accepts


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {name!r}")
    return MODELS[name]


def unavailable_reason(name: str) -> Optional[str]:
    """Why model ``name`` cannot be built here (transformers, timm or the class missing), or None."""
    model = spec(name)
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as err:
        return f"the {name} model needs transformers, which does not import here ({err}); pip install -e \".[hf]\""
    if not hasattr(transformers, model.model_class):
        return f"transformers {transformers.__version__} has no {model.model_class}"
    if model.needs_timm:
        try:
            importlib.import_module("timm")
        except ImportError as err:
            return (f"the {name} model's default backbone is timm's ResNet, and timm does not import here ({err}); "
                    "pip install -e \".[hf]\"")
    return None


# ---------------------------------------------------------------- building

def randomize_frozen_bn(module: nn.Module, generator: torch.Generator, where: str = "") -> None:
    """Non-identity frozen-BN statistics (weight and running_var in [0.75, 1.25], bias and
    running_mean ~N(0, 0.1)) in every buffer whose name contains ``where``: a fresh model's are
    the identity (and timm zero-initialises the last BN of each block), which would hide folding
    mistakes."""
    with torch.no_grad():
        for name, buf in module.named_buffers():
            if where not in name or not buf.is_floating_point():
                continue
            if name.endswith(("weight", "running_var")):
                buf.copy_(torch.rand(buf.shape, generator=generator) * 0.5 + 0.75)
            elif name.endswith(("bias", "running_mean")):
                buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)


def randomize_backbone(model: nn.Module, seed: int = 0) -> None:
    """randomize_frozen_bn on the backbone and, where HGNetV2 has learnable affine blocks, random
    ones (scale in [0.5, 1.5], bias ~N(0, 0.1))."""
    gen = torch.Generator().manual_seed(seed)
    randomize_frozen_bn(model, gen, "backbone")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "backbone" in name and ".lab." in name:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5 if name.endswith("scale")
                            else torch.randn(param.shape, generator=gen) * 0.1)


def constant_query_scores(model: nn.Module) -> None:
    """Make a real-time DETR's encoder score head constant (weight 0, bias -100).

    Its top-k query selection: with random weights the anchors' scores are nearly tied (anchors
    outside the image score exactly alike: their memory is zeroed; the others differ by ~1e-3 or
    less), so a 1e-7 change of the features (folding) reorders the selected queries, and the
    outputs, compared query by query, differ completely (D-FINE's default config at 640x640: 22 of
    300 queries, box error 0.7). With every anchor scoring exactly -100.0 top-k picks the same
    anchors in the same order on both sides, and a comparison measures the features' effect on the
    decoder. (The bias alone is not enough: it works for RT-DETR only because the random head's
    ~1e-8 contributions vanish below float32's resolution at 100, not for D-FINE's ~1e-3.) Trained
    weights separate the scores; the time of the selection does not depend on them."""
    with torch.no_grad():
        model.model.enc_score_head.bias.fill_(-100.0)
        model.model.enc_score_head.weight.zero_()


def build(name: str, *, tiny: bool = False, seed: int = 0) -> nn.Module:
    """Model ``name`` in eval mode with random weights (seeded) and a randomized backbone (see
    randomize_backbone); raises Unavailable where it cannot be built here."""
    model_spec = spec(name)
    reason = unavailable_reason(name)
    if reason:
        raise Unavailable(reason)
    transformers = importlib.import_module("transformers")
    torch.manual_seed(seed)
    model = getattr(transformers, model_spec.model_class)(model_spec.config(transformers, tiny)).eval()
    randomize_backbone(model, seed)
    if model_spec.family == "realtime":
        constant_query_scores(model)
    return model


def describe(name: str, tiny: bool = False) -> str:
    model_spec = spec(name)
    return model_spec.tiny_description if tiny else model_spec.description


# ---------------------------------------------------------------- the stages' parts and inputs

def backbone_of(model: nn.Module) -> nn.Module:
    """The conv encoder: ``model.model.backbone``, called as ``(pixel_values, pixel_mask)``."""
    return model.model.backbone


def position_embedding_of(model: nn.Module) -> Optional[nn.Module]:
    """The DETR family's sine embedding (``model.model.position_embedding``); None for the
    real-time DETRs (their encoder's embedding is mask-free and computed inside the encoder)."""
    return getattr(model.model, "position_embedding", None)


def image_sizes(name: str, scale: float = 1.0, batch: int = 1,
                sizes: Optional[Sequence[Tuple[int, int]]] = None) -> List[Tuple[int, int]]:
    """The images of one run: ``sizes`` (default: the model's, see ModelSpec.sizes) scaled by
    ``scale`` and repeated ``batch`` times."""
    base = spec(name).sizes if sizes is None else sizes
    scaled = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in base]
    return scaled * batch


def inputs(name: str, sizes: Sequence[Tuple[int, int]], device: torch.device,
           dtype: torch.dtype = torch.float32) -> Dict[str, Tensor]:
    """The forward's keyword arguments for images of ``sizes`` (random, seeded by their number):
    DETR family: zero-padded ``pixel_values`` and an int64 ``pixel_mask`` (1 = valid), as DETR's
    image processor gives them; real-time DETRs: ``pixel_values`` alone (all images must have the
    same size: their processor resizes, it does not pad)."""
    model_spec = spec(name)
    if not sizes:
        raise ValueError("need at least one image size")
    gen = torch.Generator().manual_seed(len(sizes) * 1000 + 7)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if model_spec.family == "realtime" and any((h, w) != (height, width) for h, w in sizes):
        raise ValueError(f"{name}: the real-time DETRs take unpadded batches of one size, got {list(sizes)}")
    pixel_values = torch.zeros(len(sizes), 3, height, width)
    pixel_mask = torch.zeros(len(sizes), height, width, dtype=torch.int64)
    for i, (h, w) in enumerate(sizes):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=gen)
        pixel_mask[i, :h, :w] = 1
    result = {"pixel_values": pixel_values.to(device=device, dtype=dtype)}
    if model_spec.family == "detr":
        result["pixel_mask"] = pixel_mask.to(device)
    return result


def backbone_inputs(model_inputs: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """(pixel_values, pixel_mask) as the model passes them to its conv encoder: without a mask the
    model makes one of ones (int64)."""
    pixel_values = model_inputs["pixel_values"]
    mask = model_inputs.get("pixel_mask")
    if mask is None:
        b, _, h, w = pixel_values.shape
        mask = torch.ones(b, h, w, dtype=torch.int64, device=pixel_values.device)
    return pixel_values, mask


def query_check(model: nn.Module, name: str, sizes: Sequence[Tuple[int, int]]) -> Optional[str]:
    """Why a real-time DETR cannot run on images of ``sizes`` (fewer anchors than the queries it
    selects from them), or None."""
    if spec(name).family != "realtime":
        return None
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    strides = getattr(model.config, "feat_strides", [8, 16, 32])
    anchors = sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)
    queries = int(model.config.num_queries)
    if anchors < queries:
        return (f"{name} selects {queries} queries among its anchors, and images of {height}x{width} give only "
                f"{anchors}; use larger images (a larger --scale, --bench-model-scale)")
    return None
