"""FoldedSequential: a ResNet layer (nn.Sequential of folded residual blocks) that lets each block
write its residual add into its own input when that input is private.

A block's input is private when the previous block of the same layer produced it in this call and
nothing else could hold it: no hook on either block or on any module inside them (a forward hook
could keep the previous block's output; a pre-hook on the next block, or on a unit inside it that
the block calls with its input, could keep that input) and no global module hook. The block is then
called through its ``folded_forward(x, owns_input=True)``; in every other case through its normal
``__call__``. Without a private input a block still writes into its own downsample output (made
in the block). The saving is the fresh output tensor per block: see onednn.py.
"""
import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_hooks


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or module_hooks._global_backward_hooks)


def private_output(module: nn.Module) -> bool:
    """Whether what ``module`` returns is seen by nobody but its caller (no hook in it or above)."""
    return not _global_hooks() and not any(_hooked(m) for m in module.modules())


class FoldedSequential(nn.Sequential):
    """nn.Sequential of folded blocks, passing each block whether its input is private."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            for block in self:
                x = block(x)
            return x
        return self._folded(x)

    @torch.jit.unused
    def _folded(self, x: Tensor) -> Tensor:
        owned = False
        for block in self:
            direct = getattr(block, "folded_forward", None) if private_output(block) else None
            x = direct(x, owned) if direct is not None else block(x)
            owned = direct is not None
        return x


def has_folded_forward(module: nn.Module) -> bool:
    return callable(getattr(module, "folded_forward", None))
