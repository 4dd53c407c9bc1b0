"""HiFT's neural-source-filter excitation: F0 per mel frame -> a harmonic + noise signal at the audio rate.

This is upstream's `SourceModuleHnNSF2` / `SineGen2` (the variant every 24 kHz model uses), restated:

* the phase of harmonic h advances by h * F0 / sampling_rate per sample; upstream computes that on the
  sample-rate signal, linearly decimates it to one value per frame, integrates per frame and linearly
  interpolates the phase back up. The decimation reads samples 239 and 240 (0-based) of each 480-sample
  frame, both inside the frame, so it returns the frame's value: we start from the per-frame value;
* voiced samples (F0 above the threshold) carry the sines plus faint noise (std `noise_std`), unvoiced
  ones noise only (std sine_amp / 3);
* a learned linear layer merges the harmonics, tanh bounds the result.

Randomness, and how it is made reproducible
-------------------------------------------
At inference upstream draws three tensors from the global RNG, in this order:
  1. `torch.rand(B, harmonics)`: a random initial phase added to the first sample only. The decimation
     above never reads the first sample, so this draw has no effect on the output;
  2. `torch.randn_like(sines)`, [B, samples, harmonics] filled in [B, harmonics, samples] memory order:
     the additive noise, which does reach the audio;
  3. `torch.randn(B, samples, 1)`: a "noise branch" the inference path throws away.
We draw 1 (and discard it) and 2, from a caller-given `torch.Generator` when there is one, so that
`torch.manual_seed(s)` before upstream's call and `torch.Generator().manual_seed(s)` (or the same global
seed) for ours produce the same noise; 3 is not drawn (it only moves the RNG state left behind). With one
generator per batch item, each item draws as if it were alone: its audio does not depend on its batch mates.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

NoiseGenerator = Union[torch.Generator, Sequence[Union[torch.Generator, None]], None]


class HarmonicNoiseSource(nn.Module):
    """F0 [B, T] in Hz -> excitation [B, 1, T * samples_per_frame] (float32).

    Attribute names (`l_linear`) are the checkpoint's (`m_source.l_linear.*`).
    """

    def __init__(self, sampling_rate: int, samples_per_frame: int, harmonic_num: int, sine_amp: float,
                 noise_std: float, voiced_threshold: float):
        super().__init__()
        self.sampling_rate = sampling_rate
        self.samples_per_frame = samples_per_frame
        self.harmonics = harmonic_num + 1  # the fundamental and its overtones
        self.sine_amp = sine_amp
        self.noise_std = noise_std
        self.voiced_threshold = voiced_threshold
        self.l_linear = nn.Linear(self.harmonics, 1)

    def forward(self, f0: torch.Tensor, frame_lengths: torch.Tensor | None = None,
                generator: NoiseGenerator = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise: `standard_noise(...)` drawn beforehand, used instead of drawing from `generator`."""
        batch, n_frames = f0.shape
        n_samples = n_frames * self.samples_per_frame
        # Phases accumulate over the whole utterance: float32 even when the network runs in half precision.
        f0 = f0.float()
        if frame_lengths is not None:
            # F0 0 past an item's end: unvoiced, and its phase stops advancing, so the last real frame's phase
            # is repeated and the upsampling near the item's end sees what the item alone would see there.
            frames = torch.arange(n_frames, device=f0.device)[None, :]
            f0 = f0 * (frames < frame_lengths.to(f0.device)[:, None])

        # Same call as upstream's nn.Upsample: its float index rounding decides the frame of boundary samples.
        f0_samples = F.interpolate(f0[:, None, :], scale_factor=float(self.samples_per_frame), mode="nearest")
        voiced = (f0_samples.transpose(1, 2) > self.voiced_threshold).float()  # [B, L, 1]

        overtone = torch.arange(1, self.harmonics + 1, device=f0.device, dtype=torch.float32)
        cycles_per_sample = (f0[:, :, None] * overtone / self.sampling_rate) % 1  # [B, T, H]
        frame_phase = torch.cumsum(cycles_per_sample, dim=1) * 2 * math.pi
        # Each frame spans samples_per_frame samples: scale the per-sample phase step up before interpolating.
        phase = F.interpolate(frame_phase.transpose(1, 2) * self.samples_per_frame,
                              scale_factor=float(self.samples_per_frame), mode="linear").transpose(1, 2)
        sines = torch.sin(phase) * self.sine_amp

        noise_amp = voiced * self.noise_std + (1 - voiced) * self.sine_amp / 3
        if noise is None:
            noise = self.standard_noise(batch, n_samples, frame_lengths, generator, f0.device)
        noise = noise_amp * noise
        excitation = sines * voiced + noise

        merged = torch.tanh(self.l_linear(excitation.to(self.l_linear.weight.dtype)))
        return merged.float().transpose(1, 2)

    def standard_noise(self, batch: int, n_samples: int, frame_lengths: torch.Tensor | None,
                       generator: NoiseGenerator, device: torch.device) -> torch.Tensor:
        """N(0, 1) noise [B, n_samples, harmonics], drawn in upstream's order (see the module docstring)."""
        if generator is None or isinstance(generator, torch.Generator):
            return self.draw(batch, n_samples, generator, device)
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        lengths = [n_samples] * batch if frame_lengths is None else \
            [int(n) * self.samples_per_frame for n in frame_lengths.tolist()]
        noise = torch.zeros(batch, n_samples, self.harmonics, device=device)
        for item, (item_generator, item_samples) in enumerate(zip(generator, lengths)):
            noise[item, :item_samples] = self.draw(1, item_samples, item_generator, device)[0]
        return noise

    def draw(self, batch: int, n_samples: int, generator: torch.Generator | None,
              device: torch.device) -> torch.Tensor:
        # Draw where the generator lives (per-request generators are CPU ones), then move.
        draw_device = device if generator is None else generator.device
        # Upstream's random initial phase: without effect on the output, drawn only to keep the RNG stream.
        torch.rand(batch, self.harmonics, generator=generator, device=draw_device)
        # Upstream's randn_like inherits its sines' layout, a transposed [B, harmonics, samples] tensor, and
        # torch fills non-contiguous tensors with another sampling routine than contiguous ones: fill a
        # tensor of that very layout so the same seed gives the same value on the same sample.
        noise = torch.empty(batch, self.harmonics, n_samples, device=draw_device).transpose(1, 2)
        return noise.normal_(generator=generator).to(device)
