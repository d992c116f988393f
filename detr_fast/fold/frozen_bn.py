"""FrozenBatchNorm2d: BatchNorm2d with fixed statistics and affine parameters (as in DETR)."""
import torch
from torch import Tensor, nn

from ..validation import check_eps


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are buffers that never change.

    Loads BatchNorm2d checkpoints: the ``num_batches_tracked`` entry they carry is ignored.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"n (number of channels) must be a positive int, got {n!r}")
        check_eps(eps)
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = eps

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def scale_and_shift(self):
        """Per-channel (scale, shift) with bn(x) == x * scale + shift. The one folding formula."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        # One pass over the activation: shift + x * scale in a single addcmul kernel, where the
        # reference reads and writes the activation twice (a multiply, then an add). Only the
        # per-channel scale and shift (C values) take separate small ops. Type promotion and memory
        # format (channels_last in, channels_last out) are the same as x * scale + shift.
        scale, shift = self.scale_and_shift()
        return torch.addcmul(shift.reshape(1, -1, 1, 1), x, scale.reshape(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
