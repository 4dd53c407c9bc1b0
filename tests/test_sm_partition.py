"""The LM/vocoder SM partition (engine/sm_partition.py) where it cannot be made: the engine goes on with both
on the whole device. The partition itself needs a GPU with green contexts (bench/sm_partition_probe.py)."""
from __future__ import annotations

import sys

import torch

from cosyvoice_tts.engine import Engine, sm_partition
from cosyvoice_tts.engine.request import SynthesisParams


def test_without_the_cuda_bindings_there_is_no_partition(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)  # import fails as if the package were absent
    assert sm_partition.split_streams(torch.device("cuda", 0), 32) is None
    assert "cuda-bindings" in caplog.text


def test_an_engine_on_the_cpu_ignores_lm_sms(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, max_sessions=2, lm_sms=32)
    engine.start()
    try:
        assert engine.partition is None
        request = engine.submit(SynthesisParams(voice=engine.voices()[0], seed=0), text="Hello there.")
        assert request.audio().size > 0
    finally:
        engine.shutdown()
