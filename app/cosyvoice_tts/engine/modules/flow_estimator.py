"""The flow-matching vector-field estimator: `CausalConditionalDecoder` (inference only, torch only).

A 1-D U-Net over mel frames: the input is [noisy mel x, encoder output mu, speaker, prompt mel] stacked on
channels (4 x 80 = 320). Each level is a causal ResNet block conditioned on the flow time t, then transformer
blocks; convolutions are left-padded (causal) and, in streaming mode, attention follows static chunks, so a
frame never depends on frames after the end of its chunk.

Incremental streaming: given a `FrameWindow` (see flow_stream.py), the modules evaluate only new frames and
keep, per module, what later frames need from the final ones.

Parameter names follow upstream's (which come from Matcha-TTS and diffusers): `down_blocks.0.0.block1.block.0`,
`mid_blocks.3.1.0.attn1.to_q`, `ff.net.0.proj`, ...; the position of every submodule inside its
Sequential/ModuleList is part of those names.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import pointwise
from .flow_masks import attention_mask, per_request_flags
from .flow_stream import FrameWindow
from .fused_linear import FusedLinears


class CausalConv1d(nn.Conv1d):
    """Conv1d that only looks left: pads kernel_size-1 zeros in front of the sequence (or, incrementally,
    puts the last kernel_size-1 input frames before them)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.left_context = kernel_size - 1
        # [out, kernel * in]: the weight as one matrix over `pointwise.causal_columns` (see prepare_matmul).
        self.register_buffer("matmul_weight", None, persistent=False)

    def prepare_matmul(self) -> None:
        """Run as one GEMM over gathered input columns instead of cuDNN's convolution, which on these short
        sequences costs more in layout transforms (of the input, the weight and the output, every call) than
        in arithmetic. Same products, summed in another order. Written for the estimator's kernel 3."""
        if self.kernel_size[0] != 3:
            return
        with torch.no_grad():
            self.matmul_weight = self.weight.permute(0, 2, 1).reshape(self.out_channels, -1).contiguous()

    def forward(self, x: torch.Tensor, window: FrameWindow | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T], multiplied by mask [B, 1, T] first if given."""
        if window is not None:
            x = x if mask is None else x * mask
            joined = window.conv_input(self, x, self.left_context)
            if self.matmul_weight is None:
                return super().forward(joined)
            columns = pointwise.window_columns(joined, pointwise.compute_dtype(joined))
            return F.linear(columns, self.matmul_weight, self.bias).transpose(1, 2)
        if self.matmul_weight is None:
            x = x if mask is None else x * mask
            return super().forward(F.pad(x, (self.left_context, 0)))
        if mask is None:  # the input is masked already; masking again leaves it as it is
            mask = x.new_ones(1, 1, 1)
        columns = pointwise.causal_columns(x, mask, pointwise.compute_dtype(x))
        return F.linear(columns, self.matmul_weight, self.bias).transpose(1, 2)


def pointwise_conv(conv: nn.Conv1d, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A kernel-1 convolution of x * mask ([B, C, T]) as a matmul (see `CausalConv1d.prepare_matmul`)."""
    frames = pointwise.masked_frames(x, mask, pointwise.compute_dtype(x))
    return F.linear(frames, conv.weight[:, :, 0], conv.bias).transpose(1, 2)


