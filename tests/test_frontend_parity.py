"""Frontend against upstream's CosyVoiceFrontEnd on the same model directory, mode by mode.

Texts go in already normalised: this reference build's text_normalize needs ttsfrd or WeTextProcessing
(not installed), and with text_frontend=False it returns the text untouched, so both frontends see the
same strings (our normalisation is compared with upstream's post-steps in test_frontend_text_parity.py).

Everything must be equal, bit for bit, except `prompt_speech_feat`: upstream resamples the 16 kHz prompt
to 24 kHz with torchaudio, we with soxr. That is checked twice: our prompt mel of upstream's own 24 kHz
signal must equal upstream's, and our full output must be close (the top mel bins, near the 8 kHz band
edge where the two resampling filters differ, differ most).
Runs tests/reference/frontend_reference.py under REF_PYTHON once for the module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cosyvoice_tts.engine.frontend import Frontend
from cosyvoice_tts.tools.onnx_models import write_campplus, write_speech_tokenizer
from cosyvoice_tts.tools.tokenizer_dir import write_tokenizer_dir

pytestmark = pytest.mark.reference

REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "frontend_reference.py"
IMPORT_FAILED = 3
MODES = ("sft", "zero_shot", "cross_lingual", "instruct2", "voice")
# mel bins below ~7 kHz: there both resampling filters pass the signal unchanged
CLEAN_MEL_BINS = 70

CASE = {
    "spk_id": "speaker_a",
    "tts_text": "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了快乐。[laughter]Hello, world!",
    "prompt_text": "希望你以后能够做的比我还好呦。",
    "instruct_text": "用四川话说这句话",
}


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


def voice_like(sample_rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A glide with harmonics, syllable-like amplitude modulation and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    wav = 0.3 * wav / np.abs(wav).max() + 0.01 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("frontend_parity")
    model_dir = tmp / "model"
    write_tokenizer_dir(model_dir / "CosyVoice-BlankEN")
    write_campplus(model_dir / "campplus.onnx", seed=7)
    write_speech_tokenizer(model_dir / "speech_tokenizer_v2.onnx", seed=8)
    embedding = torch.randn(1, 192, generator=torch.Generator().manual_seed(1))
    torch.save({CASE["spk_id"]: {"embedding": embedding}}, model_dir / "spk2info.pt")
    prompt = voice_like(16000, 3.37)  # not a whole number of frames or tokens
    np.save(tmp / "prompt.npy", prompt)
    (tmp / "case.json").write_text(json.dumps({**CASE, "prompt_wav": str(tmp / "prompt.npy")}, ensure_ascii=False),
                                   encoding="utf-8")
    run_reference(str(model_dir), str(tmp / "case.json"), str(tmp / "ref.pt"))
    reference = torch.load(tmp / "ref.pt", weights_only=True)

    frontend = Frontend(model_dir, "cpu")
    ours = {
        "sft": frontend.frontend_sft(CASE["tts_text"], CASE["spk_id"]),
        "zero_shot": frontend.frontend_zero_shot(CASE["tts_text"], CASE["prompt_text"], prompt, 16000),
        "cross_lingual": frontend.frontend_cross_lingual(CASE["tts_text"], prompt, 16000),
        "instruct2": frontend.frontend_instruct2(CASE["tts_text"], CASE["instruct_text"], prompt, 16000),
        "voice": frontend.make_voice(prompt, 16000, CASE["prompt_text"], text_frontend=False),
    }
    return frontend, ours, reference


@pytest.mark.parametrize("mode", MODES)
def test_mode_inputs_equal_upstream(outputs, mode):
    _, ours, reference = outputs
    assert list(ours[mode]) == list(reference[mode])
    for key, theirs in reference[mode].items():
        mine = ours[mode][key]
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, key
        if key == "prompt_speech_feat":
            continue  # resampler-dependent, see the tests below
        assert torch.equal(mine, theirs), key


def test_prompt_mel_of_upstreams_24k_audio_is_upstreams(outputs):
    frontend, _, reference = outputs
    theirs = reference["zero_shot"]["prompt_speech_feat"]
    mine, _ = frontend._extract_speech_feat(reference["resampled_24k"]["wav"])
    torch.testing.assert_close(mine[:, :theirs.shape[1]], theirs, rtol=0, atol=1e-4)


def test_prompt_mel_is_close_to_upstream_despite_the_other_resampler(outputs):
    _, ours, reference = outputs
    mine, theirs = ours["zero_shot"]["prompt_speech_feat"], reference["zero_shot"]["prompt_speech_feat"]
    difference = (mine - theirs).abs()
    assert float(difference[..., :CLEAN_MEL_BINS].max()) < 0.02  # log-mel units
    assert float(difference.mean()) < 0.05
