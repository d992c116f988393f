"""SineParams: the numbers that define a sine position embedding, validated in one place.

DETR's embedding is (num_pos_feats, temperature, normalize, scale); Deformable-DETR adds an
``offset`` (-0.5) to the cumulative position, and both divide by (extent + eps) when normalizing.
DINO's PositionEmbeddingSineHW (DN-/DAB-DETR, Grounding DINO) takes one temperature per axis:
``temperature`` is then the row (y, H) one and ``temperature_w`` the column (x, W) one.
Every path (reference, separable fallback, kernels) takes one SineParams instead of six numbers.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

FREQUENCY_RULES = ("detr", "dab")


@dataclass(frozen=True)
class SineParams:
    num_pos_feats: int = 64
    temperature: float = 10000.0
    normalize: bool = False
    scale: float = 2 * math.pi
    offset: float = 0.0
    eps: float = 1e-6
    # How the frequencies temperature ** (2 * (i // 2) / F) are rounded in float32: "detr" divides
    # by F last (DETR, Deformable-DETR, transformers' DETR family); "dab" multiplies by the float
    # 2 / F (transformers' DAB-DETR). The same values up to the last bit (equal when F is a power of 2).
    frequencies: str = "detr"
    # The column (x) half's temperature; None: the same as ``temperature`` (which is then both
    # axes'). A value equal to ``temperature`` is stored as None, so equal pairs compare and hash
    # equal to the single-temperature params and take the same code paths.
    temperature_w: Optional[float] = None

    def __post_init__(self) -> None:
        f = self.num_pos_feats
        if not isinstance(f, int) or isinstance(f, bool) or f <= 0 or f % 2 != 0:
            raise ValueError(f"num_pos_feats must be a positive even int, got {f!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if self.temperature_w is not None:
            if not self.temperature_w > 0:
                raise ValueError(f"temperature_w must be positive, got {self.temperature_w!r}")
            if self.temperature_w == self.temperature:
                object.__setattr__(self, "temperature_w", None)
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if self.frequencies not in FREQUENCY_RULES:
            raise ValueError(f"frequencies must be one of {FREQUENCY_RULES}, got {self.frequencies!r}")
        if not math.isfinite(self.scale) or not math.isfinite(self.offset):
            raise ValueError(f"scale and offset must be finite, got scale={self.scale!r}, offset={self.offset!r}")

    @property
    def temperatures(self) -> Tuple[float, float]:
        """(H, W): the row (y) half's temperature and the column (x) half's."""
        return self.temperature, self.temperature if self.temperature_w is None else self.temperature_w

    @classmethod
    def from_args(cls, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                  scale: Optional[float] = None, offset: float = 0.0, eps: float = 1e-6,
                  temperature_w: Optional[float] = None) -> "SineParams":
        """The reference constructor's rules: ``scale`` only with ``normalize``, default 2*pi.
        ``temperature_w`` (None: ``temperature``) is the column (x) half's temperature."""
        if scale is not None and normalize is False:
            raise ValueError("normalize should be True if scale is passed")
        return cls(num_pos_feats, float(temperature), bool(normalize),
                   float(2 * math.pi if scale is None else scale), float(offset), float(eps),
                   temperature_w=None if temperature_w is None else float(temperature_w))
