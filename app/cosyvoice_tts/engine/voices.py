"""What each mode feeds the LM and the flow, built from a speaker entry or a registered zero-shot voice."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidRequestError

MODES = ("sft", "zero_shot", "cross_lingual", "instruct2")
END_OF_PROMPT = "<|endofprompt|>"


@dataclass
class VoicePrompt:
    prompt_text: list[int]  # LM text prefix (zero-shot transcript or instruction)
    llm_prompt_speech: list[int]  # LM speech prefix (zero-shot only)
    flow_prompt_speech: torch.Tensor  # [1, P] int32
    prompt_feat: torch.Tensor  # [1, T, 80]
    embedding: torch.Tensor  # [1, 192] speaker embedding for the flow


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in torch.as_tensor(value).flatten().tolist()]


def voice_prompt(mode: str, voice: dict, tokenize, instruct_text: str | None) -> VoicePrompt:
    """`voice` is a spk2info entry (at least `embedding`) or registered features (upstream's key names)."""
    if mode not in MODES:
        raise InvalidRequestError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    embedding = torch.as_tensor(voice.get("flow_embedding", voice.get("embedding"))).reshape(1, -1).float()
    flow_tokens = torch.as_tensor(voice.get("flow_prompt_speech_token", torch.zeros(1, 0))).reshape(1, -1).to(torch.int32)
    feat = voice.get("prompt_speech_feat")
    feat = torch.zeros(1, 0, 80) if feat is None else torch.as_tensor(feat).reshape(1, -1, 80).float()
    has_prompt = flow_tokens.shape[1] > 0
    if mode == "sft":
        return VoicePrompt([], [], torch.zeros(1, 0, dtype=torch.int32), torch.zeros(1, 0, 80), embedding)
    if not has_prompt and mode in ("zero_shot", "cross_lingual"):
        raise InvalidRequestError(f"mode {mode!r} needs a registered zero-shot voice (with prompt audio)")
    if mode == "zero_shot":
        return VoicePrompt(_ids(voice.get("prompt_text")), _ids(voice.get("llm_prompt_speech_token")),
                           flow_tokens, feat, embedding)
    if mode == "cross_lingual":
        return VoicePrompt([], [], flow_tokens, feat, embedding)
    if not instruct_text or not instruct_text.strip():
        raise InvalidRequestError("mode 'instruct2' needs a non-empty instruct_text")
    return VoicePrompt(tokenize(instruct_text + END_OF_PROMPT), [], flow_tokens, feat, embedding)
