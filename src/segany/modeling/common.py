"""Building blocks shared by several SAM components."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last keeps F.layer_norm on its fused kernel.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def fold_batchnorm_into(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution computing ``norm(conv(x))`` with ``norm`` in eval
    mode (an affine map per channel) and ``conv`` without bias; differentiable."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    return conv.weight * scale.view(-1, 1, 1, 1), norm.bias - norm.running_mean * scale


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + an optional activation (state keys 0, 1).

    With the norm in eval mode (a trained model; training with frozen statistics, as the
    trainer fine-tunes an ImageNet backbone) it runs as one convolution with the norm
    folded in, computed on each call: a pass less over the activations (and under bf16
    autocast, two casts less). Inference folds once instead
    (:func:`segany.inference.folding.fold_batchnorm`).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.GELU,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_chans, out_chans, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_chans, eps=eps),
        )
        if act is not None:
            self.append(act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in, H, W) -> (B, out, H', W')."""
        conv, norm = self[0], self[1]
        # Exporters and compilers see the plain layers and fold them themselves.
        if norm.training or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        weight, bias = fold_batchnorm_into(conv, norm)
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return self[2](x) if len(self) > 2 else x


def sam_neck(in_chans: int, out_chans: int) -> nn.Sequential:
    """SAM's neck: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (state keys neck.0-3)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans),
    )


class MLPBlock(nn.Module):
    """Transformer feed-forward block: Linear -> activation -> Linear."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drops a residual branch per sample while training."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep
