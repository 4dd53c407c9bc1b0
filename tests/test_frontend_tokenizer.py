"""tools/tokenizer_dir.py: a trained Qwen2-style tokenizer directory that transformers loads as Qwen2's.

(Equal ids under upstream's transformers 4.51 are checked in test_frontend_text_parity.py.)
"""
import json
import time

import pytest
from transformers import AutoTokenizer

from cosyvoice_tts.engine.frontend import QwenTextTokenizer
from cosyvoice_tts.tools.tokenizer_dir import QWEN2_SPECIAL_TOKENS, write_tokenizer_dir

SAMPLES = [
    "收到好友从远方寄来的生日礼物，那份意外的惊喜让我心中充满了快乐。",
    "Hello, welcome to our text to speech service. It's 9 o'clock!",
    "混合 mixed 文本\n第二行  two spaces 😀 émigré ÅΩ",
]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer") / "CosyVoice-BlankEN"
    started = time.perf_counter()
    size = write_tokenizer_dir(directory)
    return directory, size, time.perf_counter() - started


def test_layout_and_config(written):
    directory, _, seconds = written
    assert sorted(path.name for path in directory.iterdir()) == \
        ["merges.txt", "tokenizer.json", "tokenizer_config.json", "vocab.json"]  # no config.json
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["eos_token"] == config["pad_token"] == "<|endoftext|>" and config["bos_token"] is None
    assert seconds < 5


def test_loads_as_qwen2_with_special_tokens_after_the_bpe_vocabulary(written):
    directory, size, _ = written
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert "Qwen2Tokenizer" in type(tokenizer).__name__
    assert len(tokenizer) == size
    vocab = json.loads((directory / "vocab.json").read_text())
    assert [tokenizer.convert_tokens_to_ids(token) for token in QWEN2_SPECIAL_TOKENS] == \
        list(range(len(vocab), len(vocab) + 3))
    assert tokenizer.eos_token_id == len(vocab)


def test_round_trips_any_text_and_merges_common_words(written):
    directory, _, _ = written
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    for sample in SAMPLES:
        ids = tokenizer(sample)["input_ids"]
        assert tokenizer.decode(ids) == sample
    # trained merges: frequent words are single tokens, far fewer ids than UTF-8 bytes
    assert len(tokenizer(" the")["input_ids"]) == 1
    english = "Hello, welcome to our text to speech service."
    assert len(tokenizer(english)["input_ids"]) < len(english.encode()) / 2
    assert len(tokenizer(SAMPLES[0])["input_ids"]) < len(SAMPLES[0].encode()) * 2 / 3


def test_vocab_size_and_determinism(tmp_path):
    assert write_tokenizer_dir(tmp_path / "a", vocab_size=600) == 600 + len(QWEN2_SPECIAL_TOKENS)
    write_tokenizer_dir(tmp_path / "b", vocab_size=600)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    with pytest.raises(ValueError):
        write_tokenizer_dir(tmp_path / "c", vocab_size=100)


def test_model_config_beside_it_changes_nothing(written, tmp_path):
    directory, _, _ = written
    before = [QwenTextTokenizer(directory).encode(sample) for sample in SAMPLES]
    copy = tmp_path / "with_config"
    copy.mkdir()
    for path in directory.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    (copy / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": 2048}))
    assert [QwenTextTokenizer(copy).encode(sample) for sample in SAMPLES] == before
