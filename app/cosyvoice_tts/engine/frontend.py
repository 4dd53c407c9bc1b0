"""The CosyVoice2 frontend: text tokens, prompt speech tokens, speaker embedding and prompt mel.

A re-implementation of upstream's `cosyvoice.cli.frontend.CosyVoiceFrontEnd` for CosyVoice2 that needs no
torchaudio, whisper or librosa (features come from `features.py`). Its `frontend_*` methods return plain
dicts with upstream's key names, dtypes and shapes, so they can be compared with upstream's one for one:

    text / prompt_text                       int32 [1, N]     text_len / prompt_text_len          int32 [1]
    llm_/flow_prompt_speech_token            int32 [1, P]     ..._len                             int32 [1]
    prompt_speech_feat                       float32 [1, 2P, 80]                 prompt_speech_feat_len int32 [1]
    llm_embedding / flow_embedding           float32 [1, 192]

Differences from upstream, on purpose:
- prompt audio is a float32 numpy waveform at any sample rate; it is resampled with soxr (not torchaudio,
  so the 24 kHz prompt mel is close to upstream's but not bit-equal);
- prompts over 30 s raise `PromptAudioError` instead of failing an assert;
- a cached voice is never modified (upstream's cross-lingual mode deletes the prompt from a registered
  speaker's stored entry), and instruct2 with a cached voice uses the instruction as prompt text (upstream
  silently keeps the voice's transcript there);
- text is a string (upstream also takes a generator of text for bistream; our engine tokenises fragments
  itself with `tokenize`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import onnxruntime
import torch

from . import features
from .text import text_normalize

logger = logging.getLogger(__name__)

PROMPT_SAMPLE_RATE = 16000  # speech tokenizer and campplus
FLOW_SAMPLE_RATE = 24000  # the prompt mel for the flow
MAX_PROMPT_SECONDS = 30.0  # the speech tokenizer's limit (whisper's 30 s window)
MIN_PROMPT_SECONDS = 0.1  # below this the feature frames (25 ms fbank, 40 ms mel padding) do not fit
TOKEN_MEL_RATIO = 2  # CosyVoice2: 25 Hz tokens, 50 Hz mel frames

TOKENIZER_SUBDIR = "CosyVoice-BlankEN"
CAMPPLUS_FILE = "campplus.onnx"
SPEECH_TOKENIZER_FILE = "speech_tokenizer_v2.onnx"
SPK2INFO_FILE = "spk2info.pt"

END_OF_PROMPT = "<|endofprompt|>"

# What upstream's QwenTokenizer adds to the Qwen2 tokenizer (cosyvoice/tokenizer/tokenizer.py). The base
# model never trained these; CosyVoice2 did. The order fixes their ids, so it must not change.
COSYVOICE_SPECIAL_TOKENS = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "additional_special_tokens": [
        "<|im_start|>", "<|im_end|>", END_OF_PROMPT,
        "[breath]", "<strong>", "</strong>", "[noise]",
        "[laughter]", "[cough]", "[clucking]", "[accent]",
        "[quick_breath]",
        "<laughter>", "</laughter>",
        "[hissing]", "[sigh]", "[vocalized-noise]",
        "[lipsmack]", "[mn]",
    ],
}

# keys of a zero-shot voice (what `make_voice` returns), in upstream's order
VOICE_KEYS = (
    "prompt_text", "prompt_text_len",
    "llm_prompt_speech_token", "llm_prompt_speech_token_len",
    "flow_prompt_speech_token", "flow_prompt_speech_token_len",
    "prompt_speech_feat", "prompt_speech_feat_len",
    "llm_embedding", "flow_embedding",
)


class PromptAudioError(ValueError):
    """The prompt audio cannot be used (too long, empty, not mono, bad sample rate)."""


class QwenTextTokenizer:
    """Upstream's `QwenTokenizer`: the Qwen2 tokenizer from `CosyVoice-BlankEN` plus CosyVoice's special tokens."""

    def __init__(self, tokenizer_dir: str | Path, skip_special_tokens: bool = True):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.tokenizer.add_special_tokens(COSYVOICE_SPECIAL_TOKENS)
        self.skip_special_tokens = skip_special_tokens

    def encode(self, text: str) -> list[int]:
        # Qwen2 adds no BOS/EOS, so these are exactly the text's tokens.
        return self.tokenizer([text])["input_ids"][0]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.batch_decode([list(tokens)], skip_special_tokens=self.skip_special_tokens)[0]

    def __len__(self) -> int:
        return len(self.tokenizer)


def _session_options() -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    # as upstream: one thread per session, the engine runs several things at once
    options.intra_op_num_threads = 1
    return options


def _speech_tokenizer_providers(device: torch.device) -> list:
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _open_speech_tokenizer(path: Path, device: torch.device) -> onnxruntime.InferenceSession:
    providers = _speech_tokenizer_providers(device)
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=_session_options(), providers=providers)
    except Exception as error:  # a CUDA provider that is listed but cannot start (missing libraries)
        if providers == ["CPUExecutionProvider"]:
            raise
        logger.warning("speech tokenizer: CUDA provider failed (%s); using the CPU", error)
        return onnxruntime.InferenceSession(str(path), sess_options=_session_options(),
                                            providers=["CPUExecutionProvider"])


def _refuse_long_prompt(seconds: float) -> None:
    if seconds > MAX_PROMPT_SECONDS:
        raise PromptAudioError(f"prompt audio is {seconds:.1f} s long; "
                               f"the speech tokenizer accepts at most {MAX_PROMPT_SECONDS:.0f} s")


def _int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


class Frontend:
    """Builds the model inputs of every CosyVoice2 mode from text and prompt audio (see the module doc)."""

    def __init__(self, model_dir: str | Path, device: str | torch.device = "cpu"):
        model_dir = Path(model_dir)
        self.model_dir = model_dir
        self.device = torch.device(device)
        self.tokenizer = QwenTextTokenizer(model_dir / TOKENIZER_SUBDIR)
        self.campplus_session = onnxruntime.InferenceSession(
            str(model_dir / CAMPPLUS_FILE), sess_options=_session_options(), providers=["CPUExecutionProvider"])
        self.speech_tokenizer_session = _open_speech_tokenizer(model_dir / SPEECH_TOKENIZER_FILE, self.device)
        spk2info_path = model_dir / SPK2INFO_FILE
        # speaker entries (`embedding`) and, as upstream stores them, registered zero-shot voices
        self.spk2info: dict[str, dict] = (
            torch.load(spk2info_path, map_location=self.device, weights_only=True) if spk2info_path.exists() else {})

    # ---- text ------------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def text_normalize(self, text: str, split: bool = True, text_frontend: bool = True) -> list[str] | str:
        """Upstream's text_normalize (see `text.text_normalize`), counting English lengths in our tokens."""
        return text_normalize(text, self.tokenize, split=split, text_frontend=text_frontend)

    def _extract_text_token(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenize(text)
        return _int32([tokens]).reshape(1, len(tokens)).to(self.device), _int32([len(tokens)]).to(self.device)

    # ---- prompt audio ----------------------------------------------------------------------------------

    def prepare_prompt_audio(self, wav: np.ndarray, sample_rate: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono float waveform at any rate -> ([1, N] at 16 kHz, [1, M] at 24 kHz) CPU float32 tensors.

        The 24 kHz signal is made from the 16 kHz one, as upstream does (it loads prompts at 16 kHz and
        resamples those to 24 kHz): the prompt mel then has the same band limit and frame count as upstream's.
        """
        wav = np.asarray(wav, dtype=np.float32)
        if wav.ndim == 2 and wav.shape[0] == 1:
            wav = wav[0]
        if wav.ndim != 1:
            raise PromptAudioError(f"prompt audio must be mono [samples], got shape {wav.shape}")
        if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
            raise PromptAudioError(f"invalid prompt sample rate {sample_rate!r}")
        if wav.size == 0:
            raise PromptAudioError("prompt audio is empty")
        if wav.size / sample_rate < MIN_PROMPT_SECONDS:
            raise PromptAudioError(f"prompt audio is {1000 * wav.size / sample_rate:.0f} ms long; "
                                   f"at least {MIN_PROMPT_SECONDS:.1f} s is needed")
        if not np.all(np.isfinite(wav)):
            raise PromptAudioError("prompt audio contains NaN or infinite samples")
        _refuse_long_prompt(wav.size / sample_rate)
        wav_16k = features.resample(wav, int(sample_rate), PROMPT_SAMPLE_RATE)
        wav_24k = features.resample(wav_16k, PROMPT_SAMPLE_RATE, FLOW_SAMPLE_RATE)
        return torch.from_numpy(wav_16k)[None, :], torch.from_numpy(wav_24k)[None, :]

    def _extract_speech_token(self, speech_16k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt speech tokens [1, P] int32 from 16 kHz audio [1, N] (whisper log-mel -> speech tokenizer)."""
        _refuse_long_prompt(speech_16k.shape[-1] / PROMPT_SAMPLE_RATE)
        feat = features.whisper_log_mel(speech_16k.cpu(), n_mels=128)[None]  # [1, 128, T]
        inputs = self.speech_tokenizer_session.get_inputs()  # fed by position, as upstream does
        tokens = self.speech_tokenizer_session.run(None, {
            inputs[0].name: feat.numpy(),
            inputs[1].name: np.array([feat.shape[2]], dtype=np.int32),
        })[0].reshape(-1)
        speech_token = torch.from_numpy(tokens.astype(np.int32))[None, :].to(self.device)
        return speech_token, _int32([speech_token.shape[1]]).to(self.device)

    def _extract_spk_embedding(self, speech_16k: torch.Tensor) -> torch.Tensor:
        """Speaker embedding [1, 192] float32 from 16 kHz audio (mean-normalised fbank -> campplus)."""
        feat = features.campplus_fbank(speech_16k.cpu())
        inputs = self.campplus_session.get_inputs()
        embedding = self.campplus_session.run(None, {inputs[0].name: feat[None].numpy()})[0].reshape(1, -1)
        return torch.from_numpy(embedding.astype(np.float32)).to(self.device)

    def _extract_speech_feat(self, speech_24k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt mel [1, T, 80] float32 from 24 kHz audio (matcha mel with cosyvoice2.yaml's settings)."""
        feat = features.matcha_mel(speech_24k.cpu())[0].transpose(0, 1)[None].contiguous().to(self.device)
        return feat, _int32([feat.shape[1]]).to(self.device)

    def _prompt_features(self, prompt_wav: np.ndarray, sample_rate: int) -> dict[str, torch.Tensor]:
        speech_16k, speech_24k = self.prepare_prompt_audio(prompt_wav, sample_rate)
        speech_feat, _ = self._extract_speech_feat(speech_24k)
        speech_token, _ = self._extract_speech_token(speech_16k)
        # CosyVoice2: the flow needs exactly 2 mel frames per prompt token, so cut both to the shorter
        token_len = min(speech_feat.shape[1] // TOKEN_MEL_RATIO, speech_token.shape[1])
        speech_feat = speech_feat[:, :TOKEN_MEL_RATIO * token_len].contiguous()
        speech_token = speech_token[:, :token_len].contiguous()
        embedding = self._extract_spk_embedding(speech_16k)
        return {
            "speech_token": speech_token,
            "speech_token_len": _int32([token_len]).to(self.device),
            "speech_feat": speech_feat,
            "speech_feat_len": _int32([TOKEN_MEL_RATIO * token_len]).to(self.device),
            "embedding": embedding,
        }

    # ---- voices ----------------------------------------------------------------------------------------

    def make_voice(self, prompt_wav: np.ndarray, sample_rate: int, prompt_text: str,
                   text_frontend: bool = True) -> dict[str, torch.Tensor]:
        """The features of a zero-shot voice (VOICE_KEYS), to store and reuse by id.

        Equal to upstream's `add_zero_shot_spk` entry, except that the prompt text is normalised first
        (text_frontend=True) as upstream's `inference_zero_shot` does for a prompt given with each request,
        so a registered voice behaves like the same prompt given inline.
        """
        prompt_text = self.text_normalize(prompt_text, split=False, text_frontend=text_frontend)
        prompt = self._prompt_features(prompt_wav, sample_rate)
        prompt_text_token, prompt_text_len = self._extract_text_token(prompt_text)
        return {
            "prompt_text": prompt_text_token, "prompt_text_len": prompt_text_len,
            "llm_prompt_speech_token": prompt["speech_token"],
            "llm_prompt_speech_token_len": prompt["speech_token_len"],
            "flow_prompt_speech_token": prompt["speech_token"],
            "flow_prompt_speech_token_len": prompt["speech_token_len"],
            "prompt_speech_feat": prompt["speech_feat"], "prompt_speech_feat_len": prompt["speech_feat_len"],
            "llm_embedding": prompt["embedding"], "flow_embedding": prompt["embedding"],
        }

    def add_voice(self, voice_id: str, voice: Mapping[str, torch.Tensor]) -> None:
        """Keep a voice made by `make_voice` under an id (as upstream's add_zero_shot_spk stores it in spk2info)."""
        if not voice_id:
            raise ValueError("a voice id must not be empty")
        missing = [key for key in VOICE_KEYS if key not in voice]
        if missing:
            raise ValueError(f"voice {voice_id!r} lacks {', '.join(missing)}")
        self.spk2info[voice_id] = {key: voice[key].to(self.device) for key in VOICE_KEYS}

    def voices(self) -> list[str]:
        return list(self.spk2info)

    def _voice(self, voice: str | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A shallow copy of a stored voice (by id) or of a voice dict, safe to add keys to or delete from."""
        if isinstance(voice, str):
            if voice not in self.spk2info:
                raise KeyError(f"unknown voice {voice!r}")
            voice = self.spk2info[voice]
        return dict(voice)

    # ---- the modes -------------------------------------------------------------------------------------

    def frontend_sft(self, tts_text: str, spk_id: str) -> dict[str, torch.Tensor]:
        text, text_len = self._extract_text_token(tts_text)
        speaker = self._voice(spk_id)
        if "embedding" not in speaker:
            raise KeyError(f"voice {spk_id!r} has no speaker embedding for sft (it is a zero-shot voice)")
        embedding = speaker["embedding"]
        return {"text": text, "text_len": text_len, "llm_embedding": embedding, "flow_embedding": embedding}

    def frontend_zero_shot(self, tts_text: str, prompt_text: str, prompt_wav: np.ndarray | None = None,
                           sample_rate: int | None = None,
                           voice: str | Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Zero-shot inputs from prompt audio + its transcript, or from a cached `voice` (then both are ignored).

        prompt_text is used as given (already normalised), like upstream's frontend_zero_shot.
        """
        if voice is not None:
            model_input = self._voice(voice)
        else:
            if prompt_wav is None or sample_rate is None:
                raise ValueError("zero-shot needs prompt_wav and sample_rate, or a cached voice")
            prompt = self._prompt_features(prompt_wav, sample_rate)
            prompt_text_token, prompt_text_len = self._extract_text_token(prompt_text)
            model_input = {
                "prompt_text": prompt_text_token, "prompt_text_len": prompt_text_len,
                "llm_prompt_speech_token": prompt["speech_token"],
                "llm_prompt_speech_token_len": prompt["speech_token_len"],
                "flow_prompt_speech_token": prompt["speech_token"],
                "flow_prompt_speech_token_len": prompt["speech_token_len"],
                "prompt_speech_feat": prompt["speech_feat"], "prompt_speech_feat_len": prompt["speech_feat_len"],
                "llm_embedding": prompt["embedding"], "flow_embedding": prompt["embedding"],
            }
        model_input["text"], model_input["text_len"] = self._extract_text_token(tts_text)
        return model_input

    def frontend_cross_lingual(self, tts_text: str, prompt_wav: np.ndarray | None = None,
                               sample_rate: int | None = None,
                               voice: str | Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Like zero-shot, but the LM gets neither the prompt text nor the prompt speech tokens."""
        model_input = self.frontend_zero_shot(tts_text, "", prompt_wav, sample_rate, voice)
        for key in ("prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len"):
            del model_input[key]
        return model_input

    def frontend_instruct2(self, tts_text: str, instruct_text: str, prompt_wav: np.ndarray | None = None,
                           sample_rate: int | None = None,
                           voice: str | Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The instruction (+ <|endofprompt|>) is the LM's prompt text; the LM gets no prompt speech tokens."""
        instruction = instruct_text + END_OF_PROMPT
        model_input = self.frontend_zero_shot(tts_text, instruction, prompt_wav, sample_rate, voice)
        if voice is not None:
            model_input["prompt_text"], model_input["prompt_text_len"] = self._extract_text_token(instruction)
        del model_input["llm_prompt_speech_token"]
        del model_input["llm_prompt_speech_token_len"]
        return model_input
