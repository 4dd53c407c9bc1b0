"""Host data onto the GPU, and device data back to the host, without waiting for it.

A plain host-to-device copy in torch (`tensor.to("cuda")`, `torch.tensor(..., device="cuda")`, `copy_` from a
CPU tensor) synchronises the current stream after the copy. On the vocoder's stream that means waiting for every
kernel queued before it: a batch launched from the LM loop (vocoder_worker.py, "overlap") would hold the loop
until the flow sampler queued ahead of it had run. Staged in pinned memory, the copy is queued like a kernel.
"""
from __future__ import annotations

import torch


def to_device(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`data` (a tensor, numpy array or list) on `device`, in stream order, not waited for."""
    device = torch.device(device)
    tensor = data if isinstance(data, torch.Tensor) else torch.as_tensor(data, dtype=dtype)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    # The pinned block goes back to torch's host cache, which reuses it only once the copy is done.
    return tensor.pin_memory().to(device, non_blocking=True)


def copy_into(target: torch.Tensor, host: torch.Tensor) -> None:
    """`target.copy_(host)` in stream order, not waited for: staged in pinned memory where `target` is on a GPU."""
    if target.device.type == "cuda" and host.device.type == "cpu":
        host = host.pin_memory()
    target.copy_(host, non_blocking=True)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the host: from a GPU, a copy into pinned memory queued on the current stream and not waited
    for (valid once the stream gets past it; wait on an event recorded after this call); else `tensor` itself."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
