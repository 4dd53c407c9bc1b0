"""F0 (pitch) predictor of the HiFT vocoder: mel frames -> F0 in Hz per frame."""
from __future__ import annotations

import torch
from torch import nn

from .hift_layers import weight_normed

# The release model stacks five conv + ELU pairs; their positions in `condnet` (0, 2, 4, 6, 8) are part of the
# checkpoint keys, which is why the stack stays an nn.Sequential with the activations in between.
_CONV_LAYERS = 5


class ConvRNNF0Predictor(nn.Module):
    """Five 3-tap convolutions with ELU, then a per-frame linear head; |output| is the F0 in Hz.

    Despite the upstream name there is no recurrent layer. Constructor arguments are upstream's.
    """

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(_CONV_LAYERS):
            layers.append(weight_normed(nn.Conv1d(in_channels if i == 0 else cond_channels, cond_channels,
                                                  kernel_size=3, padding=1)))
            layers.append(nn.ELU())
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, mel: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mel [B, in_channels, T] -> F0 [B, T] (num_class 1). `mask` [B, 1, T] zeroes padded frames
        between layers, so a padded batch item gets the F0 of its unpadded self."""
        x = mel if mask is None else mel * mask
        for layer in self.condnet:
            x = layer(x)
            if mask is not None:
                x = x * mask
        return torch.abs(self.classifier(x.transpose(1, 2)).squeeze(-1))
