"""Conditional flow matching sampler: `CausalConditionalCFM` (inference only).

Integrates dx/dt = v(x, t | mu, speaker, prompt mel) from fixed noise at t=0 to the mel at t=1 with a fixed
number of Euler steps on a cosine time grid, using classifier-free guidance: every step evaluates the
estimator on the conditioned input and on an unconditioned copy (mu, speaker and prompt mel zeroed) in one
batch of 2B, and extrapolates (1 + rate) * v_cond - rate * v_uncond.

The noise is upstream's: `torch.randn([1, 80, 15000])` right after seeding 0, sliced to the first T frames,
so the same request always gives the same mel and a frame's noise depends only on its position.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .flow_masks import per_request_flags
from .flow_stream import FrameWindow

# 300 s of 50 Hz mel frames, 80 bins: the shape fixes which random values upstream draws.
NOISE_SHAPE = (1, 80, 50 * 300)
NOISE_SEED = 0


def reference_noise() -> torch.Tensor:
    """The values upstream's `set_all_random_seed(0); torch.randn([1, 80, 15000])` produces on CPU."""
    generator = torch.Generator(device="cpu").manual_seed(NOISE_SEED)
    # Explicitly on CPU (where upstream draws it), also when modules are built under a meta/cuda default device.
    return torch.randn(NOISE_SHAPE, generator=generator, device="cpu")


def _param(params, name: str, default=None):
    """cfm_params arrives as a dict (our yaml reader) or an attribute object (omegaconf)."""
    if isinstance(params, Mapping):
        return params.get(name, default)
    return getattr(params, name, default)


def cosine_time_grid(n_timesteps: int, device, dtype) -> torch.Tensor:
    """n_timesteps+1 times from 0 to 1 on t = 1 - cos(s * pi/2): small steps near the noise (t=0), large
    ones near the data."""
    grid = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    return 1 - torch.cos(grid * 0.5 * torch.pi)


class CausalConditionalCFM(nn.Module):
    def __init__(self, in_channels, cfm_params, n_spks=1, spk_emb_dim=64, estimator: nn.Module | None = None):
        super().__init__()
        self.n_feats = in_channels
        self.n_spks = n_spks
        self.spk_emb_dim = spk_emb_dim
        self.solver = _param(cfm_params, "solver", "euler")
        if self.solver != "euler":
            raise ValueError(f"CausalConditionalCFM: solver {self.solver!r} is not implemented (only 'euler')")
        self.t_scheduler = _param(cfm_params, "t_scheduler", "cosine")
        self.inference_cfg_rate = float(_param(cfm_params, "inference_cfg_rate", 0.7))
        # sigma_min, training_cfg_rate and reg_loss_type only enter the training loss.
        self.sigma_min = float(_param(cfm_params, "sigma_min", 1e-4))
        self.estimator = estimator
        # Not part of the checkpoint (upstream draws it at construction), hence not persistent.
        self.register_buffer("rand_noise", reference_noise(), persistent=False)

    def time_grid(self, n_timesteps: int, device, dtype) -> torch.Tensor:
        if self.t_scheduler == "cosine":
            return cosine_time_grid(n_timesteps, device, dtype)
        return torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)

    def initial_noise(self, start: int, length: int, dtype: torch.dtype) -> torch.Tensor:
        """[1, 80, length]: the fixed noise of frames start..start+length-1."""
        if start + length > self.rand_noise.shape[2]:
            raise ValueError(f"the flow handles at most {self.rand_noise.shape[2]} mel frames "
                             f"({self.rand_noise.shape[2] // 50} s) per request, got {start + length}")
        return self.rand_noise[:, :, start:start + length].to(dtype)

    @torch.inference_mode()
    def forward(self, mu, mask, n_timesteps, temperature=1.0, spks=None, cond=None, streaming=False):
        """mu, cond [B, 80, T]; mask [B, 1, T]; spks [B, 80]; streaming: bool or one per sample.
        Returns (mel [B, 80, T] float32, None)."""
        z = self.initial_noise(0, mu.shape[2], mu.dtype).expand(mu.shape[0], -1, -1) * temperature
        t_span = self.time_grid(n_timesteps, mu.device, mu.dtype)
        return self.solve_euler(z, t_span, mu, mask, spks, cond, streaming), None

    @torch.inference_mode()
    def forward_incremental(self, mu, spks, cond, start: int, commit: int, memories: list[dict],
                            temperature=1.0):
        """Streaming only: mel of frames start..start+T-1 (mu, cond [B, 80, T]) of sequences whose frames
        before `start` went through earlier calls. memories: one dict per Euler step (empty at the first
        call), updated so that the next call can start at `commit`. Equals the same frames of a full
        `forward(..., streaming=True)` when start and commit are on static-chunk boundaries."""
        length = mu.shape[2]
        z = self.initial_noise(start, length, mu.dtype).expand(mu.shape[0], -1, -1) * temperature
        mask = torch.ones(mu.shape[0], 1, length, dtype=mu.dtype, device=mu.device)
        t_span = self.time_grid(len(memories), mu.device, mu.dtype)
        windows = [FrameWindow(start, commit, memory) for memory in memories]
        return self.solve_euler(z, t_span, mu, mask, spks, cond, True, windows)

    def guided_velocity(self, x, mask, mu, t, spks, cond, streaming, window: FrameWindow | None = None):
        """One classifier-free-guided estimator evaluation for a batch of B: runs 2B samples."""
        batch = x.shape[0]
        # A plain True stays a bool: the estimator then needs no host sync to know it (graph capture).
        flags = True if streaming is True else torch.cat([per_request_flags(streaming, batch, x.device)] * 2)
        velocity = self.estimator(
            torch.cat([x, x]),
            torch.cat([mask, mask]),
            torch.cat([mu, torch.zeros_like(mu)]),
            t.reshape(1).expand(2 * batch),
            torch.cat([spks, torch.zeros_like(spks)]),
            torch.cat([cond, torch.zeros_like(cond)]),
            streaming=flags,
            window=window,
        )
        conditioned, unconditioned = velocity[:batch], velocity[batch:]
        return (1.0 + self.inference_cfg_rate) * conditioned - self.inference_cfg_rate * unconditioned

    def solve_euler(self, x, t_span, mu, mask, spks, cond, streaming=False, windows: list | None = None):
        for step, (t, dt) in enumerate(euler_times(t_span)):
            window = windows[step] if windows is not None else None
            x = x + dt * self.guided_velocity(x, mask, mu, t, spks, cond, streaming, window)
        return x.float()


def euler_times(t_span: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(t, dt) of each Euler step over t_span. t advances by dt and the next dt is measured from that t, exactly
    as upstream accumulates it (in t_span's dtype), so every sampler takes the same steps."""
    t = t_span[0].reshape(1)
    dt = t_span[1] - t_span[0]
    steps = len(t_span) - 1
    times = []
    for step in range(1, steps + 1):
        times.append((t, dt))
        t = t + dt
        if step < steps:
            dt = t_span[step + 1] - t
    return times
