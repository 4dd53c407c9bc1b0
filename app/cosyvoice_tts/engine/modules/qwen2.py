"""Qwen2 decoder body with an external, slot-addressed KV cache.

Parameter names follow transformers' `Qwen2ForCausalLM` so the release `llm.pt` loads unchanged. The cache lives
outside the module (see `kv_cache.KVCache`): every forward writes the new keys/values of each sequence into its
slot and attends over that slot. The same code serves prefill (one sequence, many tokens) and batched decode
(many sequences, one token each, fixed shapes so the step can be captured in a CUDA graph).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import pointwise
from .fused_linear import FusedLinears


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> "Qwen2Config":
        config_path = Path(path) / "config.json"
        try:
            raw = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{config_path}: the Qwen2 config of CosyVoice-BlankEN is missing") from exc
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in raw]
        if missing:
            raise ValueError(f"{config_path}: missing keys {missing}")
        return cls(**{f.name: raw[f.name] for f in fields if f.name in raw})


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim] in `dtype` (computed in fp32)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


@dataclass
class AttentionInputs:
    """Where a forward reads and writes the cache.

    slots [B]: cache slot of each sequence; positions [B, T]: absolute position of each input token;
    key_len: how many cache positions to attend over (the longest context in the batch, or the cache's
    full length for fixed-shape decode); mask [B, 1, T, key_len]: True (or 0.0) where a key is visible.
    """

    slots: torch.Tensor
    positions: torch.Tensor
    key_len: int
    mask: torch.Tensor

    @classmethod
    def build(cls, slots: torch.Tensor, positions: torch.Tensor, key_len: int,
              dtype: torch.dtype | None = None) -> "AttentionInputs":
        """dtype given: the mask as 0 / -inf in that dtype, which attention adds as it is. A boolean mask would be
        converted to that in every layer (two kernels each); built here, it is converted once per forward."""
        keys = torch.arange(key_len, device=positions.device)
        mask = keys.view(1, 1, 1, key_len) <= positions.view(positions.shape[0], 1, positions.shape[1], 1)
        if dtype is not None:
            mask = pointwise.additive_mask(mask, dtype)
        return cls(slots, positions, key_len, mask)


class Qwen2Attention(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.qkv: FusedLinears | None = None

    def fuse_projections(self) -> None:
        self.qkv = FusedLinears([self.q_proj, self.k_proj, self.v_proj])

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        attn: AttentionInputs,
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim)
        q = pointwise.rotary(q, cos, sin)
        k = pointwise.rotary(k, cos, sin).transpose(1, 2)
        # Cache layout [slots, max_len, kv_heads, head_dim]; write then read so a token sees itself.
        rows = attn.slots.view(batch, 1).expand(batch, length)
        k_cache.index_put_((rows, attn.positions), k.to(k_cache.dtype))
        v_cache.index_put_((rows, attn.positions), v.to(v_cache.dtype))
        keys = k_cache[attn.slots, : attn.key_len].transpose(1, 2)
        values = v_cache[attn.slots, : attn.key_len].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn.mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Qwen2MLP(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up: FusedLinears | None = None

    def fuse_projections(self) -> None:
        self.gate_up = FusedLinears([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x) if self.gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(pointwise.silu_mul(gate, up))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.self_attn = Qwen2Attention(config)
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, attn: AttentionInputs) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, attn)
        norm = self.post_attention_layernorm
        x, h = pointwise.add_rms_norm(x, attended, norm.weight, norm.eps)
        return x + self.mlp(h)


class Qwen2Model(nn.Module):
    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up of every layer as one GEMM each (fused_linear.py): fewer kernels per decode step."""
        for layer in self.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def forward(self, inputs_embeds: torch.Tensor, k_caches, v_caches, attn: AttentionInputs) -> torch.Tensor:
        """inputs_embeds [B, T, H] -> final-normed hidden states [B, T, H] (what upstream takes as hidden_states[-1])."""
        cos, sin = self.rotary_emb(attn.positions, inputs_embeds.dtype)
        x = inputs_embeds
        for layer, k_cache, v_cache in zip(self.layers, k_caches, v_caches):
            x = layer(x, cos, sin, k_cache, v_cache, attn)
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Holds `model.*` and `lm_head` so checkpoint keys match; the text LM head is never evaluated."""

    def __init__(self, config: Qwen2Config):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
