"""torchvision's ResNet pieces with their frozen BN folded: static classes, so that they stay
TorchScript-able (DETR scripts its models) and picklable by name.

FoldedBottleneck / FoldedBasicBlock run each conv + FrozenBatchNorm2d as one convolution, the last
one adding the residual and applying the ReLU in its epilogue; FoldedIntermediateLayerGetter and
FoldedResNet fold the stem (conv1/bn1/relu) and run the body in channels_last when asked, returning
features in the memory format and dtype the reference returns.
"""
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ..dispatch import compiling, exporting
from .fused_conv import conv_bn, foldable, memory_format_of
from .sequential import private_output

STEM_ATTR = "_detr_fast_stem"
CHANNELS_LAST_ATTR = "_detr_fast_channels_last"


def shortcut(downsample: Optional[nn.Module], x: Tensor, owns_input: bool) -> Tuple[Tensor, bool]:
    """A residual block's shortcut of ``x``, and whether it is private (nobody but the block holds
    it, so the block may write its result into it): x itself when the caller owns it, a folded
    downsample's output always, another module's output when no hook can see it."""
    if downsample is None:
        return x, owns_input
    if isinstance(downsample, nn.Sequential) and len(downsample) == 2 and foldable(downsample[0], downsample[1]):
        return conv_bn(x, downsample[0], downsample[1]), True
    out = downsample(x)
    return out, (owns_input if out is x else private_output(downsample))


# Scripting: TorchScript compiles forward's scripting branch only, which runs torchvision's own
# (unfolded) computation, spelled out again because TorchScript cannot call the base class's
# forward. A scripted converted model therefore computes exactly what the reference does.

class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck with each conv + frozen BN folded; the last conv's epilogue adds the
    residual and applies the ReLU."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            return self.relu(self.bn3(self.conv3(out)) + identity)
        return self.folded_forward(x)

    @torch.jit.unused
    def folded_forward(self, x: Tensor, owns_input: bool = False) -> Tensor:
        """``owns_input``: nothing but this call holds x (see FoldedSequential)."""
        identity, private = shortcut(self.downsample, x, owns_input)
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        out = conv_bn(out, self.conv2, self.bn2, relu=True)
        return conv_bn(out, self.conv3, self.bn3, relu=True, residual=identity, reuse_residual=private)


class FoldedBasicBlock(BasicBlock):
    """torchvision's BasicBlock (resnet18/34) with each conv + frozen BN folded."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)
        return self.folded_forward(x)

    @torch.jit.unused
    def folded_forward(self, x: Tensor, owns_input: bool = False) -> Tensor:
        """``owns_input``: nothing but this call holds x (see FoldedSequential)."""
        identity, private = shortcut(self.downsample, x, owns_input)
        out = conv_bn(x, self.conv1, self.bn1, relu=True)
        return conv_bn(out, self.conv2, self.bn2, relu=True, residual=identity, reuse_residual=private)


def stem_plan(children: "OrderedDict[str, nn.Module]", returned: List[str]) -> Optional[Tuple[str, str, str]]:
    """(conv, bn, relu) names of a foldable stem at the top of ``children``, else None."""
    names = list(children.keys())
    if names[:3] != ["conv1", "bn1", "relu"] or any(n in returned for n in ("conv1", "bn1")):
        return None
    if not foldable(children["conv1"], children["bn1"]) or type(children["relu"]) is not nn.ReLU:
        return None
    return ("conv1", "bn1", "relu")


def enter_layout(module: nn.Module, x: Tensor, channels_last: Optional[bool] = None) -> Tensor:
    """``x`` in the layout a folded body runs in: channels_last for inference where the fold chose
    it (``channels_last``, default: what folding recorded on ``module``); as it comes while the body
    trains (grad enabled, a trainable parameter). In channels_last PyTorch's CPU convolutions gave
    far less accurate training gradients: 3.8e-3 norm-wise from float64 against 5e-7 NCHW on a
    ResNet-50 Joiner, upstream's own model in channels_last included (docs/training.md)."""
    if channels_last is None:
        channels_last = module.__dict__.get(CHANNELS_LAST_ATTR, False)
    if channels_last and x.dim() == 4 and not (torch.is_grad_enabled() and _trains(module)):
        return x.contiguous(memory_format=torch.channels_last)
    return x


