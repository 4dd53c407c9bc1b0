"""The flow's token encoder: `UpsampleConformerEncoder` (inference only, torch only).

25 Hz speech-token embeddings -> linear embed -> pre-lookahead convs (each token peeks 3 tokens ahead) ->
N conformer layers (relative-position self-attention + feed-forward) -> x2 nearest upsample + causal conv ->
linear embed -> 4 conformer layers -> final LayerNorm: 50 Hz features for the flow-matching decoder.

Parameter names equal upstream's (`embed.out.0`, `encoders.3.self_attn.linear_pos`, ...), so the release
`flow.pt` loads unchanged. Dropout is absent (inference only); options upstream offers but the CosyVoice2
release does not use (conv modules, other embeddings) are refused with a clear error rather than half-built.

All functions work on batches of left-aligned, right-padded sequences. Besides the plain forward there is
an incremental path: with static chunk masks, outputs of complete chunks never change, so a stream keeps
per-layer keys/values and a few frames of conv context (`EncoderStreamCache`) and only encodes new frames.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .flow_masks import attention_mask, lengths_to_valid
from .flow_stream import frames_before, join_history

# Upstream builds the pre-lookahead layer with a fixed 3-token lookahead and a fixed x2 upsample followed by
# exactly four conformer layers, whatever the yaml says; the checkpoint shapes depend on these numbers.
# (It also fixes those layers at 512 channels; we use output_size, which must be 512 for upstream to run.)
PRE_LOOKAHEAD_LEN = 3
UPSAMPLE_STRIDE = 2
NUM_UP_BLOCKS = 4

_ACTIVATIONS = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "hardtanh": nn.Hardtanh,
    "selu": nn.SELU,
}


def relative_sinusoids(highest: int, count: int, dim: int) -> torch.Tensor:
    """ESPnet relative positional encoding: [count, dim] rows for the query-minus-key distances
    highest, highest-1, ..., highest-count+1 (sin on even channels, cos on odd), computed in fp32."""
    distance = torch.arange(highest, highest - count, -1, dtype=torch.float32).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * -(math.log(10000.0) / dim))
    angle = distance * inv_freq
    table = torch.empty(count, dim, dtype=torch.float32)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table


class RelPositionSelfAttention(nn.Module):
    """Transformer-XL style self-attention with ESPnet relative positions (upstream
    `RelPositionMultiHeadedAttention`): score(i, j) = (q_i + u) . k_j + (q_i + v) . W_pos enc(i - j)."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"attention width {n_feat} is not divisible by {n_head} heads")
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.h, self.d_k).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        rel_table: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [B, Tq, D] are the frames at absolute positions P..P+Tq-1, where P is the length of `past`
        (keys/values [B, H, P, d_k] of the frames before). mask [B, Tq, P+Tq] bool. rel_table
        [Tq+P+Tq-1, D]: sinusoids of the distances P+Tq-1 down to -(Tq-1). Returns the output and the
        keys/values of all P+Tq frames."""
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        query_count, key_count = q.shape[2], k.shape[2]

        p = self.linear_pos(rel_table.to(x.dtype)).view(1, -1, self.h, self.d_k).transpose(1, 2)
        content = torch.matmul(q + self.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))
        by_distance = torch.matmul(q + self.pos_bias_v.unsqueeze(1), p.transpose(-2, -1))
        # Row r of the table holds distance (P+Tq-1) - r, so the pair (query i, key j) reads row Tq-1-i+j.
        rows = (query_count - 1 - torch.arange(query_count, device=x.device)).unsqueeze(1) + torch.arange(
            key_count, device=x.device
        ).unsqueeze(0)
        position = torch.gather(by_distance, 3, rows.expand(q.shape[0], self.h, query_count, key_count))
        scores = (content + position) / math.sqrt(self.d_k)

        hidden = mask.unsqueeze(1).logical_not()
        weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).masked_fill(hidden, 0.0)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(x.shape[0], query_count, self.h * self.d_k)
        return self.linear_out(out), (k, v)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Upstream `ConformerEncoderLayer` without the convolution module (use_cnn_module=False):
    [macaron half-FF] -> self-attention -> FF, each with a residual and a LayerNorm before (or after)."""

    def __init__(self, size: int, n_head: int, linear_units: int, activation: nn.Module, key_bias: bool,
                 macaron_style: bool, normalize_before: bool):
        super().__init__()
        self.self_attn = RelPositionSelfAttention(n_head, size, key_bias)
        self.feed_forward = PositionwiseFeedForward(size, linear_units, activation)
        self.feed_forward_macaron = PositionwiseFeedForward(size, linear_units, activation) if macaron_style else None
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)
        if macaron_style:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-12)
        # With two feed-forwards per layer, each contributes half.
        self.ff_scale = 0.5 if macaron_style else 1.0
        self.normalize_before = normalize_before

    def _residual(self, x: torch.Tensor, norm: nn.LayerNorm, sublayer: nn.Module, scale: float = 1.0):
        if self.normalize_before:
            return x + scale * sublayer(norm(x))
        return norm(x + scale * sublayer(x))

    def forward(self, x, mask, rel_table, past=None):
        """See `RelPositionSelfAttention.forward` for the arguments; returns (x, keys/values)."""
        if self.feed_forward_macaron is not None:
            x = self._residual(x, self.norm_ff_macaron, self.feed_forward_macaron, self.ff_scale)
        if self.normalize_before:
            attended, kv = self.self_attn(self.norm_mha(x), mask, rel_table, past)
            x = x + attended
        else:
            attended, kv = self.self_attn(x, mask, rel_table, past)
            x = self.norm_mha(x + attended)
        x = self._residual(x, self.norm_ff, self.feed_forward, self.ff_scale)
        return x, kv


