"""Request texts normalised in a worker process (engine/text_worker.py): the same pieces as in the engine's
process, errors answered per text, and the engine's own normalisation once the worker is gone."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from cosyvoice_tts.engine.frontend import TOKENIZER_SUBDIR, QwenTextTokenizer
from cosyvoice_tts.engine.text import text_normalize
from cosyvoice_tts.engine.text_worker import READY, TextNormalizer, serve

TEXTS = ["Thanks for calling, your order of 3 items has shipped today!", "今天是2024年3月5日，气温25度。", "Hi."]


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir) -> Path:
    return Path(tiny_model_dir) / TOKENIZER_SUBDIR


@pytest.fixture(scope="module")
def in_process(tokenizer_dir):
    tokenizer = QwenTextTokenizer(tokenizer_dir)
    return lambda text: text_normalize(text, tokenizer.encode, split=True)


def test_the_worker_answers_what_the_engine_process_would(tokenizer_dir, in_process):
    normalizer = TextNormalizer(tokenizer_dir, fallback=lambda text: pytest.fail("the worker should answer"))
    try:
        normalizer.warm()
        for text in TEXTS:
            assert normalizer.normalize(text) == in_process(text)
    finally:
        normalizer.close()


def test_once_the_worker_is_gone_the_engine_process_normalises(tokenizer_dir, in_process):
    calls = []
    normalizer = TextNormalizer(tokenizer_dir, fallback=lambda text: calls.append(text) or in_process(text))
    try:
        normalizer.warm()
        normalizer._process.kill()
        normalizer._process.wait()
        assert normalizer.normalize(TEXTS[0]) == in_process(TEXTS[0]) and calls == [TEXTS[0]]
        assert normalizer.normalize(TEXTS[1]) == in_process(TEXTS[1]) and len(calls) == 2
    finally:
        normalizer.close()


def test_the_worker_answers_a_failing_text_with_its_error_and_goes_on(tokenizer_dir, in_process):
    lines = [json.dumps(TEXTS[0]), json.dumps(None), json.dumps(TEXTS[2])]  # None: not a text
    out = io.StringIO()
    serve(str(tokenizer_dir), io.StringIO("\n".join(lines) + "\n"), out)
    ready, *answers = out.getvalue().splitlines()
    first, failed, last = map(json.loads, answers)
    assert ready == READY and first == {"pieces": in_process(TEXTS[0])} and last == {"pieces": in_process(TEXTS[2])}
    assert "error" in failed


def test_an_engine_with_the_worker_synthesises(tiny_model_dir):
    from cosyvoice_tts.engine import Engine, SynthesisParams

    engine = Engine.load(tiny_model_dir, max_sessions=2, text_worker=True)
    engine.start()
    try:
        assert engine.text_normalizer is not None
        request = engine.submit(SynthesisParams(voice=engine.voices()[0], seed=3), text=TEXTS[0])
        audio = sum(chunk.size for chunk in request)
        assert request.stats.outcome == "ok" and audio > 0
    finally:
        engine.shutdown()
    assert engine.text_normalizer is None
