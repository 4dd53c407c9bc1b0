"""Linears that read the same input, stored as one matrix so that one GEMM computes them all.

On a GPU the small model stages are bound by kernel count, not by arithmetic: q/k/v as three GEMMs cost three
launches where one wider GEMM does the same work. `fuse_linears` concatenates the weights (and biases) into one
tensor and turns each linear's parameters into views of it, so the checkpoint names, `state_dict()` and the
memory footprint stay as they were; `FusedLinears` computes every output with one `F.linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinears(nn.Module):
    """Holds the joined weight/bias (non-persistent buffers: the checkpoint keeps the per-linear names)."""

    def __init__(self, linears: list[nn.Linear]):
        super().__init__()
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("fused linears must read inputs of the same width")
        if len({lin.bias is None for lin in linears}) != 1:
            raise ValueError("fused linears must all have a bias or all have none")
        self.sizes = [lin.out_features for lin in linears]
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in linears])
            bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        offset = 0
        for lin, size in zip(linears, self.sizes):
            lin.weight = nn.Parameter(weight[offset:offset + size], requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias[offset:offset + size], requires_grad=False)
            offset += size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
