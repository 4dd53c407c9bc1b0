"""Unit tests of engine/features.py: shapes, frame counts and spectral placement (no reference env needed)."""
import numpy as np
import pytest
import torch

from cosyvoice_tts.engine import features


def tone(freq_hz: float, sample_rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def dominant_frequency(wav: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / sample_rate)[spectrum.argmax()])


# ---- kaldi fbank -------------------------------------------------------------------------------------


def test_kaldi_fbank_frame_count_and_shape():
    wav = tone(440, 16000, 1.0)
    feat = features.kaldi_fbank(torch.from_numpy(wav))
    # snip_edges: 1 + (16000 - 400) // 160 whole 25 ms frames every 10 ms
    assert feat.shape == (98, 80) and feat.dtype == torch.float32


def test_kaldi_fbank_peaks_in_the_mel_bin_of_the_tone():
    banks = features.kaldi_mel_banks(80, 512, 16000.0)
    for freq in (300.0, 1000.0, 4000.0):
        feat = features.kaldi_fbank(torch.from_numpy(tone(freq, 16000, 0.5)))
        fft_bin = round(freq / 16000 * 512)
        expected = int(banks[:, fft_bin].argmax())
        assert abs(int(feat.mean(0).argmax()) - expected) <= 1


def test_kaldi_mel_banks_are_triangles_up_to_nyquist():
    banks = features.kaldi_mel_banks(80, 512, 16000.0)
    assert banks.shape == (80, 257)
    assert torch.all(banks[:, -1] == 0)  # Kaldi leaves the Nyquist bin out
    assert torch.all(banks[:, 0] == 0)  # DC lies below low_freq = 20 Hz
    assert float(banks.max()) <= 1.0 and float(banks.min()) == 0.0
    centres = banks.argmax(dim=1)
    assert torch.all(centres[1:] >= centres[:-1])


def test_campplus_fbank_is_mean_normalised_over_time():
    wav = tone(220, 16000, 1.0) + tone(3000, 16000, 1.0, 0.1)
    feat = features.campplus_fbank(torch.from_numpy(wav)[None])
    assert feat.shape == (98, 80)
    assert torch.allclose(feat.mean(dim=0), torch.zeros(80), atol=1e-4)


def test_kaldi_fbank_rejects_audio_shorter_than_a_frame():
    with pytest.raises(ValueError, match="too short"):
        features.kaldi_fbank(torch.zeros(399))


# ---- slaney filterbank -------------------------------------------------------------------------------


def test_slaney_hz_mel_round_trip_and_breakpoint():
    hz = np.array([0.0, 200.0, 999.0, 1000.0, 4000.0, 8000.0])
    assert np.allclose(features.slaney_mel_to_hz(features.slaney_hz_to_mel(hz)), hz)
    assert features.slaney_hz_to_mel(np.array(1000.0)) == pytest.approx(15.0)  # 1 kHz / (200/3 Hz per mel)


def test_slaney_filterbank_has_unit_area_triangles():
    filters = features.slaney_mel_filterbank(24000, 1920, 80, 0.0, 8000.0)
    assert filters.shape == (80, 961) and filters.dtype == np.float32
    # slaney normalisation: peak height 2 / (bandwidth in Hz), so each triangle's area in Hz is 1
    bin_hz = 24000 / 1920
    areas = filters.sum(axis=1) * bin_hz
    assert np.allclose(areas[5:], 1.0, rtol=0.05)  # the narrowest low filters are coarsely sampled
    assert np.all(filters[:, np.fft.rfftfreq(1920, 1 / 24000) > 8000] == 0)


# ---- whisper log-mel ---------------------------------------------------------------------------------


def test_whisper_log_mel_frames_and_range():
    wav = tone(500, 16000, 1.234)
    mel = features.whisper_log_mel(torch.from_numpy(wav))
    assert mel.shape == (128, len(wav) // 160)
    # (log10 + 4) / 4 with an 8 (= 80 dB) floor below the maximum: values span at most 2
    assert float(mel.max() - mel.min()) <= 2.0 + 1e-6


def test_whisper_log_mel_places_a_tone_in_the_right_bin():
    filters = features.slaney_mel_filterbank(16000, 400, 128)
    mel = features.whisper_log_mel(torch.from_numpy(tone(2000, 16000, 0.5)))
    expected = int(filters[:, round(2000 / 16000 * 400)].argmax())
    assert abs(int(mel.mean(1).argmax()) - expected) <= 1


# ---- matcha mel --------------------------------------------------------------------------------------


def test_matcha_mel_frame_count_and_shape():
    wav = tone(300, 24000, 1.0)
    mel = features.matcha_mel(torch.from_numpy(wav)[None])
    assert mel.shape == (1, 80, 24000 // 480)


def test_matcha_mel_of_silence_is_the_log_floor():
    mel = features.matcha_mel(torch.zeros(24000))
    # sqrt(1e-9) magnitude through unit-area filters stays below the 1e-5 clamp
    assert torch.allclose(mel, torch.full_like(mel, np.log(1e-5)))


# ---- resampling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("orig_sr,new_sr", [(16000, 24000), (24000, 16000), (44100, 16000), (8000, 16000)])
def test_resample_keeps_torchaudio_length_and_the_tone(orig_sr, new_sr):
    wav = tone(1000, orig_sr, 0.777)
    out = features.resample(wav, orig_sr, new_sr)
    assert out.dtype == np.float32 and len(out) == -(-len(wav) * new_sr // orig_sr)
    assert dominant_frequency(out, new_sr) == pytest.approx(1000, abs=new_sr / len(out) * 1.5)
    assert np.sqrt(np.mean(out[200:-200] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resample_same_rate_is_a_copy_and_rejects_stereo():
    wav = tone(100, 16000, 0.1)
    out = features.resample(wav, 16000, 16000)
    assert np.array_equal(out, wav) and out is not wav
    with pytest.raises(ValueError, match="mono"):
        features.resample(np.zeros((2, 100), np.float32), 16000, 24000)


def test_mono_input_shapes_are_checked():
    with pytest.raises(ValueError, match="mono"):
        features.whisper_log_mel(torch.zeros(2, 16000))
