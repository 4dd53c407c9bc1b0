"""The short STFT / inverse STFT of HiFT's head, for batches whose items may have different lengths.

HiFT analyses its excitation signal with a centred STFT (reflect padding) and synthesises audio with the
matching centred iSTFT. Both touch the end of the signal: the reflection is taken about the last sample, and
the overlap-add normalisation (the summed squared window) depends on how many frames exist. In a padded batch
"the end" must be each item's own end, so both are written here with per-item lengths; with full lengths they
compute exactly what `torch.stft(center=True)` / `torch.istft(center=True)` compute.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def periodic_hann(n_fft: int) -> torch.Tensor:
    """The periodic ("fftbins") Hann window, evaluated in float64 and rounded once to float32 as the
    trained model's window was."""
    return torch.hann_window(n_fft, periodic=True, dtype=torch.float64).to(torch.float32)


def reflect_pad_items(signal: torch.Tensor, lengths: torch.Tensor, pad: int) -> torch.Tensor:
    """signal [B, L] -> [B, L + 2*pad]: each item reflected about its first and its own last sample.

    Samples past an item's reflected tail are zero. Equal to F.pad(..., mode="reflect") when every length is L.
    """
    n = signal.shape[1]
    position = torch.arange(-pad, n + pad, device=signal.device)[None, :]  # index into the unpadded signal
    last = lengths.to(signal.device)[:, None] - 1
    source = position.abs()  # reflection about sample 0
    source = torch.where(source > last, 2 * last - source, source)  # reflection about the item's last sample
    padded = signal.gather(1, source.clamp(0, n - 1).expand(signal.shape[0], -1))
    return padded * (position <= last + pad)


def stft_real_imag(signal: torch.Tensor, lengths: torch.Tensor, n_fft: int, hop: int,
                   window: torch.Tensor) -> torch.Tensor:
    """Centred STFT of signal [B, L] -> [B, 2 * (n_fft // 2 + 1), L // hop + 1]: real parts, then imaginary.

    Frames past an item's last frame (lengths // hop + 1) are zero, as if that item had been analysed alone
    and then zero-padded.
    """
    padded = reflect_pad_items(signal, lengths, n_fft // 2)
    spec = torch.stft(padded, n_fft, hop, n_fft, window=window, center=False, return_complex=True)
    spec = torch.cat([spec.real, spec.imag], dim=1)
    frames = torch.arange(spec.shape[2], device=signal.device)[None, :]
    return spec * (frames < lengths.to(signal.device)[:, None] // hop + 1)[:, None, :]


def istft_items(spec: torch.Tensor, frame_counts: torch.Tensor, n_fft: int, hop: int,
                window: torch.Tensor) -> torch.Tensor:
    """Centred inverse STFT of complex spec [B, n_fft // 2 + 1, F] -> [B, hop * (F - 1)].

    Item b uses only its first frame_counts[b] frames and yields hop * (frame_counts[b] - 1) samples, zeros
    after. Same arithmetic as torch.istft (irfft, window, overlap-add, divide by the summed squared window,
    trim n_fft // 2 at both ends), except that the window sum is counted over the item's own frames.
    """
    batch, _, n_frames = spec.shape
    frame_valid = (torch.arange(n_frames, device=spec.device)[None, :]
                   < frame_counts.to(spec.device)[:, None]).to(window.dtype)[:, None, :]
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window[None, :, None] * frame_valid
    envelope_frames = (window * window)[None, :, None] * frame_valid
    total = n_fft + hop * (n_frames - 1)
    overlap_add = _overlap_add(frames, total, n_fft, hop)
    envelope = _overlap_add(envelope_frames, total, n_fft, hop).expand(batch, -1)
    trim = n_fft // 2
    overlap_add = overlap_add[:, trim:total - trim]
    envelope = envelope[:, trim:total - trim]
    # An item's last frame reaches n_fft // 2 samples past its end, where the item alone would have been
    # trimmed; further on the envelope is 0 (no frames): output 0 there rather than 0/0.
    samples = torch.arange(overlap_add.shape[1], device=spec.device)[None, :]
    inside = (samples < hop * (frame_counts.to(spec.device)[:, None] - 1)) & (envelope > 1e-11)
    return torch.where(inside, overlap_add / torch.where(inside, envelope, 1.0), 0.0)


def _overlap_add(frames: torch.Tensor, total: int, n_fft: int, hop: int) -> torch.Tensor:
    """frames [B, n_fft, F] -> [B, total], frame f added at offset f * hop."""
    summed = F.fold(frames, output_size=(1, total), kernel_size=(1, n_fft), stride=(1, hop))
    return summed.reshape(frames.shape[0], total)
