"""Unit tests of engine/frontend.py on a tiny model directory (stand-in ONNX models, trained small tokenizer)."""
import numpy as np
import pytest
import torch

from cosyvoice_tts.engine.frontend import (COSYVOICE_SPECIAL_TOKENS, END_OF_PROMPT, VOICE_KEYS, Frontend,
                                           PromptAudioError)
from cosyvoice_tts.tools.onnx_models import write_campplus, write_speech_tokenizer
from cosyvoice_tts.tools.tokenizer_dir import write_tokenizer_dir

ZERO_SHOT_KEYS = list(VOICE_KEYS) + ["text", "text_len"]


def voice_like(sample_rate: int, seconds: float, seed: int = 0) -> np.ndarray:
    """A glide with harmonics, syllable-like amplitude modulation and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 0.7 * t)) / sample_rate
    wav = sum(np.sin(k * phase) / k for k in range(1, 30)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) ** 2
    wav = 0.3 * wav / np.abs(wav).max() + 0.01 * rng.standard_normal(len(t))
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("frontend_model")
    write_tokenizer_dir(directory / "CosyVoice-BlankEN")
    write_campplus(directory / "campplus.onnx", seed=3)
    write_speech_tokenizer(directory / "speech_tokenizer_v2.onnx", seed=4)
    embedding = torch.randn(1, 192, generator=torch.Generator().manual_seed(0))
    torch.save({"speaker_a": {"embedding": embedding}}, directory / "spk2info.pt")
    return directory


@pytest.fixture(scope="module")
def frontend(model_dir):
    return Frontend(model_dir, "cpu")


@pytest.fixture(scope="module")
def prompt():
    return voice_like(16000, 2.5)


def assert_int32_ids(tokens, lengths):
    assert tokens.dtype == torch.int32 and lengths.dtype == torch.int32
    assert tokens.dim() == 2 and tokens.shape[0] == 1 and lengths.tolist() == [tokens.shape[1]]


def test_special_tokens_are_single_distinct_ids(frontend):
    specials = COSYVOICE_SPECIAL_TOKENS["additional_special_tokens"]
    ids = [frontend.tokenize(token) for token in specials]
    assert all(len(token_ids) == 1 for token_ids in ids)
    assert len({token_ids[0] for token_ids in ids}) == len(specials)
    assert frontend.tokenizer.decode(frontend.tokenize("你好" + END_OF_PROMPT)) == "你好"


def test_sft_inputs(frontend, model_dir):
    model_input = frontend.frontend_sft("今天天气很好。", "speaker_a")
    assert list(model_input) == ["text", "text_len", "llm_embedding", "flow_embedding"]
    assert_int32_ids(model_input["text"], model_input["text_len"])
    assert model_input["text"][0].tolist() == frontend.tokenize("今天天气很好。")
    expected = torch.load(model_dir / "spk2info.pt")["speaker_a"]["embedding"]
    assert torch.equal(model_input["llm_embedding"], expected) and torch.equal(model_input["flow_embedding"], expected)


def test_zero_shot_inputs_have_upstream_keys_dtypes_and_shapes(frontend, prompt):
    model_input = frontend.frontend_zero_shot("Nice to meet you.", "希望你以后能够做的比我还好呦。", prompt, 16000)
    assert list(model_input) == ZERO_SHOT_KEYS
    assert_int32_ids(model_input["text"], model_input["text_len"])
    assert_int32_ids(model_input["prompt_text"], model_input["prompt_text_len"])
    assert_int32_ids(model_input["llm_prompt_speech_token"], model_input["llm_prompt_speech_token_len"])
    assert torch.equal(model_input["llm_prompt_speech_token"], model_input["flow_prompt_speech_token"])
    tokens = model_input["flow_prompt_speech_token"]
    assert 0 <= int(tokens.min()) and int(tokens.max()) < 6561
    feat = model_input["prompt_speech_feat"]
    assert feat.dtype == torch.float32 and feat.shape == (1, 2 * tokens.shape[1], 80)
    assert model_input["prompt_speech_feat_len"].tolist() == [feat.shape[1]]
    assert model_input["llm_embedding"].shape == (1, 192) and model_input["llm_embedding"].dtype == torch.float32
    assert torch.equal(model_input["llm_embedding"], model_input["flow_embedding"])


def test_prompt_tokens_and_mel_are_cut_to_two_frames_per_token(frontend):
    # 32,300 samples: 201 whisper frames -> 51 tokens, but 48,450 samples at 24 kHz -> 100 mel frames,
    # so both are cut to 50 tokens / 100 frames
    model_input = frontend.frontend_zero_shot("好", "好", voice_like(16000, 32300 / 16000), 16000)
    assert model_input["flow_prompt_speech_token_len"].tolist() == [50]
    assert model_input["prompt_speech_feat"].shape == (1, 100, 80)
    speech_16k, _ = frontend.prepare_prompt_audio(voice_like(16000, 32300 / 16000), 16000)
    uncut, _ = frontend._extract_speech_token(speech_16k)
    assert uncut.shape[1] == 51 and torch.equal(uncut[:, :50], model_input["flow_prompt_speech_token"])


def test_prompt_at_another_sample_rate_is_resampled(frontend, prompt):
    at_16k = frontend.frontend_zero_shot("好", "好", prompt, 16000)
    at_44k = frontend.frontend_zero_shot("好", "好", voice_like(44100, 2.5), 44100)
    assert at_44k["flow_prompt_speech_token_len"] == at_16k["flow_prompt_speech_token_len"]
    assert at_44k["prompt_speech_feat"].shape == at_16k["prompt_speech_feat"].shape
    cosine = torch.nn.functional.cosine_similarity(at_44k["flow_embedding"], at_16k["flow_embedding"])
    assert float(cosine) > 0.99


def test_prompts_over_30_seconds_are_refused(frontend):
    with pytest.raises(PromptAudioError, match="at most 30 s"):
        frontend.frontend_zero_shot("好", "好", np.zeros(int(30.5 * 22050), np.float32), 22050)
    with pytest.raises(PromptAudioError, match="at most 30 s"):
        frontend._extract_speech_token(torch.zeros(1, 16000 * 31))


@pytest.mark.parametrize("wav,sample_rate,message", [
    (np.zeros((2, 16000), np.float32), 16000, "mono"),
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.zeros(800, np.float32), 16000, "at least 0.1 s"),
    (np.full(16000, np.nan, np.float32), 16000, "NaN"),
    (np.zeros(16000, np.float32), 0, "sample rate"),
])
def test_unusable_prompt_audio_is_refused(frontend, wav, sample_rate, message):
    with pytest.raises(PromptAudioError, match=message):
        frontend.make_voice(wav, sample_rate, "你好")


def test_cross_lingual_and_instruct2_drop_the_llm_prompt(frontend, prompt):
    cross = frontend.frontend_cross_lingual("Hello there.", prompt, 16000)
    assert list(cross) == [key for key in ZERO_SHOT_KEYS if key not in
                           ("prompt_text", "prompt_text_len", "llm_prompt_speech_token", "llm_prompt_speech_token_len")]
    instruct = frontend.frontend_instruct2("你好。", "用四川话说这句话", prompt, 16000)
    assert "llm_prompt_speech_token" not in instruct and "prompt_text" in instruct
    assert instruct["prompt_text"][0].tolist() == frontend.tokenize("用四川话说这句话" + END_OF_PROMPT)


def test_registered_voice_gives_the_inline_inputs(frontend, prompt):
    voice = frontend.make_voice(prompt, 16000, "我有3个苹果。")
    assert list(voice) == list(VOICE_KEYS)
    # the prompt text was normalised as upstream's inference_zero_shot normalises an inline prompt
    assert voice["prompt_text"][0].tolist() == frontend.tokenize("我有三个苹果。")
    inline = frontend.frontend_zero_shot("好的。", "我有三个苹果。", prompt, 16000)
    frontend.add_voice("my_voice", voice)
    assert "my_voice" in frontend.voices() and "speaker_a" in frontend.voices()
    cached = frontend.frontend_zero_shot("好的。", "ignored", voice="my_voice")
    assert list(cached) == list(inline)
    for key in inline:
        assert torch.equal(cached[key], inline[key]), key


def test_cached_voice_survives_cross_lingual_and_instruct2(frontend, prompt):
    frontend.add_voice("kept", frontend.make_voice(prompt, 16000, "你好。"))
    frontend.frontend_cross_lingual("Hello.", voice="kept")
    instruct = frontend.frontend_instruct2("你好。", "说得慢一点", voice="kept")
    assert list(frontend.spk2info["kept"]) == list(VOICE_KEYS)
    # the instruction, not the voice's transcript, is the LM prompt
    assert instruct["prompt_text"][0].tolist() == frontend.tokenize("说得慢一点" + END_OF_PROMPT)
    assert "llm_prompt_speech_token" not in instruct


def test_voice_survives_a_save_and_load(frontend, prompt, tmp_path):
    voice = frontend.make_voice(prompt, 16000, "你好。")
    torch.save(voice, tmp_path / "voice.pt")
    loaded = torch.load(tmp_path / "voice.pt", weights_only=True)
    model_input = frontend.frontend_zero_shot("再见。", "", voice=loaded)
    assert torch.equal(model_input["flow_prompt_speech_token"], voice["flow_prompt_speech_token"])


def test_unknown_or_wrong_kind_of_voice(frontend, prompt):
    with pytest.raises(KeyError, match="unknown voice"):
        frontend.frontend_sft("你好", "nobody")
    frontend.add_voice("zero_shot_only", frontend.make_voice(prompt, 16000, "你好。"))
    with pytest.raises(KeyError, match="no speaker embedding"):
        frontend.frontend_sft("你好", "zero_shot_only")
    with pytest.raises(ValueError, match="lacks"):
        frontend.add_voice("broken", {"prompt_text": torch.zeros(1, 1, dtype=torch.int32)})


def test_text_normalize_counts_english_in_tokens(frontend):
    pieces = frontend.text_normalize("I have 3 apples. " * 40)
    assert len(pieces) > 1
    assert all(len(frontend.tokenize(piece)) <= 80 for piece in pieces[:-1])
    assert frontend.text_normalize("我有3个苹果", split=False) == "我有三个苹果"
