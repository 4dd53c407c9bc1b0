"""Upstream's CosyVoiceFrontEnd on a model directory (run under REF_PYTHON by tests/test_frontend_parity.py).

usage: frontend_reference.py MODEL_DIR CASE.json OUTPUT.pt
CASE.json: {"prompt_wav": path of a float32 .npy at 16 kHz, "spk_id", "tts_text", "prompt_text",
"instruct_text"}. Texts are passed already normalised: this build's text_normalize needs ttsfrd or
WeTextProcessing, which the reference env lacks (with text_frontend=False it returns the text untouched).
OUTPUT gets each mode's model_input, the registered-voice entry and torchaudio's 24 kHz resample.
Exits 3 when an upstream import fails.
"""
import json
import sys
from functools import partial

try:
    import numpy as np
    import torch
    import torchaudio
    from cosyvoice.cli.frontend import CosyVoiceFrontEnd
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer
    from matcha.utils.audio import mel_spectrogram
except ImportError as error:
    print(f"reference import failed: {error}", file=sys.stderr)
    sys.exit(3)


def main(model_dir: str, case_path: str, out_path: str) -> None:
    with open(case_path, encoding="utf-8") as f:
        case = json.load(f)
    # what cosyvoice2.yaml wires in as get_tokenizer / feat_extractor / allowed_special
    frontend = CosyVoiceFrontEnd(
        partial(get_qwen_tokenizer, token_path=f"{model_dir}/CosyVoice-BlankEN", skip_special_tokens=True),
        partial(mel_spectrogram, n_fft=1920, num_mels=80, sampling_rate=24000, hop_size=480, win_size=1920,
                fmin=0, fmax=8000, center=False),
        f"{model_dir}/campplus.onnx", f"{model_dir}/speech_tokenizer_v2.onnx", f"{model_dir}/spk2info.pt", "all")
    prompt_16k = torch.from_numpy(np.load(case["prompt_wav"]))[None, :]
    tts_text, prompt_text = case["tts_text"], case["prompt_text"]

    passthrough = frontend.text_normalize(tts_text, split=True, text_frontend=False)
    assert passthrough == [tts_text], passthrough

    voice = frontend.frontend_zero_shot("", prompt_text, prompt_16k, 24000, "")  # as add_zero_shot_spk
    del voice["text"], voice["text_len"]
    outputs = {
        "sft": frontend.frontend_sft(tts_text, case["spk_id"]),
        "zero_shot": frontend.frontend_zero_shot(tts_text, prompt_text, prompt_16k, 24000, ""),
        "cross_lingual": frontend.frontend_cross_lingual(tts_text, prompt_16k, 24000, ""),
        "instruct2": frontend.frontend_instruct2(tts_text, case["instruct_text"], prompt_16k, 24000, ""),
        "voice": voice,
        "resampled_24k": {"wav": torchaudio.transforms.Resample(orig_freq=16000, new_freq=24000)(prompt_16k)},
        "text_tokens": {"tts_text": torch.tensor(frontend.tokenizer.encode(tts_text))},
    }
    torch.save(outputs, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
