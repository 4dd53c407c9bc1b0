"""The streaming text segmenter (cosyvoice_tts.text_stream)."""

from __future__ import annotations

import random
import time

import pytest

from cosyvoice_tts.client import llm_fragments
from cosyvoice_tts.text_stream import TextSegmenter, clean_text, join_segments, segment_text, speakable_chars


def stream(text: str, pieces: list[str] | None = None, **kw) -> list[str]:
    seg = TextSegmenter(**kw)
    out: list[str] = []
    for p in pieces if pieces is not None else llm_fragments(text):
        out += seg.feed(p)
    return out + seg.flush()


def char_by_char(text: str, **kw) -> list[str]:
    return stream(text, list(text), **kw)


def all_ways(text: str, **kw) -> list[str]:
    """Segments must not depend on how the text was fragmented."""
    whole = segment_text(text, **kw)
    assert char_by_char(text, **kw) == whole
    assert stream(text, **kw) == whole
    rng = random.Random(len(text))
    for _ in range(3):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(1, 7)
            pieces.append(text[i : i + n])
            i += n
        assert stream(text, pieces, **kw) == whole
    return whole


# -- sentence ends ------------------------------------------------------------------------------------------
def test_english_sentences():
    assert all_ways("Hello there. How are you? I am fine! Great; thanks a lot.") == [
        "Hello there.", "How are you?", "I am fine!", "Great;", "thanks a lot.",
    ]  # fmt: skip


def test_chinese_sentences_without_spaces():
    assert all_ways("今天天气很好。我们去公园吧！你觉得呢？好的；走吧。") == [
        "今天天气很好。", "我们去公园吧！", "你觉得呢？", "好的；走吧。",
    ]  # fmt: skip


def test_mixed_chinese_and_english():
    assert all_ways("我喜欢Python.它很好用。Really good stuff.") == ["我喜欢Python.", "它很好用。", "Really good stuff."]


def test_decimals_and_prices_not_cut():
    assert all_ways("The price is $29.99 today. Pi is about 3.14159 really.") == [
        "The price is $29.99 today.", "Pi is about 3.14159 really.",
    ]  # fmt: skip


def test_decimal_split_across_fragments_waits():
    seg = TextSegmenter()
    assert seg.feed("It costs $29.") == []  # "$29." may go on with "99"
    assert seg.feed("99") == []
    assert seg.feed(" now. Then") == ["It costs $29.99 now."]
    assert seg.flush() == ["Then"]


def test_abbreviations_and_initials_not_cut():
    assert all_ways("Mr. Smith met Dr. Jones at 5 p.m. today. J. K. Rowling wrote it. We met in the U.S. last year.") == [
        "Mr. Smith met Dr. Jones at 5 p.m. today.", "J. K. Rowling wrote it.", "We met in the U.S. last year.",
    ]  # fmt: skip


def test_abbreviation_that_ends_a_sentence():
    # "etc." before a capitalised word ends the sentence; "e.g." before a lower-case word does not
    assert all_ways("We bought apples and pears etc. Then we left. Fruit e.g. apples is good.") == [
        "We bought apples and pears etc.", "Then we left.", "Fruit e.g. apples is good.",
    ]  # fmt: skip


def test_urls_emails_and_file_names_not_cut():
    assert all_ways("See https://example.com/a.b?x=1 for details. Mail bob@mail.example.org or open main.py now.") == [
        "See https://example.com/a.b?x=1 for details.", "Mail bob@mail.example.org or open main.py now.",
    ]  # fmt: skip


def test_closing_quotes_and_brackets_kept_with_sentence():
    assert all_ways('他说：“你好。”然后走了。She said "Stop." Then (quietly.) it ended.') == [
        "他说：“你好。”", "然后走了。", 'She said "Stop."', "Then (quietly.)", "it ended.",
    ]  # fmt: skip


def test_closing_quote_in_next_fragment():
    seg = TextSegmenter()
    assert seg.feed("他说：“你好。") == []  # the closing quote may still come
    assert seg.feed("”") == []
    assert seg.feed("然后") == ["他说：“你好。”"]


def test_ellipsis_and_repeated_marks():
    assert all_ways("Well... I think so. Really?! Yes, yes!!! 等一等我……好吧好吧。") == [
        "Well...", "I think so.", "Really?!", "Yes, yes!!!", "等一等我……", "好吧好吧。",
    ]  # fmt: skip


def test_short_sentences_are_merged():
    assert all_ways("Hi. OK. Sure thing, friend.", first_clause_chars=100) == ["Hi. OK.", "Sure thing, friend."]
    assert all_ways("好。对。我们走吧。你好啊朋友。") == ["好。对。我们走吧。", "你好啊朋友。"]


def test_line_breaks_end_segments():
    assert all_ways("First line without stop\nSecond line\n\nThird") == ["First line without stop", "Second line", "Third"]


def test_terminator_at_end_waits_until_next_fragment_or_flush():
    seg = TextSegmenter()
    assert seg.feed("Hello there.") == []
    assert seg.flush() == ["Hello there."]
    assert seg.feed("Next one. And") == ["Next one."]
    assert seg.pending == "And"


# -- first clause, forced splits -----------------------------------------------------------------------------
def test_first_segment_cut_at_clause_for_latency():
    assert all_ways("Well, hello there my friend, how are you doing today? I am fine, thanks.") == [
        "Well, hello there my friend,", "how are you doing today?", "I am fine, thanks.",
    ]  # fmt: skip
    assert all_ways("今天的天气非常非常好，我们一起去公园散步吧。") == ["今天的天气非常非常好，", "我们一起去公园散步吧。"]


