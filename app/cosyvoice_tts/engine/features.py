"""Audio features for the CosyVoice2 frontend, in torch/numpy only (no torchaudio, librosa or whisper).

Each function reproduces what upstream computes for one consumer:

- `campplus_fbank`: `torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000)`
  minus its mean over time, the input of `campplus.onnx` (speaker embedding);
- `whisper_log_mel`: `whisper.log_mel_spectrogram(audio, n_mels=128)`, the input of
  `speech_tokenizer_v2.onnx` (prompt speech tokens);
- `matcha_mel`: `matcha.utils.audio.mel_spectrogram` with the settings of `cosyvoice2.yaml`'s
  `feat_extractor`, the prompt mel that conditions the flow;
- `resample`: soxr, standing in for `torchaudio.transforms.Resample` (close, not bit-equal; see there).

All inputs are mono waveforms scaled to [-1, 1], as upstream passes them.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import soxr
import torch

# ---------------------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------------------


def resampled_length(num_samples: int, orig_sr: int, new_sr: int) -> int:
    """The output length of `torchaudio.transforms.Resample`: ceil(num_samples * new_sr / orig_sr)."""
    return -(-num_samples * new_sr // orig_sr)


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float waveform with soxr ("HQ") to torchaudio's output length.

    Upstream uses `torchaudio.transforms.Resample` (windowed sinc, Hann window, 6 zero crossings, roll-off
    0.99). soxr is a different filter, so the samples are not bit-equal: they differ slightly, mostly near
    the new Nyquist frequency, while the spectra agree closely below it. The length is forced to
    torchaudio's (soxr rounds, torchaudio rounds up; the extra sample is a zero) because the frame counts of
    every feature downstream follow from it.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"resample expects a mono 1-D waveform, got shape {wav.shape}")
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return wav.copy()
    out = soxr.resample(wav, orig_sr, new_sr).astype(np.float32, copy=False)
    length = resampled_length(len(wav), orig_sr, new_sr)
    if len(out) >= length:
        return np.ascontiguousarray(out[:length])
    return np.pad(out, (0, length - len(out)))


# ---------------------------------------------------------------------------------------------------------
# kaldi fbank (campplus)
# ---------------------------------------------------------------------------------------------------------

# Kaldi's defaults, as torchaudio.compliance.kaldi.fbank applies them for upstream's call.
_KALDI_FRAME_LENGTH_MS = 25.0
_KALDI_FRAME_SHIFT_MS = 10.0
_KALDI_PREEMPHASIS = 0.97
_KALDI_LOW_FREQ = 20.0
_KALDI_POVEY_POWER = 0.85
_FLOAT32_EPS = float(np.finfo(np.float32).eps)  # Kaldi floors energies at numeric_limits<float>::epsilon


def _kaldi_mel(freq):
    return 1127.0 * (1.0 + freq / 700.0).log() if torch.is_tensor(freq) else 1127.0 * math.log(1.0 + freq / 700.0)


@lru_cache(maxsize=8)
def kaldi_mel_banks(num_bins: int, padded_window: int, sample_rate: float) -> torch.Tensor:
    """Kaldi's triangular mel filters on the HTK mel scale, shape [num_bins, padded_window // 2 + 1].

    The filters are triangles in the mel domain spanning low_freq=20 Hz to Nyquist; Kaldi leaves the
    Nyquist bin out, so its column is zero. Computed in float32 like Kaldi (BaseFloat) and torchaudio:
    a float64 version differs by up to ~1e-5 per weight, which shows in the log energies of quiet bins.
    """
    nyquist = 0.5 * sample_rate
    mel_low, mel_high = _kaldi_mel(_KALDI_LOW_FREQ), _kaldi_mel(nyquist)
    delta = (mel_high - mel_low) / (num_bins + 1)
    index = torch.arange(num_bins)[:, None]
    left = mel_low + index * delta
    center = mel_low + (index + 1.0) * delta
    right = mel_low + (index + 2.0) * delta
    bin_mel = _kaldi_mel(sample_rate / padded_window * torch.arange(float(padded_window // 2)))[None, :]
    up = (bin_mel - left) / (center - left)
    down = (right - bin_mel) / (right - center)
    banks = torch.clamp_min(torch.minimum(up, down), 0.0)
    return torch.nn.functional.pad(banks, (0, 1))  # the Nyquist bin


@lru_cache(maxsize=8)
def _povey_window(size: int) -> torch.Tensor:
    # Kaldi's "povey" window: a symmetric Hann window raised to 0.85 (it reaches zero at both ends).
    return torch.hann_window(size, periodic=False, dtype=torch.float32).pow(_KALDI_POVEY_POWER)


def kaldi_fbank(wav: torch.Tensor, num_mel_bins: int = 80, sample_rate: int = 16000) -> torch.Tensor:
    """Log mel filterbank energies as Kaldi's compute-fbank-feats with dither 0, shape [frames, num_mel_bins].

    Kaldi defaults: 25 ms frames every 10 ms, only whole frames (snip_edges), per-frame DC removal,
    pre-emphasis 0.97, povey window, FFT size rounded up to a power of two, power spectrum.
    """
    wav = _as_mono_tensor(wav)
    window = int(sample_rate * _KALDI_FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * _KALDI_FRAME_SHIFT_MS / 1000)
    if wav.numel() < window:
        raise ValueError(f"audio too short for a kaldi fbank: {wav.numel()} samples < one {window}-sample frame")
    padded = 1 << (window - 1).bit_length()
    frames = wav.unfold(0, window, shift)  # [m, window]; only frames that fit (snip_edges)
    frames = frames - frames.mean(dim=1, keepdim=True)
    # pre-emphasis; Kaldi uses the frame's own first sample as its predecessor
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - _KALDI_PREEMPHASIS * previous
    frames = frames * _povey_window(window).to(frames.device)
    frames = torch.nn.functional.pad(frames, (0, padded - window))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    energies = power @ kaldi_mel_banks(num_mel_bins, padded, float(sample_rate)).to(frames.device).T
    return energies.clamp_min(_FLOAT32_EPS).log()


def campplus_fbank(wav_16k: torch.Tensor) -> torch.Tensor:
    """The campplus input: 80-bin kaldi fbank at 16 kHz minus its mean over time, shape [frames, 80]."""
    feat = kaldi_fbank(wav_16k, num_mel_bins=80, sample_rate=16000)
    return feat - feat.mean(dim=0, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# slaney mel filterbank (librosa.filters.mel defaults: slaney mel scale, slaney area normalisation)
# ---------------------------------------------------------------------------------------------------------

_SLANEY_HZ_PER_MEL = 200.0 / 3.0  # linear part below 1 kHz
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_START_MEL = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
_SLANEY_LOG_STEP = math.log(6.4) / 27.0


def slaney_hz_to_mel(hz: np.ndarray) -> np.ndarray:
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_MEL + np.log(np.maximum(hz, 1e-12) / _SLANEY_LOG_START_HZ) / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_LOG_START_HZ, logarithmic, linear)


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mel - _SLANEY_LOG_START_MEL))
    return np.where(mel >= _SLANEY_LOG_START_MEL, logarithmic, linear)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                          fmax: float | None = None) -> np.ndarray:
    """Mel filters as `librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax)` builds them, float32 [n_mels, n_fft//2+1].

    Triangles with corners equally spaced on the slaney mel scale, each scaled to unit area
    (2 / bandwidth in Hz), which is what whisper's shipped `mel_filters.npz` and matcha use.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    corners_hz = slaney_mel_to_hz(np.linspace(slaney_hz_to_mel(fmin), slaney_hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(corners_hz)
    distance = corners_hz[:, None] - fft_hz[None, :]
    rising = -distance[:-2] / widths[:-1, None]
    falling = distance[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (corners_hz[2:] - corners_hz[:-2]))[:, None]
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # shared through the cache
    return weights


@lru_cache(maxsize=8)
def _slaney_filters_tensor(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                           fmax: float | None = None) -> torch.Tensor:
    return torch.from_numpy(slaney_mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax).copy())


