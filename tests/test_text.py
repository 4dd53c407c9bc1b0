"""Unit tests of engine/text.py with real Chinese and English sentences (wetext TN + upstream's post-steps)."""
import pytest

from cosyvoice_tts.engine import text
from cosyvoice_tts.engine.text import split_paragraph, text_normalize


def words(piece: str) -> list[str]:
    """A stand-in tokenizer for English lengths: one token per word."""
    return piece.split()


# ---- language ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("sentence,language", [
    ("The weather is lovely today.", "en"),
    ("我想学Python编程。", "zh"),
    ("東京は大きい", "zh"),  # kanji are CJK ideographs: upstream treats them as Chinese
    ("こんにちは", "en"),  # kana only: no CJK ideograph
    ("123", "en"),
])
def test_language_is_chinese_when_any_ideograph_appears(sentence, language):
    assert text.detect_language(sentence) == language


# ---- Chinese -----------------------------------------------------------------------------------------


def test_chinese_numbers_dates_and_decimals_are_read_out():
    assert text_normalize("今天是2024年3月5日，气温25.5度。", words, split=False) == \
        "今天是二零二四年三月五日，气温二十五点五度。"


def test_chinese_corner_marks_become_words():
    assert text_normalize("房间面积是10m²，体积是5m³。", words, split=False) == "房间面积是十平方米，体积是五立方米。"
    assert text.replace_corner_mark("x²y³") == "x平方y立方"


def test_traditional_chinese_is_simplified():
    assert text_normalize("這個問題很難，我們明天再討論吧。", words, split=False) == "这个问题很难，我们明天再讨论吧。"


def test_blanks_survive_only_between_ascii_characters():
    assert text_normalize("你好 世界 hello world", words, split=False) == "你好世界hello world"
    assert text.replace_blank(" a b 中 c ") == "a b中c"


def test_brackets_dashes_and_trailing_commas():
    assert text_normalize("这是【重点】（注释）内容——请注意,", words, split=False) == "这是重点注释内容 请注意。"


def test_ascii_full_stop_becomes_chinese_full_stop():
    assert text_normalize("他用的是Python.很好用", words, split=False) == "他用的是Python。很好用"


def test_chinese_paragraph_is_split_into_pieces_of_60_to_80_characters():
    sentences = [
        "收到好友从远方寄来的生日礼物，那份意外的惊喜与深深的祝福让我心中充满了甜蜜的快乐。",
        "笑容如花儿般绽放，我立刻给她打了一个电话表示感谢。",
        "我们聊了很久，从小时候的趣事一直说到最近的工作和生活。",
        "挂上电话以后，我把礼物小心地放在书桌上，每天都能看到它。",
        "这份友谊跨越了千山万水，依然温暖如初。",
        "谢谢你。",
    ]
    paragraph = "".join(sentences)
    pieces = text_normalize(paragraph, words)
    assert "".join(pieces) == paragraph
    # sentences of 41, 25, 27, 28, 19, 4 characters: the first piece closes at 66 (past 60, and 93 would
    # pass 80); the rest (78) stays within 80
    assert [len(piece) for piece in pieces] == [41 + 25, 27 + 28 + 19 + 4]


def test_split_keeps_a_closing_quote_with_its_sentence():
    assert split_paragraph("他说：“你好。”然后走了。", words, "zh", token_max_n=1, token_min_n=0, merge_len=0) == \
        ["他说：", "“你好。”", "然后走了。"]


def test_split_adds_a_final_stop_and_merges_a_short_tail():
    assert split_paragraph("今天天气很好", words, "zh") == ["今天天气很好。"]
    long_sentence = "这是一个很长的句子" * 8 + "真的非常长。"  # 78 characters
    # 78 + 3 passes 80 with 78 past 60: the piece closes, but the 3-character tail is under merge_len (20)
    # and goes back onto it
    assert split_paragraph(long_sentence + "好的。", words, "zh") == [long_sentence + "好的。"]
    assert split_paragraph(long_sentence + "好的。", words, "zh", merge_len=0) == [long_sentence, "好的。"]


def test_commas_split_only_with_comma_split():
    sentence = "我们先吃饭，然后去看电影。"
    assert split_paragraph(sentence, words, "zh", token_max_n=1, token_min_n=0, merge_len=0) == [sentence]
    assert split_paragraph(sentence, words, "zh", token_max_n=1, token_min_n=0, merge_len=0, comma_split=True) == \
        ["我们先吃饭，", "然后去看电影。"]


# ---- English -----------------------------------------------------------------------------------------


def test_english_numbers_are_spelled_out():
    assert text_normalize("I have 3 apples and 12 oranges", words) == ["I have three apples and twelve oranges."]
    assert text.spell_out_numbers("room 7 and 42") == "room seven and forty two"


def test_english_runs_of_spaces_do_not_break_normalisation():
    assert text_normalize("Hello   world", words) == ["Hello world."]


def test_english_paragraph_is_split_by_token_count():
    sentence = "The quick brown fox jumps over the lazy dog near the quiet river bank today."  # 15 words
    paragraph = " ".join([sentence] * 12)
    pieces = text_normalize(paragraph, words)
    assert len(pieces) > 1
    for piece in pieces[:-1]:
        assert 60 < len(words(piece)) <= 80
    assert len(words(" ".join(pieces))) == 12 * 15


def test_english_splits_on_colons_but_chinese_splits_also_on_enumeration_commas():
    assert split_paragraph("Note: read this.", words, "en", token_max_n=1, token_min_n=0, merge_len=0) == \
        ["Note:", " read this."]
    assert split_paragraph("苹果、香蕉。", words, "zh", token_max_n=1, token_min_n=0, merge_len=0) == ["苹果、", "香蕉。"]


# ---- pass-through and filtering ----------------------------------------------------------------------


def test_pieces_of_only_punctuation_are_dropped():
    assert text_normalize("……", words) == []
    assert text.is_only_punctuation("。！？…") and text.is_only_punctuation("") and text.is_only_punctuation("$+")
    assert not text.is_only_punctuation("好。")


def test_text_frontend_off_and_empty_text_pass_through():
    raw = "今天是2024年 ，（不变）"
    assert text_normalize(raw, words, text_frontend=False) == [raw]
    assert text_normalize(raw, words, split=False, text_frontend=False) == raw
    assert text_normalize("", words) == [""]
    assert text_normalize("", words, split=False) == ""
