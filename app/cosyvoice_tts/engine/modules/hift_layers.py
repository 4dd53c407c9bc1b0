"""Building blocks of the HiFT vocoder: weight-normed convolutions, the Snake activation, residual blocks.

Parameter names follow the release checkpoint (`convs1.0.parametrizations.weight.original0`, `alpha`, ...), so
the weight norm is torch's own parametrization: its state-dict keys are exactly the checkpoint's, and
`fold_weight_norm` turns it into plain weights once loading is done.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from . import pointwise


def weight_normed(layer: nn.Module) -> nn.Module:
    """`layer` with its weight split into magnitude (`original0`) and direction (`original1`), as trained."""
    return weight_norm(layer)


def fold_weight_norm(root: nn.Module) -> None:
    """Replace every weight-norm parametrization below `root` by the plain weight it computes.

    Inference never changes the weights, so recomputing `g * v / |v|` on every call is wasted work. After
    folding, the state-dict keys become plain `weight`: fold only after the checkpoint is loaded.
    """
    for module in root.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """Padding that keeps the length of a stride-1 convolution (odd kernels)."""
    return (kernel_size * dilation - dilation) // 2


class Snake(nn.Module):
    """x + sin^2(alpha x) / alpha with one learned alpha per channel (linear scale, as HiFT trains it)."""

    # Keeps 1/alpha finite for channels whose alpha was trained to zero; the same constant as training.
    _ALPHA_EPS = 1e-9

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Snake of x * mask (mask: None, or [B, 1, T])."""
        return pointwise.snake(x, mask, self.alpha, self._ALPHA_EPS)


class ResBlock(nn.Module):
    """Residual stack of (Snake, dilated conv, Snake, conv) pairs, one pair per dilation.

    `mask` ([B, 1, T], 1 inside each item, 0 in its padding) is applied after every convolution: conv biases
    would otherwise fill the padding with non-zero values that leak into the item's last samples, while the
    per-item computation sees zero padding there. Snake(0) = 0, so masking convolution outputs is enough.
    """

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_normed(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                    padding=same_padding(kernel_size, d)))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_normed(nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size)))
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # The reference's order (Snake, conv, mask, Snake, conv, mask, add) with each mask and residual add run in
        # the same kernel as the Snake after it (pointwise.py).
        h = self.activations1[0](x)
        last = len(self.convs1) - 1
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            h = self.activations2[i](conv1(h), mask)
            if i == last:
                return x + masked(conv2(h), mask)
            after = self.activations1[i + 1]
            x, h = pointwise.add_snake(x, conv2(h), mask, after.alpha, after._ALPHA_EPS)
        return x


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask, or x itself when there is no padding to mask."""
    return x if mask is None else x * mask
