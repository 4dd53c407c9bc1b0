"""Which of our classes implements each upstream class path that a release yaml names."""
from __future__ import annotations

from typing import Any, Callable

from .sampling import RasConfig


def _dict_config(content: dict | None = None, **kwargs: Any) -> dict:
    # `!new:omegaconf.DictConfig {content: {...}}` in the yaml: a plain dict is all the modules need.
    return dict(content or {}, **kwargs)


def model_registry() -> dict[str, Callable[..., Any]]:
    from .modules import flow, hift, llm

    return {
        "cosyvoice.llm.llm.Qwen2LM": llm.Qwen2LM,
        "cosyvoice.llm.llm.Qwen2Encoder": llm.Qwen2Encoder,
        "cosyvoice.utils.common.ras_sampling": RasConfig,
        "cosyvoice.flow.flow.CausalMaskedDiffWithXvec": flow.CausalMaskedDiffWithXvec,
        "cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder": flow.UpsampleConformerEncoder,
        "cosyvoice.flow.flow_matching.CausalConditionalCFM": flow.CausalConditionalCFM,
        "cosyvoice.flow.decoder.CausalConditionalDecoder": flow.CausalConditionalDecoder,
        "cosyvoice.hifigan.generator.HiFTGenerator": hift.HiFTGenerator,
        "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": hift.ConvRNNF0Predictor,
        "omegaconf.DictConfig": _dict_config,
    }