# ---------------------------------------------------------------------------------------------------------
# whisper log-mel (speech tokenizer)
# ---------------------------------------------------------------------------------------------------------

WHISPER_SAMPLE_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


def whisper_log_mel(wav_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """`whisper.log_mel_spectrogram(audio, n_mels)` for one mono 16 kHz waveform, shape [n_mels, frames].

    frames = samples // 160: a centred STFT with the last frame dropped, as whisper does.
    """
    wav = _as_mono_tensor(wav_16k)
    window = torch.hann_window(WHISPER_N_FFT, device=wav.device)
    stft = torch.stft(wav, WHISPER_N_FFT, WHISPER_HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = _slaney_filters_tensor(WHISPER_SAMPLE_RATE, WHISPER_N_FFT, n_mels).to(wav.device)
    log_spec = (filters @ power).clamp_min(1e-10).log10()
    # whisper keeps an 80 dB dynamic range below the loudest bin, then scales to roughly [-1, 1]
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


# ---------------------------------------------------------------------------------------------------------
# matcha mel (prompt mel for the flow)
# ---------------------------------------------------------------------------------------------------------

# cosyvoice2.yaml's feat_extractor: matcha.utils.audio.mel_spectrogram with these settings
PROMPT_MEL_SAMPLE_RATE = 24000
PROMPT_MEL_N_FFT = 1920
PROMPT_MEL_HOP = 480
PROMPT_MEL_WIN = 1920
PROMPT_MEL_BINS = 80
PROMPT_MEL_FMIN = 0.0
PROMPT_MEL_FMAX = 8000.0


def matcha_mel(wav: torch.Tensor, n_fft: int = PROMPT_MEL_N_FFT, num_mels: int = PROMPT_MEL_BINS,
               sample_rate: int = PROMPT_MEL_SAMPLE_RATE, hop_size: int = PROMPT_MEL_HOP,
               win_size: int = PROMPT_MEL_WIN, fmin: float = PROMPT_MEL_FMIN,
               fmax: float = PROMPT_MEL_FMAX) -> torch.Tensor:
    """matcha's `mel_spectrogram(..., center=False)`: natural-log mel magnitudes, shape [1, num_mels, frames].

    The waveform is reflect-padded by (n_fft - hop) / 2 on both sides so that frames = samples // hop.
    """
    wav = _as_mono_tensor(wav)[None, :]
    pad = (n_fft - hop_size) // 2
    wav = torch.nn.functional.pad(wav[:, None, :], (pad, pad), mode="reflect")[:, 0, :]
    window = torch.hann_window(win_size, device=wav.device)
    spec = torch.stft(wav, n_fft, hop_length=hop_size, win_length=win_size, window=window, center=False,
                      normalized=False, onesided=True, return_complex=True)
    spec = torch.view_as_real(spec)
    magnitude = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)  # matcha's epsilon keeps the gradient of sqrt finite
    filters = _slaney_filters_tensor(sample_rate, n_fft, num_mels, fmin, fmax).to(wav.device)
    return (filters @ magnitude).clamp_min(1e-5).log()


# ---------------------------------------------------------------------------------------------------------


def _as_mono_tensor(wav) -> torch.Tensor:
    """A 1-D float32 tensor from a mono waveform given as [N] or [1, N] (tensor or numpy)."""
    if not torch.is_tensor(wav):
        wav = torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))
    if wav.dim() == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.dim() != 1:
        raise ValueError(f"expected a mono waveform of shape [N] or [1, N], got {tuple(wav.shape)}")
    return wav.to(torch.float32).contiguous()
