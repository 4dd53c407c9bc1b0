"""`CosyVoice2LMForCausalLM`: vLLM's Qwen2ForCausalLM whose lm_head carries CosyVoice2's `llm_decoder` bias.

Importing this module registers the architecture with vLLM's ModelRegistry (idempotent). vLLM's engine core may
run in another process: with the default `fork` start method it inherits the registration; with `spawn` (forced
by vLLM once CUDA is initialised in the parent) the child imports this module because the RAS logits processor
class it unpickles lives in `cosyvoice_tts.vllm_backend.logits`, which imports this one; the `vllm.general_plugins`
entry point `cosyvoice_tts.vllm_backend.model:register` covers every other case.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from vllm import ModelRegistry
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from .export import ARCHITECTURE


class CosyVoice2LMForCausalLM(Qwen2ForCausalLM):
    """Qwen2 body; embed_tokens = speech_embedding; lm_head = llm_decoder (weight + bias), untied."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        config = self.config
        if config.tie_word_embeddings:
            raise ValueError(f"{ARCHITECTURE}: tie_word_embeddings must be false (the head is llm_decoder)")
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size,
                config.hidden_size,
                bias=bool(getattr(config, "lm_head_bias", True)),
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states, getattr(self.lm_head, "bias", None))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(weights)
        if getattr(self.lm_head, "bias", None) is not None and "lm_head.bias" not in loaded:
            raise ValueError(f"{ARCHITECTURE}: the export has no lm_head.bias (llm_decoder's bias)")
        return loaded


def register() -> None:
    """Register the architecture (the `vllm.general_plugins` entry point calls this in every vLLM process)."""
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, CosyVoice2LMForCausalLM)


register()