class _SwapTimeAndChannels(nn.Module):
    """[B, C, T] <-> [B, T, C], so a LayerNorm can normalise over channels inside a Sequential."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class CausalBlock1D(nn.Module):
    """causal conv(3) -> LayerNorm over channels -> Mish, on masked input and output."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        # Indices 0 and 2 carry the weights (`block.0`, `block.2`), as in the checkpoint.
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), _SwapTimeAndChannels(), nn.LayerNorm(dim_out),
                                   _SwapTimeAndChannels(), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor, window: FrameWindow | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output plus `shift` (what the caller adds next, fused into the same kernel)."""
        conv, _, norm, _, _ = self.block
        h = conv(x, window, mask=mask)
        return pointwise.norm_mish(h, norm.weight, norm.bias, norm.eps, mask, shift)


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)
        self.convs_as_matmuls = False  # set by the estimator's fuse_projections

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor,
                window: FrameWindow | None = None) -> torch.Tensor:
        h = self.block1(x, mask, window, shift=self.mlp(time_emb).unsqueeze(-1))
        if self.convs_as_matmuls:
            residual = pointwise_conv(self.res_conv, x, mask)
        else:
            residual = self.res_conv(x * mask)
        return self.block2(h, mask, window, shift=residual)


class Downsample1D(nn.Module):
    """Stride-2 conv between U-Net levels (only built when `channels` has more than one entry)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Transposed conv x2 between U-Net levels (only built when `channels` has more than one entry)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """[B] flow times -> [B, dim]: sin then cos of scale * t at geometric frequencies (Matcha-TTS)."""
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    angle = scale * t.unsqueeze(1) * inv_freq.unsqueeze(0)
    return torch.cat((angle.sin(), angle.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class SelfAttention(nn.Module):
    """diffusers `Attention` as the estimator uses it: bias-free q/k/v, output projection with bias; the
    inner width heads * head_dim may differ from the block width."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])  # [1] is a dropout upstream
        self.qkv: FusedLinears | None = None

    def fuse_projections(self) -> None:
        """q, k and v from one GEMM (see fused_linear.py); the results are the same products."""
        self.qkv = FusedLinears([self.to_q, self.to_k, self.to_v])

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, window: FrameWindow | None = None) -> torch.Tensor:
        """x [B, T, dim]; mask [B, T, P+T]: bool (True: may attend) or added to the scores (0 / -inf), P =
        frames before x (0 unless incremental, where their keys/values come from the window's memory: a
        `FrameWindow`, or a `PagedWindow` for streams batched at different positions)."""
        if self.qkv is not None:
            q, k, v = (self._heads(p) for p in self.qkv(x))
        else:
            q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if window is not None:
            k, v = window.attention_keys_values(self, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.dim_head)
        return self.to_out[0](out)


class GELUProjection(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, activation_fn: str, mult: int = 4):
        super().__init__()
        approximations = {"gelu": "none", "gelu-approximate": "tanh"}
        if activation_fn not in approximations:
            raise ValueError(f"estimator act_fn={activation_fn!r} is not implemented (CosyVoice2 uses 'gelu')")
        # `net.0.proj` and `net.2` hold the weights; [1] is a dropout upstream.
        self.net = nn.ModuleList([GELUProjection(dim, dim * mult, approximations[activation_fn]), nn.Identity(),
                                  nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class TransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` with self-attention only: pre-LayerNorm attention and
    feed-forward, each with a residual."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, activation_fn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = SelfAttention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, window: FrameWindow | None = None,
                pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, dim], plus `pending`, a residual not yet added (the previous block's feed-forward output).
        Returns (x, feed-forward output): the block's output is their sum, left to the caller so that the add
        fuses with the next block's first norm. Norm outputs go to their linears in autocast's dtype."""
        dtype = pointwise.compute_dtype(x)
        x, h = pointwise.add_layer_norm(x, pending, self.norm1.weight, self.norm1.bias, self.norm1.eps, dtype)
        x, h = pointwise.add_layer_norm(x, self.attn1(h, mask, window), self.norm3.weight, self.norm3.bias,
                                        self.norm3.eps, dtype)
        return x, self.ff(h)


class CausalConditionalDecoder(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        channels=(256, 256),
        dropout=0.05,
        attention_head_dim=64,
        n_blocks=1,
        num_mid_blocks=2,
        num_heads=4,
        act_fn="snake",
        static_chunk_size=50,
        num_decoding_left_chunks=2,
    ):
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.static_chunk_size = static_chunk_size
        # Kept for the yaml; upstream's forward always attends to every left chunk, and so does this one.
        self.num_decoding_left_chunks = num_decoding_left_chunks
        time_embed_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_embed_dim)

        def transformers(dim: int) -> nn.ModuleList:
            return nn.ModuleList(TransformerBlock(dim, num_heads, attention_head_dim, act_fn) for _ in range(n_blocks))

        self.down_blocks = nn.ModuleList()
        level_in = in_channels
        for index, width in enumerate(channels):
            last = index == len(channels) - 1
            self.down_blocks.append(nn.ModuleList([
                CausalResnetBlock1D(level_in, width, time_embed_dim),
                transformers(width),
                CausalConv1d(width, width, 3) if last else Downsample1D(width),
            ]))
            level_in = width

        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([CausalResnetBlock1D(channels[-1], channels[-1], time_embed_dim), transformers(channels[-1])])
            for _ in range(num_mid_blocks)
        )

        self.up_blocks = nn.ModuleList()
        widths_up = channels[::-1] + (channels[0],)
        for index in range(len(channels)):
            last = index == len(channels) - 1
            width = widths_up[index + 1]
            # The skip connection doubles the input width.
            self.up_blocks.append(nn.ModuleList([
                CausalResnetBlock1D(widths_up[index] * 2, width, time_embed_dim),
                transformers(width),
                CausalConv1d(width, width, 3) if last else Upsample1D(width),
            ]))
        self.final_block = CausalBlock1D(channels[0], channels[0])
        self.final_proj = nn.Conv1d(channels[0], out_channels, 1)
        self.convs_as_matmuls = False  # kernel-1 convolutions as GEMMs (fuse_projections)

    def fuse_projections(self) -> None:
        """Fewer kernels per call, same model: q/k/v as one GEMM, convolutions as GEMMs. Call once the weights
        are final (loaded, on their device and dtype)."""
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fuse_projections()
            elif isinstance(module, CausalConv1d):
                module.prepare_matmul()
            elif isinstance(module, CausalResnetBlock1D):
                module.convs_as_matmuls = True
        self.convs_as_matmuls = True

    def supports_incremental(self) -> bool:
        """Exact incremental evaluation needs chunked attention and a single U-Net level (the strided
        down/up convolutions between levels are not causal)."""
        return self.static_chunk_size > 0 and len(self.down_blocks) == 1

    def _attention_mask(self, mask: torch.Tensor, streaming: torch.Tensor, window: FrameWindow | None,
                        masks: dict) -> torch.Tensor:
        """The self-attention mask for frames at frame mask [B, 1, T]; built once per level and call (`masks`),
        not once per block group."""
        frames = mask.shape[2]
        if frames not in masks:
            # As 0 / -inf in the dtype attention runs in: converted once here instead of in every block.
            dtype = pointwise.compute_dtype(mask) if mask.is_floating_point() else torch.float32
            if window is not None:
                masks[frames] = window.attention_bias(mask, self.static_chunk_size, dtype)
            else:
                visible = attention_mask(mask[:, 0].bool(), streaming, self.static_chunk_size)
                masks[frames] = pointwise.additive_mask(visible, dtype)
        return masks[frames]

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, attn_mask: torch.Tensor, window: FrameWindow | None):
        """Transformer blocks on [B, C, T] features."""
        x = x.transpose(1, 2)
        pending = None
        for block in blocks:
            x, pending = block(x, attn_mask, window, pending)
        if pending is not None:
            x = x + pending
        return x.transpose(1, 2)

    def forward(self, x, mask, mu, t, spks=None, cond=None, streaming=False, window: FrameWindow | None = None):
        """x, mu, cond [B, 80, T]; mask [B, 1, T] (1 on real frames); t [B]; spks [B, 80]; streaming: bool
        or one bool per sample (static-chunk attention). Returns the velocity [B, out_channels, T].

        With a `window`, x/mu/cond are the frames window.start.. of sequences evaluated before up to there
        (all frames real, streaming, `supports_incremental()`); the window's memory is read and updated."""
        flags = per_request_flags(streaming, x.shape[0], x.device)
        # (`streaming is True` needs no look at the flags: no host sync, so the call can be graph-captured.)
        if window is not None and not (self.supports_incremental() and (streaming is True or bool(flags.all()))):
            raise ValueError("incremental estimator evaluation needs streaming, static chunks and one U-Net level")
        time_emb = self.time_mlp(sinusoidal_time_embedding(t, self.in_channels).to(t.dtype))
        inputs = [x, mu]
        if spks is not None:
            inputs.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            inputs.append(cond)
        h = torch.cat(inputs, dim=1)

        skips, masks, attn_masks = [], [mask], {}

        def attend(blocks, x, level_mask):
            return self._attend(blocks, x, self._attention_mask(level_mask, flags, window, attn_masks), window)

        for resnet, blocks, downsample in self.down_blocks:
            level_mask = masks[-1]
            h = attend(blocks, resnet(h, level_mask, time_emb, window), level_mask)
            skips.append(h)
            h = self._resample(downsample, h * level_mask, window)
            masks.append(level_mask[:, :, ::2])
        masks.pop()  # the mask below the last level is never used

        for resnet, blocks in self.mid_blocks:
            h = attend(blocks, resnet(h, masks[-1], time_emb, window), masks[-1])

        for resnet, blocks, upsample in self.up_blocks:
            level_mask = masks.pop()
            skip = skips.pop()
            h = torch.cat([h[:, :, :skip.shape[-1]], skip], dim=1)
            h = attend(blocks, resnet(h, level_mask, time_emb, window), level_mask)
            h = self._resample(upsample, h * level_mask, window)
        h = self.final_block(h, level_mask, window)
        if self.convs_as_matmuls:
            return pointwise_conv(self.final_proj, h, level_mask) * mask
        return self.final_proj(h * level_mask) * mask

    @staticmethod
    def _resample(layer: nn.Module, h: torch.Tensor, window: FrameWindow | None) -> torch.Tensor:
        # The last level's "resampling" is a causal conv; only that one can run incrementally.
        return layer(h, window) if isinstance(layer, CausalConv1d) else layer(h)