def restore_layout(y: Tensor, like: torch.memory_format, bn_dtype: Optional[torch.dtype]) -> Tensor:
    """A returned feature map in the memory format the body's input had, and in the dtype the
    reference returns."""
    # Memory format in = memory format out: a caller who passes NCHW-contiguous images gets
    # NCHW-contiguous features, like the reference (code downstream may .view() them).
    if like == torch.contiguous_format and y.device.type == "cpu" and y.dim() == 4 and y.shape[1] > 1 \
            and not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last) \
            and not (exporting() or compiling()) and not (torch.is_grad_enabled() and y.requires_grad):
        # Copies into views of one tensor from several threads: for inference only (autograd would
        # record them concurrently; tracing and compiling would not follow them).
        y = _nhwc_to_nchw(y)
    else:
        y = y.contiguous(memory_format=like)
    # The reference's last op per layer is its frozen BN, whose buffers promote the conv's output:
    # under autocast its features are float32, not bf16/fp16. Return the same dtype, so that the
    # features and the pos (cast to the features' dtype by the Joiner) match the reference's.
    if bn_dtype is not None:
        y = y.to(torch.promote_types(y.dtype, bn_dtype))
    return y


_COPY_POOL: List[ThreadPoolExecutor] = []


def _nhwc_to_nchw(y: Tensor) -> Tensor:
    """One (H*W, C) -> (C, H*W) transposed copy per image: on CPU PyTorch's blocked 2-D transpose,
    the images' copies on parallel threads (the copy releases the GIL). Measured on ResNet-50's
    three features at 400x666: 17 ms with .contiguous(), 12 ms per image, 8 ms on 2 threads."""
    n, c, h, w = y.shape
    out = torch.empty((n, c, h, w), dtype=y.dtype, device=y.device)
    # Inference mode is per thread: the pool's threads must write the caller's inference tensors in it.
    inference = torch.is_inference_mode_enabled()

    def copy(i: int) -> None:
        with torch.inference_mode(inference):
            out[i].view(c, h * w).copy_(y[i].permute(1, 2, 0).reshape(h * w, c).t())
    threads = min(n, torch.get_num_threads())
    if threads < 2:
        for i in range(n):
            copy(i)
        return out
    if not _COPY_POOL:
        _COPY_POOL.append(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="detr_fast_nchw"))
    list(_COPY_POOL[0].map(copy, range(n)))
    return out


def _trains(module: nn.Module) -> bool:
    """Whether any of the module's parameters requires grad (autograd will differentiate it)."""
    return any(p.requires_grad for p in module.parameters())


def bn_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the body's frozen BN buffers (the first buffer), or None without buffers."""
    for buf in module.buffers():
        return buf.dtype if buf.is_floating_point() else None
    return None


class FoldedIntermediateLayerGetter(IntermediateLayerGetter):
    """IntermediateLayerGetter whose stem conv1/bn1/relu runs as one folded convolution."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if torch.jit.is_scripting():
            out: Dict[str, Tensor] = OrderedDict()
            for name, module in self.items():
                x = module(x)
                if name in self.return_layers:
                    out[self.return_layers[name]] = x
            return out
        return self._folded(x)

    @torch.jit.unused
    def _folded(self, x: Tensor) -> Dict[str, Tensor]:
        like = memory_format_of(x)
        body_dtype = bn_dtype(self)
        x = enter_layout(self, x)  # NCHW while training (see enter_layout)
        stem = self.__dict__.get(STEM_ATTR)
        out: Dict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            if stem is not None and name in stem[1:]:
                continue  # consumed by the folded stem convolution
            if stem is not None and name == stem[0]:
                x = conv_bn(x, self[stem[0]], self[stem[1]], relu=True)
            else:
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = restore_layout(x, like, body_dtype)
        return out


class FoldedResNet(ResNet):
    """torchvision's ResNet whose stem conv1/bn1/relu runs as one folded convolution."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))
        return self._folded(x)

    @torch.jit.unused
    def _folded(self, x: Tensor) -> Tensor:
        x = enter_layout(self, x)
        if self.__dict__.get(STEM_ATTR) is not None:
            x = conv_bn(x, self.conv1, self.bn1, relu=True)
        else:
            x = self.relu(self.bn1(self.conv1(x)))
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


BLOCKS = {Bottleneck: FoldedBottleneck, BasicBlock: FoldedBasicBlock}
BLOCK_PAIRS = {Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
                BasicBlock: (("conv1", "bn1"), ("conv2", "bn2"))}


def block_foldable(block: nn.Module, base: type) -> bool:
    if type(block.relu) is not nn.ReLU:
        return False
    if not all(foldable(getattr(block, c), getattr(block, b)) for c, b in BLOCK_PAIRS[base]):
        return False
    ds = block.downsample
    return ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 2 and foldable(ds[0], ds[1]))
