"""Elementwise steps of the model stages, as plain functions that the engine can compile into fused kernels.

The batch-1 decode step and the flow estimator are bound by kernel count: an RMSNorm written as the reference
writes it is eight kernels, a rotary embedding five. The modules call these functions through this module
(`pointwise.rms_norm(...)`), so `use_compiled()` can swap in `torch.compile`d versions -- one generated kernel
each, captured inside the engine's CUDA graphs like any other kernel -- without touching the modules. The eager
versions are the reference's arithmetic, op for op; compiled ones compute the same expression and may differ
only in the rounding of fused intermediates.
"""
from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2's RMSNorm: normalise in fp32, return to the input dtype, then the gain."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual add and the RMSNorm of its result: (x + delta, rms_norm(x + delta))."""
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D]: x * cos + rotate_half(x) * sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def norm_mish(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, mask: torch.Tensor,
              shift: torch.Tensor | None = None) -> torch.Tensor:
    """The estimator's conv-block tail on [B, C, T]: LayerNorm over channels, Mish, frame mask, then `shift`
    added (the ResNet block's time embedding or residual branch, which follow the block)."""
    h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), weight, bias, eps).transpose(1, 2)
    h = F.mish(h) * mask
    return h if shift is None else h + shift


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, layer_norm(x + delta) in `dtype`): a transformer block's residual add and the next pre-norm,
    whose output goes straight to a linear (in `dtype`, the type autocast would cast it to there)."""
    if delta is not None:
        x = x + delta
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(dtype)


def causal_columns(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, T] times mask [B, 1, T] -> [B, T, 3C] in `dtype`: for each frame the 3 input frames ending at it,
    zeros before the start -- what a causal convolution of kernel 3 multiplies, so that it runs as one matmul.
    Column j * C + c holds channel c of frame t - 2 + j."""
    batch, channels, _ = x.shape
    x = F.pad(x * mask, (2, 0))
    return x.unfold(2, 3, 1).permute(0, 2, 3, 1).reshape(batch, -1, 3 * channels).to(dtype)


def window_columns(joined: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, 2 + T]: two frames of history, then T frames -> [B, T, 3C] in `dtype`, laid out as
    `causal_columns` (the incremental paths' kernel-3 causal convolution as one matmul)."""
    batch, channels, _ = joined.shape
    return joined.unfold(2, 3, 1).permute(0, 2, 3, 1).reshape(batch, -1, 3 * channels).to(dtype)


def masked_frames(x: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, C, T] times mask [B, 1, T] -> [B, T, C] in `dtype`: the input of a kernel-1 convolution as a matmul."""
    return (x * mask).transpose(1, 2).to(dtype)


def snake(x: torch.Tensor, mask: torch.Tensor | None, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """HiFT's Snake activation of x * mask ([B, C, T], mask [B, 1, T] or None), alpha [C]:
    x + sin^2(alpha x) / (alpha + eps). Eager it is six kernels over a float32 tensor of every sample: most of
    HiFT's time went to such elementwise passes (docs/results/engine_h100_2026-11-27/hift_profile_16x506.txt)."""
    if mask is not None:
        x = x * mask
    alpha = alpha[None, :, None]
    return x + (1.0 / (alpha + eps)) * torch.sin(x * alpha).pow(2)


def add_snake(x: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, alpha: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A residual block's add of its masked branch and the next Snake: (x + delta * mask, snake(that))."""
    x = x + (delta if mask is None else delta * mask)
    return x, snake(x, None, alpha, eps)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool attention mask (True: may attend) as 0 / -inf in `dtype`, the form attention adds to its scores as
    it is: converted once per forward instead of in every layer (two kernels each). Not swapped for a compiled
    version: it runs once per call."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on x computes in: autocast's where it is on, else x's own."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


FUNCTIONS = ("rms_norm", "add_rms_norm", "rotary", "silu_mul", "norm_mish", "add_layer_norm", "causal_columns",
             "window_columns", "masked_frames", "snake", "add_snake")
_EAGER = {name: globals()[name] for name in FUNCTIONS}


def use_eager() -> None:
    module = sys.modules[__name__]
    for name, fn in _EAGER.items():
        setattr(module, name, fn)


def compiled_enabled() -> bool:
    """Whether any function runs compiled (one that failed has gone back to eager)."""
    return any(getattr(sys.modules[__name__], name) is not fn for name, fn in _EAGER.items())


def use_compiled(device: torch.device) -> bool:
    """Swap in compiled versions (shapes dynamic: one compilation serves every batch and length), after checking
    each on `device` against its eager version. Returns False, staying eager, where compilation is not available
    or a check fails (a missing compiler, say): slower, never wrong."""
    module = sys.modules[__name__]
    # Each function meets a few input variants (layouts, dtypes, autocast on or off, batch 1), each compiled
    # once at start-up, during the graphs' warm-up runs; the default limit of 8 is too tight for that.
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    try:
        compiled = {name: torch.compile(fn, dynamic=True, fullgraph=True) for name, fn in _EAGER.items()}
        for name, args in _samples(device).items():
            # Half inputs as the LM runs them, fp32 inputs under autocast as the flow runs them, fp32 as HiFT does.
            for dtype, autocast in ((torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True),
                                    (torch.float32, False)):
                cast = [a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() and not autocast else a
                        for a in args]
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    want, got = _EAGER[name](*cast), compiled[name](*cast)
                for w, g in zip(_as_tuple(want), _as_tuple(got)):
                    torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)
    except Exception:  # noqa: BLE001 - any failure here only costs speed
        log.warning("compiled elementwise kernels unavailable; running them eagerly", exc_info=True)
        use_eager()
        return False
    for name, fn in compiled.items():
        setattr(module, name, _falling_back(name, fn))
    log.info("compiled elementwise kernels: %s", ", ".join(FUNCTIONS))
    return True


def _falling_back(name: str, compiled):
    """The compiled function, which hands over to the eager one for good if it ever fails (a variant that will
    not compile, say): an engine runs on, slower, instead of failing a request or its start-up."""
    def run(*args):
        try:
            return compiled(*args)
        except Exception:  # noqa: BLE001 - compilation problems of every kind: the eager version is exact
            log.warning("compiled %s failed; running it eagerly from now on", name, exc_info=True)
            setattr(sys.modules[__name__], name, _EAGER[name])
            return _EAGER[name](*args)
    return run


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _samples(device: torch.device) -> dict[str, tuple]:
    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    x, d, w = randn(2, 3, 64), randn(2, 3, 64), randn(64)
    return {
        "rms_norm": (x, w, 1e-6),
        "add_rms_norm": (x, d, w, 1e-6),
        "rotary": (randn(2, 4, 3, 16), randn(2, 3, 16), randn(2, 3, 16)),
        "silu_mul": (x, d),
        "norm_mish": (randn(2, 32, 5), randn(32), randn(32), 1e-5, randn(2, 1, 5), randn(2, 32, 1)),
        "add_layer_norm": (x, d, w, randn(64), 1e-5, torch.float32),
        "causal_columns": (randn(2, 8, 5), randn(2, 1, 5), torch.float32),
        "window_columns": (randn(2, 8, 7), torch.float32),
        "masked_frames": (randn(2, 8, 5), randn(2, 1, 5), torch.float32),
        "snake": (randn(2, 8, 5), randn(2, 1, 5), randn(8), 1e-9),
        "add_snake": (randn(2, 8, 5), randn(2, 8, 5), randn(2, 1, 5), randn(8), 1e-9),
    }
