"""HiFT vocoder of CosyVoice2 (upstream `cosyvoice.hifigan.generator.HiFTGenerator`), inference only.

mel [B, 80, T] -> F0 per frame (ConvRNNF0Predictor) -> harmonic + noise excitation at 24 kHz
(HarmonicNoiseSource) -> a HiFi-GAN style upsampler whose every stage also sees the excitation's STFT ->
magnitude and phase of a 16-point STFT -> iSTFT: 480 samples per mel frame with the release settings.

Differences from upstream, none of which changes the output of a single call:
* the source noise can come from a caller's `torch.Generator` (one, or one per batch item) instead of the
  global RNG; with `generator=None` the global RNG is used in upstream's draw order (see hift_source.py);
* padded batches: `lengths` gives each item's frame count and every layer masks the padding; with one
  generator per item, an item's output then does not depend on what it is batched with (`inference_batch`);
* the network may run in half precision; F0 phases, STFT and iSTFT stay in float32 and speech is float32.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .hift_checkpoint import normalize_hift_state_dict
from .hift_f0 import ConvRNNF0Predictor
from .hift_layers import ResBlock, fold_weight_norm, masked, weight_normed
from .hift_source import HarmonicNoiseSource, NoiseGenerator
from .hift_stft import istft_items, periodic_hann, stft_real_imag

__all__ = ["HiFTGenerator", "ConvRNNF0Predictor", "normalize_hift_state_dict"]

# Slope of the leaky ReLU before conv_post: upstream calls F.leaky_relu without `lrelu_slope` there.
_POST_LRELU_SLOPE = 0.01
# Upstream clips the predicted STFT magnitude (exp of the network output) before the iSTFT.
_MAX_MAGNITUDE = 1e2


class HiFTGenerator(nn.Module):
    """HiFTNet generator (neural source filter + iSTFTNet). Constructor arguments are upstream's."""

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: Mapping[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: nn.Module | None = None,
    ):
        super().__init__()
        if sampling_rate == 22050:
            # Upstream switches to another sine generator (SourceModuleHnNSF, random per-harmonic phases)
            # for CosyVoice1's 22.05 kHz model; only the CosyVoice2 variant is implemented here.
            raise ValueError("HiFTGenerator: the 22050 Hz (CosyVoice1) source module is not implemented")
        if f0_predictor is None:
            raise ValueError("HiFTGenerator needs an f0_predictor module")
        istft_params = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        self.n_fft = int(istft_params["n_fft"])
        self.hop_len = int(istft_params["hop_len"])
        self.sampling_rate = sampling_rate
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.upsample_rates = [int(u) for u in upsample_rates]
        self.samples_per_frame = math.prod(self.upsample_rates) * self.hop_len
        self.num_kernels = len(resblock_kernel_sizes)
        spec_channels = self.n_fft + 2  # real and imaginary parts of n_fft // 2 + 1 bins

        self.m_source = HarmonicNoiseSource(
            sampling_rate=sampling_rate, samples_per_frame=self.samples_per_frame, harmonic_num=nb_harmonics,
            sine_amp=nsf_alpha, noise_std=nsf_sigma, voiced_threshold=nsf_voiced_threshold)
        self.conv_pre = weight_normed(nn.Conv1d(in_channels, base_channels, 7, padding=3))

        stage_channels = [base_channels // 2 ** (i + 1) for i in range(len(self.upsample_rates))]
        self.ups = nn.ModuleList(
            weight_normed(nn.ConvTranspose1d(base_channels // 2 ** i, channels, k, u, padding=(k - u) // 2))
            for i, (u, k, channels) in enumerate(zip(self.upsample_rates, upsample_kernel_sizes, stage_channels))
        )

        # The excitation's STFT has the final stage's frame rate; stage i needs it decimated by the product
        # of the upsampling rates still to come.
        remaining = [math.prod(self.upsample_rates[i + 1:]) for i in range(len(self.upsample_rates))]
        self.source_downs = nn.ModuleList(
            nn.Conv1d(spec_channels, channels, 1) if stride == 1
            else nn.Conv1d(spec_channels, channels, stride * 2, stride, padding=stride // 2)
            for stride, channels in zip(remaining, stage_channels)
        )
        self.source_resblocks = nn.ModuleList(
            ResBlock(channels, k, list(d))
            for channels, k, d in zip(stage_channels, source_resblock_kernel_sizes, source_resblock_dilation_sizes)
        )
        self.resblocks = nn.ModuleList(
            ResBlock(channels, k, list(d))
            for channels in stage_channels
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes)
        )
        self.conv_post = weight_normed(nn.Conv1d(stage_channels[-1], spec_channels, 7, padding=3))
        # Not in the checkpoint (upstream keeps it as a plain attribute), but must follow .to(device).
        self.register_buffer("stft_window", periodic_hann(self.n_fft), persistent=False)
        self.f0_predictor = f0_predictor

    # ------------------------------------------------------------------ public API

    @torch.inference_mode()
    def inference(self, speech_feat: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: NoiseGenerator = None,
                  lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, in_channels, T] -> (speech [B, T * 480], source [B, 1, T * 480]), both float32.

        cache_source [B, 1, S] (S may be 0) replaces the first S excitation samples: the previous chunk's
        tail, so a streamed utterance's excitation continues without a phase jump.
        generator: None (global RNG, upstream's draw order), one torch.Generator for the batch, or one per
        item (each item then draws exactly what it would draw alone).
        lengths [B]: valid frames per item of a right-padded batch; outputs past an item's
        lengths[b] * 480 samples are zero.
        """
        return self(speech_feat, cache_source, generator, lengths)

    @torch.inference_mode()
    def inference_batch(
        self,
        mels: Sequence[torch.Tensor],
        cache_sources: Sequence[torch.Tensor | None] | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Several requests in one call: mels[i] [1, in_channels, T_i], cache_sources[i] [1, 1, S_i] or None.

        Returns per item (speech [1, T_i * 480], source [1, 1, T_i * 480]), equal within float tolerance to
        `inference(mels[i], cache_sources[i], generators[i])`.
        """
        count = len(mels)
        cache_sources = list(cache_sources) if cache_sources is not None else [None] * count
        generators = list(generators) if generators is not None else [None] * count
        if not (len(cache_sources) == len(generators) == count) or count == 0:
            raise ValueError("inference_batch needs one mel, cache source and generator per item (at least one)")
        frames = [mel.shape[-1] for mel in mels]
        mel_batch = torch.cat([F.pad(mel, (0, max(frames) - mel.shape[-1])) for mel in mels], dim=0)
        cache_lengths = [0 if c is None else c.shape[-1] for c in cache_sources]
        cache = mel_batch.new_zeros(count, 1, max(cache_lengths), dtype=torch.float32)
        for item, c in enumerate(cache_sources):
            if c is not None:
                cache[item, :, :c.shape[-1]] = c[0]
        lengths = torch.tensor(frames, device=mel_batch.device)
        cache_lengths = torch.tensor(cache_lengths, device=mel_batch.device)
        self._check(lengths, max(frames), cache_lengths)
        speech, source = self._synthesize(mel_batch, lengths, cache, cache_lengths, generators)
        return [(speech[item:item + 1, :n * self.samples_per_frame],
                 source[item:item + 1, :, :n * self.samples_per_frame]) for item, n in enumerate(frames)]

    def fold_weight_norm(self) -> None:
        """Bake weight norm into plain weights for faster inference (state-dict keys change: load first)."""
        fold_weight_norm(self)

    # ------------------------------------------------------------------ computation

    def forward(self, speech_feat: torch.Tensor, cache_source: torch.Tensor | None = None,
                generator: NoiseGenerator = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch = speech_feat.shape[0]
        if cache_source is None:
            cache_source = speech_feat.new_zeros(batch, 1, 0, dtype=torch.float32)
        if cache_source.dim() != 3 or cache_source.shape[:2] != (batch, 1):
            raise ValueError(f"cache_source must be [{batch}, 1, S], got {list(cache_source.shape)}")
        cache_lengths = torch.full((batch,), cache_source.shape[2], device=speech_feat.device)
        if lengths is not None:
            lengths = lengths.to(speech_feat.device)
            if lengths.shape != (batch,):
                raise ValueError(f"lengths must be [{batch}] frame counts")
        frames = speech_feat.shape[2]
        self._check(lengths if lengths is not None else torch.full((batch,), frames, device=speech_feat.device),
                    frames, cache_lengths)
        return self._synthesize(speech_feat, lengths, cache_source, cache_lengths, generator)

    def _check(self, lengths: torch.Tensor, n_frames: int, cache_lengths: torch.Tensor) -> None:
        """Validation apart from the computation, which must stay free of host syncs (CUDA-graph capture)."""
        if bool((lengths < 1).any()) or bool((lengths > n_frames).any()):
            raise ValueError(f"lengths must be frame counts in 1..{n_frames}")
        if bool((cache_lengths.to(lengths.device) > lengths * self.samples_per_frame).any()):
            raise ValueError("cache_source is longer than the excitation it should start")

    def _synthesize(self, mel: torch.Tensor, lengths: torch.Tensor | None, cache: torch.Tensor,
                    cache_lengths: torch.Tensor, generator: NoiseGenerator,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """noise: the source's standard normal noise [B, samples, harmonics] drawn beforehand (CUDA graphs),
        instead of drawing it here from `generator`."""
        batch, _, n_frames = mel.shape
        n_samples = n_frames * self.samples_per_frame
        item_samples = (lengths if lengths is not None
                        else torch.full((batch,), n_frames, device=mel.device)) * self.samples_per_frame

        mel = mel.to(self._compute_dtype())
        frame_mask = self._frame_mask(lengths, 1, n_frames, mel.dtype)
        mel = masked(mel, frame_mask)  # the convolutions must see zeros past an item, as when it is alone
        f0 = self.f0_predictor(mel, mask=frame_mask)
        source = self.m_source(f0, lengths, generator, noise)
        source = self._start_with_cache(source, cache, cache_lengths)
        if lengths is not None:
            source = source * self._frame_mask(lengths, self.samples_per_frame, n_samples, source.dtype)
        speech = self._decode(mel, source, lengths, item_samples)
        return torch.clamp(speech, -self.audio_limit, self.audio_limit), source

    def _decode(self, mel: torch.Tensor, source: torch.Tensor, lengths: torch.Tensor | None,
                item_samples: torch.Tensor) -> torch.Tensor:
        """mel + excitation -> speech [B, T * 480] (before the clamp)."""
        dtype = mel.dtype
        source_spec = stft_real_imag(source[:, 0], item_samples, self.n_fft, self.hop_len,
                                     self.stft_window).to(dtype)
        x = masked(self.conv_pre(mel), self._frame_mask(lengths, 1, mel.shape[2], dtype))
        scale = 1
        last_stage = len(self.ups) - 1
        for stage, up in enumerate(self.ups):
            scale *= self.upsample_rates[stage]
            x = up(F.leaky_relu(x, self.lrelu_slope))
            extra = 0
            if stage == last_stage:
                # One more frame, so the iSTFT frame count matches the excitation STFT's (L / hop + 1).
                x = F.pad(x, (1, 0), mode="reflect")
                extra = 1
            mask = self._frame_mask(lengths, scale, x.shape[2], dtype, extra)
            x = masked(x, mask)
            fused_source = masked(self.source_downs[stage](source_spec), mask)
            x = x + self.source_resblocks[stage](fused_source, mask)
            kernels = self.resblocks[stage * self.num_kernels:(stage + 1) * self.num_kernels]
            x = sum(block(x, mask) for block in kernels) / self.num_kernels

        x = self.conv_post(F.leaky_relu(x, _POST_LRELU_SLOPE)).float()
        bins = self.n_fft // 2 + 1
        magnitude = torch.clip(torch.exp(x[:, :bins]), max=_MAX_MAGNITUDE)
        # Upstream passes the phase channels through sin (a bounded phase); kept since the model learned it.
        phase = torch.sin(x[:, bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        frame_counts = item_samples // self.hop_len + 1
        return istft_items(spec, frame_counts, self.n_fft, self.hop_len, self.stft_window)

    # ------------------------------------------------------------------ helpers

    def _compute_dtype(self) -> torch.dtype:
        return self.m_source.l_linear.weight.dtype

    @staticmethod
    def _start_with_cache(source: torch.Tensor, cache: torch.Tensor, cache_lengths: torch.Tensor) -> torch.Tensor:
        if cache.shape[2] == 0:
            return source
        cached = cache.shape[2]
        positions = torch.arange(cached, device=source.device)[None, None, :]
        use_cache = positions < cache_lengths.to(source.device)[:, None, None]
        head = torch.where(use_cache, cache.to(source.device, source.dtype), source[:, :, :cached])
        return torch.cat([head, source[:, :, cached:]], dim=2)

    @staticmethod
    def _frame_mask(lengths: torch.Tensor | None, scale: int, size: int, dtype: torch.dtype,
                    extra: int = 0) -> torch.Tensor | None:
        """[B, 1, size] with 1 on each item's first lengths * scale + extra steps; None for unpadded batches."""
        if lengths is None:
            return None
        steps = torch.arange(size, device=lengths.device)[None, :]
        return (steps < lengths[:, None] * scale + extra).to(dtype)[:, None, :]
