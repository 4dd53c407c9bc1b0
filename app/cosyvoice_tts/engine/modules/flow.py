"""CosyVoice2's flow stage: speech tokens (25 Hz) + speaker + prompt mel -> 80-bin mel (50 Hz).

`CausalMaskedDiffWithXvec` embeds the prompt and new speech tokens, encodes them with
`UpsampleConformerEncoder` (which doubles the frame rate), projects to 80 channels (mu) and lets
`CausalConditionalCFM` turn fixed noise into mel, conditioned on mu, the projected speaker x-vector and the
prompt mel (placed at the prompt's frames). The module is inference-only; parameter names are upstream's,
so the release `flow.pt` loads with strict=True.

Besides upstream's single-request `inference`, `inference_batch` runs chunks of several requests at once
(different lengths, streaming/finalize per request); each request's mel equals what `inference` gives it
alone, up to float rounding. `inference_incremental` is a streaming drop-in for `inference` that keeps a
per-request `FlowStream` and only computes the frames after the last complete static chunk, so a chunk's
cost no longer grows with what was already spoken (see flow_stream.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .flow_cfm import CausalConditionalCFM
from .flow_encoder import EncoderStreamCache, UpsampleConformerEncoder
from .flow_estimator import CausalConditionalDecoder
from .flow_masks import lengths_to_valid, per_request_flags

__all__ = [
    "CausalMaskedDiffWithXvec",
    "UpsampleConformerEncoder",
    "CausalConditionalCFM",
    "CausalConditionalDecoder",
    "FlowBatch",
    "FlowStream",
    "HostLengths",
]


def join_prompt_and_tokens(prompt: torch.Tensor, prompt_lens: torch.Tensor, tokens: torch.Tensor,
                           token_lens: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request: prompt[:Lp] followed by tokens[:Lt], left-aligned in one padded [B, max(Lp+Lt)] tensor
    (gathered, so no per-request Python loop). Returns (joined, Lp + Lt). width: max(Lp+Lt) when the caller
    knows it (no host sync)."""
    total = prompt_lens + token_lens
    width = max(int(total.max()) if width is None else width, 1)
    both = torch.cat([prompt.to(tokens.dtype), tokens], dim=1)
    positions = torch.arange(width, device=tokens.device).unsqueeze(0)
    # Position p reads the prompt while p < Lp, then token p - Lp (stored after the prompt's padded width).
    source = torch.where(positions < prompt_lens.unsqueeze(1), positions,
                         prompt.shape[1] + positions - prompt_lens.unsqueeze(1))
    joined = torch.gather(both, 1, source.clamp(0, both.shape[1] - 1))
    return joined * lengths_to_valid(total, width).to(joined.dtype), total


@dataclass(frozen=True)
class HostLengths:
    """`prepare_batch`'s token, prompt-token and prompt-mel lengths as host integers, one per request."""

    token: Sequence[int]
    prompt_token: Sequence[int]
    prompt_feat: Sequence[int]

    def encoded(self, finalize, lookahead: int, batch: int) -> "_EncodedLengths":
        flags = list(finalize) if isinstance(finalize, (list, tuple)) else [bool(finalize)] * batch
        totals = [t + p for t, p in zip(self.token, self.prompt_token)]
        return _EncodedLengths(max(totals), [n - (0 if f else lookahead) for n, f in zip(totals, flags)])


@dataclass(frozen=True)
class _EncodedLengths:
    width: int  # the longest prompt + tokens
    encoded: list[int]  # tokens each request encodes (its lookahead left out while not finalized)


@dataclass
class FlowStream:
    """Incremental streaming state of one request (`CausalMaskedDiffWithXvec.inference_incremental`).

    Memory: per final mel frame, the estimator keeps keys and values of every attention layer for each Euler
    step and both guidance branches: steps x 2 x layers x 2 x heads*head_dim numbers -- at the release size
    10 x 2 x 56 x 2 x 512 = 1.15 M per frame: 4.6 MB in fp32, 2.3 MB in bf16 (115 MB per second of audio).
    The encoder's share is small (10 layers x 2 x 512 per token or frame)."""

    tokens: torch.Tensor  # [L] prompt + speech tokens of the last call; the next call must extend them
    speaker: torch.Tensor  # [1, 80] projected x-vector (from the first call)
    prompt_feat: torch.Tensor  # [1, F, 80] (from the first call)
    encoder: EncoderStreamCache
    estimator_memory: list[dict]  # one per Euler step, see flow_stream.FrameWindow
    final_mel: torch.Tensor  # [1, 80, 2 * encoder.done]: frames that no later call changes
    finished: bool = False


