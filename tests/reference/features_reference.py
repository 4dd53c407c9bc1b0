"""Upstream's feature code on given waveforms (run under REF_PYTHON by tests/test_features_parity.py).

usage: features_reference.py INPUT.npz OUTPUT.npz
INPUT holds `wav16k` (float32 [N]) and `wav24k` (float32 [M]). OUTPUT gets upstream's features computed
exactly as cosyvoice/cli/frontend.py and cosyvoice2.yaml do, plus torchaudio's resampling and the mel
filterbanks of librosa and whisper. Exits 3 when an upstream import fails.
"""
import sys

try:
    import librosa
    import numpy as np
    import torch
    import torchaudio
    import torchaudio.compliance.kaldi as kaldi
    import whisper
    from matcha.utils.audio import mel_spectrogram
except ImportError as error:
    print(f"reference import failed: {error}", file=sys.stderr)
    sys.exit(3)


def main(src: str, dst: str) -> None:
    data = np.load(src)
    wav16k = torch.from_numpy(data["wav16k"])[None, :]
    wav24k = torch.from_numpy(data["wav24k"])[None, :]

    fbank = kaldi.fbank(wav16k, num_mel_bins=80, dither=0, sample_frequency=16000)
    fbank_normalised = fbank - fbank.mean(dim=0, keepdim=True)
    whisper_mel = whisper.log_mel_spectrogram(wav16k, n_mels=128)
    prompt_mel = mel_spectrogram(wav24k, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480,
                                 win_size=1920, fmin=0, fmax=8000, center=False)
    resampled_16_to_24 = torchaudio.transforms.Resample(orig_freq=16000, new_freq=24000)(wav16k)
    resampled_24_to_16 = torchaudio.transforms.Resample(orig_freq=24000, new_freq=16000)(wav24k)

    np.savez(
        dst,
        fbank=fbank.numpy(),
        fbank_normalised=fbank_normalised.numpy(),
        whisper_mel=whisper_mel.numpy(),
        prompt_mel=prompt_mel.numpy(),
        resampled_16_to_24=resampled_16_to_24[0].numpy(),
        resampled_24_to_16=resampled_24_to_16[0].numpy(),
        whisper_filters_128=whisper.audio.mel_filters("cpu", 128).numpy(),
        librosa_mel_24k=librosa.filters.mel(sr=24000, n_fft=1920, n_mels=80, fmin=0, fmax=8000),
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
