"""CosyVoice2's speech-token language model (`Qwen2LM`) as plain modules.

Only the parameters and the per-token pieces live here (embeddings, the Qwen2 body, the speech-token head); the
decoding programme (what to feed when, sampling, bistream interleaving) is in `engine.lm_program`, and the
batching and KV cache in the engine, so the same weights serve one request or many.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .qwen2 import AttentionInputs, Qwen2Config, Qwen2ForCausalLM


class Qwen2Encoder(nn.Module):
    """Upstream wraps transformers' Qwen2ForCausalLM as `.model`; we keep that nesting for the checkpoint keys."""

    def __init__(self, pretrain_path: str | Path, **_ignored):
        super().__init__()
        self.config = Qwen2Config.from_pretrained_dir(pretrain_path)
        self.model = Qwen2ForCausalLM(self.config)

    def forward(self, inputs_embeds: torch.Tensor, k_caches, v_caches, attn: AttentionInputs) -> torch.Tensor:
        return self.model.model(inputs_embeds, k_caches, v_caches, attn)


class Qwen2LM(nn.Module):
    SOS_EOS = 0
    TASK_ID = 1

    def __init__(
        self,
        llm_input_size: int,
        llm_output_size: int,
        speech_token_size: int,
        llm: Qwen2Encoder,
        sampling=None,
        mix_ratio: list[int] | tuple[int, int] = (5, 15),
        length_normalized_loss: bool = True,
        lsm_weight: float = 0.0,
        **_ignored,
    ):
        super().__init__()
        self.llm_input_size = llm_input_size
        self.llm_output_size = llm_output_size
        self.speech_token_size = speech_token_size
        self.llm_embedding = nn.Embedding(2, llm_input_size)
        self.llm = llm
        # speech tokens + eos (=speech_token_size) + an unused id + the bistream fill token (=speech_token_size+2)
        self.llm_decoder = nn.Linear(llm_output_size, speech_token_size + 3)
        self.speech_embedding = nn.Embedding(speech_token_size + 3, llm_input_size)
        self.sampling = sampling
        self.mix_ratio = tuple(mix_ratio)

    @property
    def eos_token(self) -> int:
        return self.speech_token_size

    @property
    def fill_token(self) -> int:
        return self.speech_token_size + 2

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.model.model.embed_tokens(token_ids)

    def embed_speech(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.speech_embedding(token_ids)

    def sos_embedding(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.SOS_EOS].view(1, -1)

    def task_embedding(self) -> torch.Tensor:
        return self.llm_embedding.weight[self.TASK_ID].view(1, -1)

    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden state(s) -> log-probabilities over the speech-token vocabulary, in fp32."""
        return self.llm_decoder(hidden).float().log_softmax(dim=-1)
