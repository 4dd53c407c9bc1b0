"""Brings HiFT checkpoints of any vintage to the key names of `HiFTGenerator`'s state dict.

Two differences exist in the wild:
* checkpoints trained as part of a HiFi-GAN wrapper carry a `generator.` prefix (upstream strips it);
* torch < 2.1 (`torch.nn.utils.weight_norm`) saved weight norm as `<layer>.weight_g` (magnitude) and
  `<layer>.weight_v` (direction); the parametrization API names the same tensors
  `<layer>.parametrizations.weight.original0` and `.original1`. The official hift.pt may carry either.
"""
from __future__ import annotations

from typing import Mapping

import torch

_WRAPPER_PREFIX = "generator."
_LEGACY_WEIGHT_NORM = {
    ".weight_g": ".parametrizations.weight.original0",  # magnitude g
    ".weight_v": ".parametrizations.weight.original1",  # direction v
}


def normalize_hift_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return a new state dict with the wrapper prefix stripped and legacy weight-norm keys renamed.

    Raises ValueError when two keys land on the same name (a checkpoint mixing both namings for one layer),
    since silently keeping either would load the wrong weights.
    """
    normalized: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = key[len(_WRAPPER_PREFIX):] if key.startswith(_WRAPPER_PREFIX) else key
        for legacy_suffix, suffix in _LEGACY_WEIGHT_NORM.items():
            if new_key.endswith(legacy_suffix):
                new_key = new_key[: -len(legacy_suffix)] + suffix
                break
        if new_key in normalized:
            raise ValueError(f"HiFT checkpoint key {key!r} collides with another key as {new_key!r}")
        normalized[new_key] = value
    return normalized
