"""Text side of the frontend against upstream: the post-TN steps, the splitter and the tokenizer ids.

Upstream's TN model (ttsfrd / WeTextProcessing) is not in the reference env, so wetext's output (computed
here) goes to both sides; everything after TN is compared. The tokenizer directory written by
tools/tokenizer_dir.py is loaded by upstream's QwenTokenizer (transformers 4.51) and by ours (5.x).
Runs tests/reference/frontend_text_reference.py under REF_PYTHON once for the module.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosyvoice_tts.engine import text
from cosyvoice_tts.engine.frontend import QwenTextTokenizer
from cosyvoice_tts.tools.tokenizer_dir import write_tokenizer_dir

pytestmark = pytest.mark.reference

REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "frontend_text_reference.py"
IMPORT_FAILED = 3

CHINESE = [
    "今天是2024年3月5日，气温25.5度，我们去公园散步吧,",
    "房间面积是10m²，这是【重点】（注释）内容——请注意。他用的是Python.很好用 - 真的",
    "他说：“我一定会按时完成任务的！”然后就走了。你好 世界 hello world",
    # a paragraph long enough to be split (character counts)
    "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。"
    "笑容如花儿般绽放，我立刻给她打了一个电话表示感谢。我们聊了很久，从小时候的趣事一直说到最近的工作和生活。"
    "挂上电话以后，我把礼物小心地放在书桌上，每天都能看到它。这份友谊跨越了千山万水，依然温暖如初。谢谢你。",
    "……",
]
ENGLISH = [
    "I have 3 apples and 12 oranges",
    'He said, "I\'ll finish the report by Friday." Then he left!',
    # long enough to be split by token counts
    " ".join(["The quick brown fox jumps over the lazy dog near the quiet river bank today."] * 10)
    + " Thank you for listening; see you next time: goodbye.",
]
ENCODE = [
    "你好，世界！Hello world.",
    "用四川话说这句话<|endofprompt|>[breath]希望你以后能够做的比我还好呦。",
    "<strong>重要</strong>[laughter] It's 9 o'clock\nnew line  two spaces 😀 émigré",
]


def run_reference(*args: str) -> None:
    ref_python = os.environ.get("REF_PYTHON")
    if not ref_python:
        pytest.skip("REF_PYTHON is not set (a Python with upstream CosyVoice and transformers 4.51)")
    proc = subprocess.run([ref_python, str(REFERENCE_SCRIPT), *args], capture_output=True, text=True, timeout=600)
    if proc.returncode == IMPORT_FAILED:
        pytest.skip(f"the REF_PYTHON env cannot import the reference: {proc.stderr.strip().splitlines()[-1]}")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise AssertionError(f"{REFERENCE_SCRIPT.name} failed with exit code {proc.returncode}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_parity")
    tokenizer_dir = tmp / "CosyVoice-BlankEN"
    write_tokenizer_dir(tokenizer_dir)
    case = {
        "tokenizer_dir": str(tokenizer_dir),
        "zh": [text.wetext_normalize(sentence, "zh") for sentence in CHINESE],
        "en": [text.wetext_normalize(sentence, "en") for sentence in ENGLISH],
        "encode": ENCODE,
    }
    (tmp / "case.json").write_text(json.dumps(case, ensure_ascii=False), encoding="utf-8")
    run_reference(str(tmp / "case.json"), str(tmp / "out.json"))
    reference = json.loads((tmp / "out.json").read_text(encoding="utf-8"))
    return case, reference, QwenTextTokenizer(tokenizer_dir)


def test_tokenizer_ids_equal_upstream_qwen_tokenizer(setup):
    case, reference, tokenizer = setup
    assert len(tokenizer) == reference["tokenizer_length"]
    assert [tokenizer.encode(sentence) for sentence in case["encode"]] == reference["encode"]


def test_chinese_post_steps_and_split_equal_upstream(setup):
    case, reference, tokenizer = setup
    for normalised, (their_text, their_pieces) in zip(case["zh"], reference["zh"]):
        ours = text.postprocess_chinese(normalised)
        assert ours == their_text
        assert text.split_pieces(ours, tokenizer.encode, "zh") == their_pieces
    assert any(len(pieces) > 1 for _, pieces in reference["zh"])  # the splitter was exercised


def test_english_split_equals_upstream(setup):
    case, reference, tokenizer = setup
    for normalised, (their_text, their_pieces) in zip(case["en"], reference["en"]):
        assert not any(char.isdigit() for char in normalised)  # wetext spelled every number
        assert normalised == their_text
        assert text.split_pieces(normalised, tokenizer.encode, "en") == their_pieces
    assert any(len(pieces) > 1 for _, pieces in reference["en"])
