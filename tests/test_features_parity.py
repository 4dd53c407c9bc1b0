"""engine/features.py against upstream's torchaudio kaldi fbank, whisper log-mel, matcha mel and Resample.

Runs tests/reference/features_reference.py under REF_PYTHON once for the module.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_tts.engine import features

pytestmark = pytest.mark.reference

REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "features_reference.py"
IMPORT_FAILED = 3


def run_reference(*args: str) -> None:
    ref_python = os.environ.get("REF_PYTHON")
    if not ref_python:
        pytest.skip("REF_PYTHON is not set (a Python with upstream CosyVoice, torchaudio, whisper, matcha)")
    proc = subprocess.run([ref_python, str(REFERENCE_SCRIPT), *args], capture_output=True, text=True, timeout=600)
    if proc.returncode == IMPORT_FAILED:
        pytest.skip(f"the REF_PYTHON env cannot import the reference: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise AssertionError(f"{REFERENCE_SCRIPT.name} failed with exit code {proc.returncode}")


def voice_like(sample_rate: int, seconds: float, seed: int) -> np.ndarray:
    """A glide with harmonics, syllable-like amplitude modulation and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    wav = 0.3 * wav / np.abs(wav).max() + 0.01 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features_parity")
    # lengths that are not whole frames, to check the frame arithmetic too
    inputs = {"wav16k": voice_like(16000, 2.0123, seed=1), "wav24k": voice_like(24000, 2.0321, seed=2)}
    np.savez(tmp / "in.npz", **inputs)
    run_reference(str(tmp / "in.npz"), str(tmp / "out.npz"))
    return inputs, dict(np.load(tmp / "out.npz"))


def test_kaldi_fbank_matches_torchaudio(case):
    inputs, ref = case
    ours = features.kaldi_fbank(torch.from_numpy(inputs["wav16k"])).numpy()
    assert ours.shape == ref["fbank"].shape
    np.testing.assert_allclose(ours, ref["fbank"], rtol=0, atol=1e-5)


def test_campplus_fbank_matches_upstream_mean_normalised_fbank(case):
    inputs, ref = case
    ours = features.campplus_fbank(torch.from_numpy(inputs["wav16k"])[None]).numpy()
    np.testing.assert_allclose(ours, ref["fbank_normalised"], rtol=0, atol=1e-5)


def test_whisper_log_mel_matches_whisper(case):
    inputs, ref = case
    ours = features.whisper_log_mel(torch.from_numpy(inputs["wav16k"])[None], n_mels=128).numpy()
    assert ours[None].shape == ref["whisper_mel"].shape
    np.testing.assert_allclose(ours[None], ref["whisper_mel"], rtol=0, atol=1e-5)


def test_slaney_filterbanks_match_whisper_and_librosa(case):
    _, ref = case
    np.testing.assert_allclose(features.slaney_mel_filterbank(16000, 400, 128), ref["whisper_filters_128"],
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(features.slaney_mel_filterbank(24000, 1920, 80, 0.0, 8000.0),
                               ref["librosa_mel_24k"], rtol=1e-5, atol=1e-8)


def test_matcha_mel_matches_matcha(case):
    inputs, ref = case
    ours = features.matcha_mel(torch.from_numpy(inputs["wav24k"])[None]).numpy()
    assert ours.shape == ref["prompt_mel"].shape
    np.testing.assert_allclose(ours, ref["prompt_mel"], rtol=0, atol=1e-4)


def _band_spectrum(wav: np.ndarray, sample_rate: int, up_to_hz: float) -> np.ndarray:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return spectrum[np.fft.rfftfreq(len(wav), 1 / sample_rate) < up_to_hz]


@pytest.mark.parametrize("direction", ["16_to_24", "24_to_16"])
def test_soxr_resampling_is_close_to_torchaudio(case, direction):
    """Not bit-equal (different filters): same length, spectra within 2 % below 0.9 x the lower Nyquist."""
    inputs, ref = case
    orig_sr, new_sr, source = (16000, 24000, "wav16k") if direction == "16_to_24" else (24000, 16000, "wav24k")
    ours = features.resample(inputs[source], orig_sr, new_sr)
    theirs = ref[f"resampled_{direction}"]
    assert ours.shape == theirs.shape
    band = 0.9 * min(orig_sr, new_sr) / 2
    ours_band, theirs_band = _band_spectrum(ours, new_sr, band), _band_spectrum(theirs, new_sr, band)
    assert np.linalg.norm(ours_band - theirs_band) / np.linalg.norm(theirs_band) < 0.02
    # sample by sample: small against the signal away from the edges (filter start-up differs); the rest
    # is the noise between the two filters' pass-band ends (soxr HQ vs torchaudio's 0.99 roll-off)
    interior = slice(100, -100)
    assert np.sqrt(np.mean((ours[interior] - theirs[interior]) ** 2)) < 0.05 * np.sqrt(np.mean(theirs ** 2))
