"""Sizing the KV cache against the GPU memory the worker may use (the check itself needs no GPU)."""
import pytest
import torch

from cosyvoice_tts.engine import Engine
from cosyvoice_tts.engine.kv_cache import KVCache, MemoryBudgetError, ensure_kv_fits, kv_cache_bytes

GIB = 2 ** 30


def test_kv_cache_bytes_is_what_the_cache_allocates():
    cache = KVCache(num_layers=3, num_slots=5, max_len=64, kv_heads=2, head_dim=8, dtype=torch.bfloat16,
                    device=torch.device("cpu"))
    assert kv_cache_bytes(3, 5, 64, 2, 8, torch.bfloat16) == cache.bytes
    # The release LM (24 layers, 2 KV heads of 64) in bf16: 64 sessions x 4096 tokens ~ 3.2 GiB.
    assert kv_cache_bytes(24, 64, 4096, 2, 64, torch.bfloat16) == 2 * 24 * 65 * 4096 * 2 * 64 * 2


def test_a_cache_that_fits_passes_and_one_that_does_not_says_what_to_change():
    ensure_kv_fits(needed=3 * GIB, in_use=2 * GIB, budget=5 * GIB, sessions=64, context=4096, fraction=0.5)
    with pytest.raises(MemoryBudgetError) as info:
        ensure_kv_fits(needed=3 * GIB, in_use=2 * GIB + 1, budget=5 * GIB, sessions=64, context=4096, fraction=0.5)
    message = str(info.value)
    assert "64 sessions x 4096 tokens" in message and "3.00 GiB" in message
    assert "--max-sessions" in message and "--gpu-memory-fraction" in message


def test_fraction_out_of_range_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="gpu_memory_fraction"):
        Engine.load(tmp_path / "no-model-needed", gpu_memory_fraction=1.5)