def test_first_clause_cut_can_be_disabled():
    text = "Well, hello there my friend, how are you doing today?"
    assert all_ways(text, eager_first=False) == [text]


def test_numbers_with_commas_and_times_not_clause_cuts():
    assert all_ways("It costs 1,000,000 dollars at 10:30 sharp, they say.") == [
        "It costs 1,000,000 dollars at 10:30 sharp,", "they say.",
    ]  # fmt: skip


def test_long_english_run_split_at_word_boundary():
    text = " ".join(f"word{i}" for i in range(60))
    segs = all_ways(text)
    assert len(segs) > 1
    assert " ".join(segs) == text  # nothing lost, no word cut
    assert all(speakable_chars(s) <= 60 for s in segs)


def test_long_run_prefers_clause_marks():
    text = "one two three four five six seven eight nine ten, eleven twelve thirteen fourteen fifteen sixteen"
    segs = all_ways(text, eager_first=False)
    assert segs[0].endswith("ten,")


def test_long_chinese_run_split_between_characters():
    text = "这是一个非常长的没有任何标点符号的句子" * 5
    segs = all_ways(text)
    assert len(segs) >= 2 and "".join(segs) == text
    assert all(len(s) <= 60 for s in segs)


def test_first_audio_comes_early_for_a_long_run():
    # a forced split happens once the run passes max_chars, without waiting for the end
    seg = TextSegmenter(max_chars=30)
    out = []
    for frag in llm_fragments("aaa bbb ccc ddd eee fff ggg hhh iii jjj kkk lll mmm nnn"):
        out += seg.feed(frag)
        if out:
            break
    assert out == ["aaa bbb ccc ddd eee fff ggg hhh iii jjj"]


def test_pathological_input_is_bounded_and_fast():
    seg = TextSegmenter()
    t0 = time.monotonic()
    out = []
    for _ in range(5000):
        out += seg.feed("!?")
    out += seg.feed("x" * 5000)  # one huge token
    out += seg.flush()
    assert time.monotonic() - t0 < 5
    assert len(seg.pending) == 0
    assert "".join(out).replace("!", "").replace("?", "") == "x" * 5000
    assert len(out[0]) < 1000  # runs of marks are collapsed


# -- cleaning --------------------------------------------------------------------------------------------
def test_markdown_not_read_aloud():
    text = (
        "# Title\n"
        "Some **bold** and *italic* and __strong__ and ~~gone~~ text with `code`.\n"
        "> A quote here.\n"
        "- first item\n"
        "* second item\n"
        "1. numbered item\n"
        "---\n"
        "See [the docs](https://x.org/a.html) and ![logo](logo.png) now.\n"
        "| name | age |\n|------|-----|\n| Bob | 42 |\n"
        "Line<br>break <b>bold</b>."
    )
    assert all_ways(text) == [
        "Title", "Some bold and italic and strong and gone text with code.", "A quote here.", "first item",
        "second item", "numbered item", "See the docs and now.", "name, age", "Bob, 42", "Line break bold.",
    ]  # fmt: skip


def test_code_blocks_dropped():
    text = "Run this:\n```python\nprint(x.y)  # a comment. Yes!\nfor i in range(3): pass\n```\nThat is all. Bye now."
    assert all_ways(text) == ["Run this:", "That is all.", "Bye now."]


def test_unclosed_code_block_dropped_to_the_end():
    assert all_ways("Here it is.\n```\ncode forever. and ever.") == ["Here it is."]


def test_emoji_removed():
    assert all_ways("Great job! 🎉🎉 Thanks 👍🏽 a lot ❤️. 好的朋友😀。Flags 🇨🇳 and keycaps 1️⃣ too.") == [
        "Great job!", "Thanks a lot.", "好的朋友。", "Flags and keycaps 1 too.",
    ]  # fmt: skip


def test_whitespace_only_and_symbol_only_input_yields_nothing():
    assert all_ways("   \n\t  ") == []
    assert all_ways("*** --- 😀 ... !!!") == []
    seg = TextSegmenter()
    assert seg.feed(" ") == [] and seg.feed("\n") == [] and seg.flush() == []


def test_whitespace_collapsed():
    assert all_ways("Too    many\t\tspaces   here .  Next  one  .") == ["Too many spaces here.", "Next one."]


def test_snake_case_identifiers_kept():
    assert clean_text("call my_function_name now") == "call my_function_name now"
    assert clean_text("an _emphasised_ word") == "an emphasised word"


def test_clean_text_returns_empty_for_nothing_speakable():
    assert clean_text("** 🎉 **") == ""
    assert clean_text("1") == "1"


def test_join_segments():
    assert join_segments(["你好。", "世界。", "Hello.", "World."]) == "你好。世界。Hello. World."
    assert join_segments([]) == ""


def test_segmenter_continues_after_flush():
    seg = TextSegmenter()
    assert seg.feed("Part one") == []
    assert seg.flush() == ["Part one"]
    assert seg.feed(" and part two. Three") == ["and part two."]
    assert seg.flush() == ["Three"]
    assert seg.segments_emitted == 3


def test_crlf_normalised():
    assert all_ways("Line one\r\nLine two\rLine three") == ["Line one", "Line two", "Line three"]


@pytest.mark.parametrize("bad", [dict(min_chars=0), dict(min_chars=10, max_chars=5)])
def test_invalid_parameters(bad):
    with pytest.raises(ValueError):
        TextSegmenter(**bad)


def test_llm_fragments_round_trip():
    for text in ("Hello, world! 你好世界。 $29.99 😀", "", "  spaces  ", "a\nb"):
        parts = llm_fragments(text)
        assert "".join(parts) == text
        assert all(len(p.strip()) <= 5 for p in parts)
