"""Disjoint SM partitions of one GPU for the LM loop and the vocoder (CUDA green contexts, CUDA 12.4+).

On one card the LM's decode step (hundreds of small kernels, every stream waiting on it) and the vocoder's batch
(large flow and HiFT kernels) share the SMs. Stream priority only orders blocks that have not started, so each LM
kernel still waits for the vocoder's running blocks to drain: under load a step takes several times its time
alone. Giving each its own SMs removes that wait at the cost of the vocoder's share of the card.

Uses NVIDIA's `cuda-bindings` (the driver API); without it, or on a driver or GPU without green contexts, the
engine runs both on the whole device as before.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


class PartitionError(RuntimeError):
    pass


@dataclass
class SmPartition:
    lm: torch.cuda.Stream
    vocoder: torch.cuda.Stream
    lm_sms: int
    vocoder_sms: int
    _keep: tuple = ()  # the driver's green-context handles: they must outlive the streams


def _check(result):
    from cuda.bindings import driver

    error, *values = result
    if error != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(error)[1]
        raise PartitionError(name.decode() if isinstance(name, bytes) else str(name))
    return values[0] if len(values) == 1 else tuple(values)


def split_streams(device: torch.device, lm_sms: int) -> SmPartition | None:
    """A stream on at least `lm_sms` SMs for the LM (rounded up to the GPU's partition granularity) and one on the
    rest for the vocoder, or None (logged) where the GPU, driver or bindings cannot partition."""
    try:
        from cuda.bindings import driver
    except ImportError:
        log.warning("SM partition needs the cuda-bindings package; the LM and vocoder share the whole GPU")
        return None
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if not 0 < lm_sms < total:
        raise ValueError(f"lm_sms must be between 1 and {total - 1} on this GPU")
    torch.cuda.init()
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        cu_device = _check(driver.cuDeviceGet(index))
        whole = _check(driver.cuDeviceGetDevResource(cu_device, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        groups, _, rest = _check(driver.cuDevSmResourceSplitByCount(1, whole, 0, lm_sms))
        streams, keep = [], []
        for resource, priority in ((groups[0], -1), (rest, 0)):
            desc = _check(driver.cuDevResourceGenerateDesc([resource], 1))
            context = _check(driver.cuGreenCtxCreate(desc, cu_device,
                                                     driver.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            raw = _check(driver.cuGreenCtxStreamCreate(context, driver.CUstream_flags.CU_STREAM_NON_BLOCKING,
                                                       priority))
            keep += [context, raw]
            streams.append(torch.cuda.get_stream_from_external(int(raw), device))
    except (PartitionError, AttributeError, TypeError) as exc:  # no green contexts on this driver or GPU
        log.warning("could not split the GPU's SMs (%s); the LM and vocoder share the whole GPU", exc)
        return None
    partition = SmPartition(streams[0], streams[1], int(groups[0].sm.smCount), int(rest.sm.smCount), tuple(keep))
    if partition.vocoder_sms < 1:
        log.warning("no SMs left for the vocoder after %d for the LM; the LM and vocoder share the whole GPU",
                    partition.lm_sms)
        return None
    log.info("SM partition: %d SMs for the LM, %d for the vocoder", partition.lm_sms, partition.vocoder_sms)
    return partition