class LinearEmbed(nn.Module):
    """Upstream `LinearNoSubsampling` + `EspnetRelPositionalEncoding`: Linear, LayerNorm, then scale by
    sqrt(d). The relative encoding adds nothing to x; its sinusoids enter the attention instead."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class PreLookaheadLayer(nn.Module):
    """Lets each token see `pre_lookahead_len` tokens ahead (conv over t..t+L), then a causal conv of
    width 3, with a residual. The caller provides the lookahead tokens (or zeros at the utterance end)."""

    def __init__(self, channels: int, pre_lookahead_len: int):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    @property
    def left_context(self) -> int:
        return self.conv2.kernel_size[0] - 1

    def forward(self, x: torch.Tensor, lookahead: torch.Tensor, conv1_history: torch.Tensor | None = None,
                start: int = 0):
        """x [B, T, C]: frames start..start+T-1 to transform; lookahead [B, L, C]: the L frames after
        them. conv1_history [B, C, 2]: conv1 outputs of the 2 frames before `start` (None at the sequence
        start: zeros). Returns (out [B, T, C], conv1 outputs with the history in front [B, C, 2+T])."""
        seq = torch.cat([x, lookahead], dim=1).transpose(1, 2)
        ahead = join_history(conv1_history, F.leaky_relu(self.conv1(seq)), self.left_context, 2, start)
        return self.conv2(ahead).transpose(1, 2) + x, ahead


class TokenUpsample(nn.Module):
    """x2 nearest-neighbour repeat followed by a causal conv of width 2*stride+1 (upstream `Upsample1D`
    of the encoder)."""

    def __init__(self, channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1)

    # The conv (width 2*stride+1 over the repeated frames) reaches back this many input frames.
    history_frames = 2

    def forward(self, x: torch.Tensor, history: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
        """x [B, T, C]: frames start..start+T-1 -> [B, stride*T, C]; history [B, 2, C]: the 2 input frames
        before `start` (None at the sequence start: zeros)."""
        joined = join_history(history, x, self.history_frames, 1, start)
        repeated = torch.repeat_interleave(joined.transpose(1, 2), self.stride, dim=2)
        return self.conv(repeated).transpose(1, 2)


@dataclass
class EncoderStreamCache:
    """What `UpsampleConformerEncoder.encode_incremental` keeps for one stream (batch 1) between calls.

    Everything refers to the first `done` tokens, a whole number of static chunks whose encoder outputs are
    final: keys/values of every layer, the last conv1 outputs (pre-lookahead) and the last conformer
    outputs before the upsampling."""

    done: int = 0
    lookahead_history: torch.Tensor | None = None  # [1, C, 2]
    upsample_history: torch.Tensor | None = None  # [1, 2, C]
    layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    up_layer_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class UpsampleConformerEncoder(nn.Module):
    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        # Dropout rates, dynamic-chunk training and checkpointing only matter for training.
        unsupported = {
            "input_layer": (input_layer, "linear"),
            "pos_enc_layer_type": (pos_enc_layer_type, "rel_pos_espnet"),
            "selfattention_layer_type": (selfattention_layer_type, "rel_selfattn"),
        }
        for name, (given, supported) in unsupported.items():
            if given != supported:
                raise ValueError(f"UpsampleConformerEncoder: {name}={given!r} is not implemented (only {supported!r}, "
                                 "as in the CosyVoice2 release)")
        if use_cnn_module:
            raise ValueError("UpsampleConformerEncoder: use_cnn_module=True is not implemented (the CosyVoice2 "
                             "release uses False)")
        if global_cmvn is not None:
            raise ValueError("UpsampleConformerEncoder: global_cmvn is not implemented")
        if activation_type not in _ACTIVATIONS:
            raise ValueError(f"UpsampleConformerEncoder: unknown activation_type {activation_type!r}")
        if input_size != output_size:
            # The upsampled features (output_size wide) re-enter an embed built for input_size.
            raise ValueError(f"UpsampleConformerEncoder needs input_size == output_size, got {input_size} "
                             f"and {output_size}")
        self._output_size = output_size
        self.static_chunk_size = static_chunk_size
        self.normalize_before = normalize_before

        def layers(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                ConformerLayer(output_size, attention_heads, linear_units, _ACTIVATIONS[activation_type](), key_bias,
                               macaron_style, normalize_before)
                for _ in range(count)
            )

        self.embed = LinearEmbed(input_size, output_size)
        self.pre_lookahead_layer = PreLookaheadLayer(output_size, PRE_LOOKAHEAD_LEN)
        self.encoders = layers(num_blocks)
        self.up_layer = TokenUpsample(output_size, output_size, UPSAMPLE_STRIDE)
        self.up_embed = LinearEmbed(input_size, output_size)
        self.up_encoders = layers(NUM_UP_BLOCKS)
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    @property
    def pre_lookahead_len(self) -> int:
        return self.pre_lookahead_layer.pre_lookahead_len

    # -- whole sequences -------------------------------------------------------------------------------------

    def encode(self, xs: torch.Tensor, token_lens: torch.Tensor, out_lens: torch.Tensor,
               streaming: torch.Tensor, max_out: int | None = None,
               rel_tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched encoder over whole sequences.

        xs [B, T, D]: embedded tokens, left-aligned; token_lens [B]: real tokens per request (the
        lookahead context included); out_lens [B]: tokens to encode -- token_lens, or token_lens minus
        the lookahead when the last tokens only serve as context (streaming, not finalized); streaming
        [B] bool: static-chunk attention for that request. Returns (features [B, 2*max(out_lens), D],
        their lengths [B]). max_out: the output width in tokens, at least max(out_lens) (given, the call has
        no host sync and can be captured in a CUDA graph; larger widths are padding, masked like a longer
        request's). rel_tables: `relative_tables(max_out)` made beforehand (a capture cannot copy them in)."""
        if max_out is None:
            max_out = int(out_lens.max())
        # Beyond a request's last real token the lookahead must read zeros, as upstream's right padding does;
        # embedding the padding would not give zeros (the embed has a bias and a LayerNorm).
        x = self.embed(xs)
        x = x * lengths_to_valid(token_lens, xs.shape[1]).unsqueeze(-1).to(x.dtype)
        lookahead = self.pre_lookahead_len
        if x.shape[1] < max_out + lookahead:
            x = F.pad(x, (0, 0, 0, max_out + lookahead - x.shape[1]))
        x, _ = self.pre_lookahead_layer(x[:, :max_out], x[:, max_out:max_out + lookahead])

        valid = lengths_to_valid(out_lens, max_out)
        x, _ = self._run_layers(self.encoders, x, attention_mask(valid, streaming, self.static_chunk_size),
                                rel_table=rel_tables[0] if rel_tables else None)

        x = self.up_embed(self.up_layer(x))
        up_lens = out_lens * self.up_layer.stride
        up_valid = lengths_to_valid(up_lens, x.shape[1])
        up_mask = attention_mask(up_valid, streaming, self.static_chunk_size * self.up_layer.stride)
        x, _ = self._run_layers(self.up_encoders, x, up_mask, rel_table=rel_tables[1] if rel_tables else None)
        if self.normalize_before:
            x = self.after_norm(x)
        return x, up_lens

    def relative_tables(self, max_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The relative position tables `encode(..., max_out)` uses for its two stacks, on `device`."""
        dim = self._output_size
        tokens, frames = max_out, max_out * self.up_layer.stride
        return (relative_sinusoids(tokens - 1, 2 * tokens - 1, dim).to(device),
                relative_sinusoids(frames - 1, 2 * frames - 1, dim).to(device))

    def _run_layers(self, layers: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor, past_kv=None,
                    rel_table: torch.Tensor | None = None):
        """Runs a conformer stack on frames at positions P..P+T-1 (P = cached length). Returns the output
        and the keys/values of every layer."""
        past_len = 0 if not past_kv else past_kv[0][0].shape[2]
        count = x.shape[1]
        if rel_table is None:
            rel_table = relative_sinusoids(past_len + count - 1, past_len + 2 * count - 1, x.shape[-1]).to(x.device)
        new_kv = []
        for index, layer in enumerate(layers):
            x, kv = layer(x, mask, rel_table, past_kv[index] if past_kv else None)
            new_kv.append(kv)
        return x, new_kv

    # -- incremental streaming (one request) ---------------------------------------------------------------

    def encode_incremental(self, xs: torch.Tensor, encoded_count: int, cache: EncoderStreamCache,
                           commit: int) -> torch.Tensor:
        """Streaming, batch of one, continuing from `cache` (frames of tokens before P = cache.done final).

        xs [1, L-P, D]: embedded tokens P..L-1 (L: tokens so far, lookahead context included);
        encoded_count n: tokens to encode (L, or L minus the lookahead when not finalized); commit: the new
        boundary, a multiple of the static chunk with P <= commit <= n, up to which outputs are final.
        Returns the features of frames 2P..2n-1 [1, 2(n-P), D] -- equal to those frames of
        `encode(..., streaming=True)` over the whole sequence -- and moves the cache to `commit`."""
        chunk = self.static_chunk_size
        start = cache.done
        if chunk <= 0 or commit % chunk or not start <= commit <= encoded_count:
            raise ValueError(f"incremental encoding needs static chunks and {start} <= commit={commit} <= "
                             f"{encoded_count} on a chunk boundary (chunk {chunk})")
        count = encoded_count - start
        lookahead = self.pre_lookahead_len
        x = self.embed(xs)
        if x.shape[1] < count + lookahead:  # finalized: zeros after the last token
            x = F.pad(x, (0, 0, 0, count + lookahead - x.shape[1]))
        x, ahead = self.pre_lookahead_layer(x[:, :count], x[:, count:count + lookahead], cache.lookahead_history,
                                            start)
        lookahead_history = frames_before(ahead, self.pre_lookahead_layer.left_context, 2, start, commit)

        x, layer_kv = self._run_layers(self.encoders, x, self._stream_mask(start, count, chunk, x.device),
                                       cache.layer_kv)
        upsample_input = join_history(cache.upsample_history, x, self.up_layer.history_frames, 1, start)
        upsample_history = frames_before(upsample_input, self.up_layer.history_frames, 1, start, commit)

        stride = self.up_layer.stride
        x = self.up_embed(self.up_layer(x, cache.upsample_history, start))
        up_mask = self._stream_mask(stride * start, stride * count, stride * chunk, x.device)
        x, up_layer_kv = self._run_layers(self.up_encoders, x, up_mask, cache.up_layer_kv)
        if self.normalize_before:
            x = self.after_norm(x)

        cache.done = commit
        cache.lookahead_history = lookahead_history
        cache.upsample_history = upsample_history
        cache.layer_kv = [(k[:, :, :commit].clone(), v[:, :, :commit].clone()) for k, v in layer_kv]
        cache.up_layer_kv = [(k[:, :, :stride * commit].clone(), v[:, :, :stride * commit].clone())
                             for k, v in up_layer_kv]
        return x

    @staticmethod
    def _stream_mask(start: int, count: int, chunk: int, device: torch.device) -> torch.Tensor:
        """[1, count, start+count]: queries start.. of one streaming request over all frames so far."""
        keys = torch.ones(1, start + count, dtype=torch.bool, device=device)
        return attention_mask(keys, torch.ones(1, dtype=torch.bool, device=device), chunk, query_start=start)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor, context: torch.Tensor | None = None,
                decoding_chunk_size: int = 0, num_decoding_left_chunks: int = -1, streaming: bool = False):
        """Upstream-compatible call: xs [B, T, D] embedded tokens, xs_lens [B]; `context` [B, L, D] are
        the lookahead tokens right after xs (streaming, not finalized; xs then holds T tokens each).
        Returns (features [B, 2T', D], valid mask [B, 1, 2T'])."""
        batch = xs.shape[0]
        flags = torch.full((batch,), bool(streaming), dtype=torch.bool, device=xs.device)
        if context is not None and context.shape[1] > 0:
            lens = torch.full((batch,), xs.shape[1], dtype=torch.long, device=xs.device)
            out, out_lens = self.encode(torch.cat([xs, context], dim=1), lens + context.shape[1], lens, flags)
        else:
            lens = xs_lens.to(torch.long).clamp(max=xs.shape[1])
            out, out_lens = self.encode(xs, lens, lens, flags)
        return out, lengths_to_valid(out_lens, out.shape[1]).unsqueeze(1)