@dataclass
class FlowBatch:
    """The sampler's inputs for B requests, each over its whole prefix (`prepare_batch`)."""

    mu: torch.Tensor  # [B, 80, F] encoder output projected to mel channels
    mask: torch.Tensor  # [B, 1, F] 1 on each request's frames
    cond: torch.Tensor  # [B, 80, F] prompt mel at the prompt's frames, zeros elsewhere
    speaker: torch.Tensor  # [B, 80] projected x-vectors
    mel_len: torch.Tensor  # [B] frames per request (prompt included)
    prompt_feat_len: torch.Tensor  # [B] prompt frames per request
    streaming: torch.Tensor  # [B] bool


class CausalMaskedDiffWithXvec(nn.Module):
    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: int = 50,
        only_mask_loss: bool = True,
        token_mel_ratio: int = 2,
        pre_lookahead_len: int = 3,
        encoder: UpsampleConformerEncoder | None = None,
        decoder: CausalConditionalCFM | None = None,
        decoder_conf: dict | None = None,
        mel_feat_conf: dict | None = None,
    ):
        super().__init__()
        if encoder is None or decoder is None:
            raise ValueError("CausalMaskedDiffWithXvec needs an encoder and a decoder")
        # The encoder's lookahead and upsampling are fixed in its structure; the flow's own settings
        # must agree with them or the token/mel bookkeeping below would be wrong.
        if pre_lookahead_len != encoder.pre_lookahead_len:
            raise ValueError(f"pre_lookahead_len={pre_lookahead_len}, but the encoder looks ahead "
                             f"{encoder.pre_lookahead_len} tokens")
        if token_mel_ratio != encoder.up_layer.stride:
            raise ValueError(f"token_mel_ratio={token_mel_ratio}, but the encoder upsamples x{encoder.up_layer.stride}")
        self.input_size = input_size
        self.output_size = output_size
        self.output_type = output_type
        self.vocab_size = vocab_size
        self.input_frame_rate = input_frame_rate
        self.token_mel_ratio = token_mel_ratio
        self.pre_lookahead_len = pre_lookahead_len
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder

    def store_weights_in(self, dtype: torch.dtype) -> None:
        """Half-precision weights, as upstream's fp16 mode holds them (`flow.half()`, run under autocast).

        Under autocast, a linear or convolution with fp32 weights casts them on every call -- a kernel per weight
        and bias, replayed by every CUDA graph -- to the very values stored here once. Normalisation layers run
        in fp32 under autocast, so theirs stay fp32, holding the half-rounded values upstream's autocast would
        cast back. Outputs under autocast are the same as upstream's fp16 mode; buffers (the fixed noise) keep
        fp32 and are cast where used, as before."""
        norms = (nn.LayerNorm, nn.GroupNorm)
        with torch.no_grad():
            for module in self.modules():
                for name, param in module.named_parameters(recurse=False):
                    rounded = param.to(dtype)
                    param.data = rounded.float() if isinstance(module, norms) else rounded

    def speaker_condition(self, embedding: torch.Tensor) -> torch.Tensor:
        """[B, 192] x-vectors -> [B, 80]: unit-normalised, then projected."""
        return self.spk_embed_affine_layer(F.normalize(embedding, dim=1))

    @torch.inference_mode()
    def inference(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len, embedding,
                  streaming, finalize):
        """Upstream's single-request call: token [1, T], prompt_token [1, P], prompt_feat [1, 2P, 80],
        embedding [1, 192]. finalize=False treats the last 3 tokens as lookahead context only.
        Returns (mel [1, 80, T'] float32 for the non-prompt tokens, None)."""
        if token.shape[0] != 1:
            raise ValueError("inference takes one request; use inference_batch for several")
        # Upstream takes the prompt mel length from the tensor's shape, not from prompt_feat_len.
        feat_len = torch.tensor([prompt_feat.shape[1]], device=token.device)
        (mel,) = self.inference_batch(token, token_len, prompt_token, prompt_token_len, prompt_feat, feat_len,
                                      embedding, streaming, finalize)
        return mel.unsqueeze(0), None

    @torch.inference_mode()
    def inference_batch(
        self,
        token: torch.Tensor,
        token_len: torch.Tensor,
        prompt_token: torch.Tensor,
        prompt_token_len: torch.Tensor,
        prompt_feat: torch.Tensor,
        prompt_feat_len: torch.Tensor,
        embedding: torch.Tensor,
        streaming: bool | Sequence[bool] | torch.Tensor,
        finalize: bool | Sequence[bool] | torch.Tensor,
        n_timesteps: int = 10,
    ) -> list[torch.Tensor]:
        """Flow over B requests at once, each the whole prefix as upstream runs it.

        token [B, T] / token_len [B]: speech tokens so far (right-padded); prompt_token [B, P] /
        prompt_token_len [B]; prompt_feat [B, F, 80] / prompt_feat_len [B] (normally 2 x prompt_token_len);
        embedding [B, 192]; streaming, finalize: one flag for all or one per request.
        Returns one float32 mel [80, T_b] per request: its frames after the prompt, where
        T_b = 2 * (token_len_b - (0 if finalize_b else 3)) when the prompt mel is 2 x its tokens.
        """
        prepared = self.prepare_batch(token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                                      embedding, streaming, finalize)
        mel, _ = self.decoder(mu=prepared.mu, mask=prepared.mask, spks=prepared.speaker, cond=prepared.cond,
                              n_timesteps=n_timesteps, streaming=prepared.streaming)
        starts, ends = prepared.prompt_feat_len.tolist(), prepared.mel_len.tolist()
        mel = mel.float()
        return [mel[b, :, starts[b]:ends[b]] for b in range(token.shape[0])]

    @torch.inference_mode()
    def prepare_batch(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                      embedding, streaming, finalize, host_lengths: HostLengths | None = None) -> FlowBatch:
        """Everything before the sampler for B requests (arguments as `inference_batch`): embedding, the encoder
        over each whole prefix, the projection to mu, the prompt condition and the speaker.

        host_lengths: the three length tensors' values, known to the caller; then the call validates and sizes
        on the host and makes no host sync (the engine launches a vocoder batch between LM steps, and a sync
        would wait for the GPU there)."""
        device = token.device
        batch = token.shape[0]
        streaming_flags = per_request_flags(streaming, batch, device)
        finalize_flags = per_request_flags(finalize, batch, device)
        token_len = token_len.to(device=device, dtype=torch.long).reshape(batch)
        prompt_token_len = prompt_token_len.to(device=device, dtype=torch.long).reshape(batch)
        prompt_feat_len = prompt_feat_len.to(device=device, dtype=torch.long).reshape(batch)
        known = host_lengths.encoded(finalize, self.pre_lookahead_len, batch) if host_lengths else None

        speaker = self.speaker_condition(embedding)
        joined, total_len = join_prompt_and_tokens(prompt_token, prompt_token_len, token, token_len,
                                                   width=known and known.width)
        valid = lengths_to_valid(total_len, joined.shape[1]).unsqueeze(-1)
        embedded = self.input_embedding(joined.clamp(min=0).long()) * valid.to(speaker.dtype)

        # Not finalized: the last tokens are lookahead context, their frames come with the next call.
        encoded_len = total_len - torch.where(finalize_flags, 0, self.pre_lookahead_len)
        no_tokens = "a request has no tokens to encode (fewer than the lookahead while not finalized)"
        long_prompt = "prompt_feat is longer than the mel frames of prompt + tokens"
        if known is not None:
            if min(known.encoded) <= 0:
                raise ValueError(no_tokens)
            if any(f > self.token_mel_ratio * e for f, e in zip(host_lengths.prompt_feat, known.encoded)):
                raise ValueError(long_prompt)
        elif bool((encoded_len <= 0).any()):
            raise ValueError(no_tokens)
        h, mel_len = self.encoder.encode(embedded, total_len, encoded_len, streaming_flags,
                                         max_out=known and max(known.encoded))
        mu = self.encoder_proj(h).transpose(1, 2).contiguous()
        frames = mu.shape[2]
        if known is None and bool((prompt_feat_len > mel_len).any()):
            raise ValueError(long_prompt)
        cond = self._prompt_condition(prompt_feat, prompt_feat_len, frames).to(mu.dtype)
        mask = lengths_to_valid(mel_len, frames).unsqueeze(1).to(mu.dtype)
        return FlowBatch(mu, mask, cond, speaker, mel_len, prompt_feat_len, streaming_flags)

    # -- incremental streaming --------------------------------------------------------------------------------

    def supports_incremental(self) -> bool:
        """Exact caching needs chunk-causal attention everywhere: static chunks in the encoder and the
        estimator (the encoder's default static_chunk_size=0 means full attention even when streaming)."""
        return self.encoder.static_chunk_size > 0 and self.decoder.estimator.supports_incremental()

    @property
    def incremental_unit(self) -> int:
        """Cache boundaries (in tokens) fall on chunk ends of the encoder and of the estimator (mel frames)."""
        estimator_chunk = self.decoder.estimator.static_chunk_size
        estimator_tokens = estimator_chunk // math.gcd(estimator_chunk, self.token_mel_ratio)
        return math.lcm(self.encoder.static_chunk_size, estimator_tokens)

    @torch.inference_mode()
    def inference_incremental(self, token, token_len, prompt_token, prompt_token_len, prompt_feat, prompt_feat_len,
                              embedding, finalize: bool, stream: FlowStream | None = None, n_timesteps: int = 10):
        """Streaming `inference` for one request that reuses the work of its previous calls.

        Arguments as `inference` (streaming implied), plus `stream`: None on the first call, then what the
        previous call returned. Every call passes the whole prefix, which must extend the previous one; the
        prompt and embedding are taken from the first call. Returns (mel [1, 80, T'], stream) where mel
        equals `inference(..., streaming=True, finalize=finalize)` up to float rounding; only frames from the
        last complete chunk of the previous call on are computed."""
        if not self.supports_incremental():
            raise ValueError("incremental streaming needs static_chunk_size > 0 in the encoder and the estimator "
                             "and a one-level estimator")
        if token.shape[0] != 1:
            raise ValueError("inference_incremental takes one request")
        joined = torch.cat([prompt_token[0, : int(prompt_token_len.reshape(-1)[0])].to(token.dtype),
                            token[0, : int(token_len.reshape(-1)[0])]])
        if stream is None:
            stream = FlowStream(
                tokens=joined[:0], speaker=self.speaker_condition(embedding), prompt_feat=prompt_feat,
                encoder=EncoderStreamCache(), estimator_memory=[{} for _ in range(n_timesteps)],
                final_mel=torch.zeros(1, prompt_feat.shape[2], 0, device=token.device))
        self._check_continuation(stream, joined, n_timesteps)

        start = stream.encoder.done
        encoded = joined.numel() - (0 if finalize else self.pre_lookahead_len)
        if encoded <= 0:
            raise ValueError("no tokens to encode (fewer than the lookahead while not finalized)")
        ratio = self.token_mel_ratio
        prompt_frames = stream.prompt_feat.shape[1]
        if prompt_frames > ratio * encoded:
            raise ValueError("prompt_feat is longer than the mel frames of prompt + tokens")
        # The new boundary: the last chunk end among the encoded tokens (never behind the previous one).
        commit = max(start, encoded // self.incremental_unit * self.incremental_unit)
        mel = stream.final_mel
        if encoded > start:
            embedded = self.input_embedding(joined[start:].clamp(min=0).long()).unsqueeze(0)
            h = self.encoder.encode_incremental(embedded, encoded, stream.encoder, commit)
            mu = self.encoder_proj(h).transpose(1, 2).contiguous()
            cond = self._prompt_frames(stream.prompt_feat, ratio * start, ratio * encoded).to(mu.dtype)
            new = self.decoder.forward_incremental(mu, stream.speaker, cond, ratio * start, ratio * commit,
                                                   stream.estimator_memory)
            mel = torch.cat([mel, new], dim=2)
        stream.final_mel = mel[:, :, : ratio * commit]
        stream.tokens = joined
        stream.finished = bool(finalize)
        return mel[:, :, prompt_frames:].float(), stream

    @staticmethod
    def _check_continuation(stream: FlowStream, joined: torch.Tensor, n_timesteps: int) -> None:
        if stream.finished:
            raise ValueError("this flow stream was already finalized")
        seen = stream.tokens.numel()
        if joined.numel() < seen or not torch.equal(joined[:seen], stream.tokens):
            raise ValueError("inference_incremental: the tokens do not extend those of the previous call")
        if n_timesteps != len(stream.estimator_memory):
            raise ValueError("n_timesteps changed within a stream")

    @staticmethod
    def _prompt_frames(prompt_feat: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """[1, 80, end-start]: the prompt mel at frames start..end-1, zeros past its end."""
        frames = prompt_feat[:, start:end].transpose(1, 2)
        return F.pad(frames, (0, end - start - frames.shape[2]))

    @staticmethod
    def _prompt_condition(prompt_feat: torch.Tensor, prompt_feat_len: torch.Tensor, frames: int) -> torch.Tensor:
        """[B, F, 80] prompt mels -> [B, 80, frames]: each prompt at the start, zeros elsewhere."""
        feat = prompt_feat.transpose(1, 2)
        if feat.shape[2] >= frames:
            feat = feat[:, :, :frames]
        else:
            feat = F.pad(feat, (0, frames - feat.shape[2]))
        return feat * lengths_to_valid(prompt_feat_len, frames).unsqueeze(1).to(feat.dtype)
