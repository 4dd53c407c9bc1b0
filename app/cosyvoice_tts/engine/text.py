"""Text normalisation and sentence splitting as upstream's `CosyVoiceFrontEnd.text_normalize`.

Upstream normalises with ttsfrd or WeTextProcessing; we use `wetext` (the same WeNet grammars compiled to
FSTs, no pynini) with WeTextProcessing's settings as upstream constructs them, then apply upstream's
post-steps (cosyvoice/utils/frontend_utils.py) in the same order:

- Chinese (the text contains a CJK ideograph): TN, drop newlines, drop blanks that are not between two
  ASCII characters, spell out ² and ³, '.' -> '。', ' - ' -> '，', drop 【】（）` and turn '——' into a
  space, trailing commas become '。', split into sentences counted in characters;
- otherwise English: TN (which spells out numbers), any remaining digit runs are spelled out, split into
  sentences counted in tokens;
- pieces made only of punctuation or symbols are dropped.

Known difference: upstream spells leftover English digits with `inflect` ("one hundred and twenty-three");
we spell them with wetext's English grammar ("one hundred twenty three"). After wetext's TN digits rarely
remain, so this seldom matters.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache
from typing import Callable, Literal, Sequence

logger = logging.getLogger(__name__)

Language = Literal["zh", "en"]
Tokenize = Callable[[str], Sequence[int]]

# upstream's split_paragraph defaults as text_normalize calls it
TOKEN_MAX_N = 80
TOKEN_MIN_N = 60
MERGE_LEN = 20

_CHINESE_CHAR = re.compile(r"[\u4e00-\u9fff]")
_DIGIT_RUN = re.compile(r"\d+")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")
_WHITESPACE_RUN = re.compile(r"\s+")

# sentence ends upstream splits on (commas only with comma_split=True)
_ZH_SENTENCE_ENDS = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
_EN_SENTENCE_ENDS = (".", "?", "!", ";", ":")
_COMMAS = ("，", ",")
_CLOSING_QUOTES = ('"', "”")


def contains_chinese(text: str) -> bool:
    """Upstream's language test: any character in the CJK Unified Ideographs block."""
    return bool(_CHINESE_CHAR.search(text))


def detect_language(text: str) -> Language:
    return "zh" if contains_chinese(text) else "en"


# ------------------------------------------------------------------------------------------------------
# text normalisation (wetext)
# ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _wetext_normalizer(language: Language):
    # Imported lazily: the FSTs are loaded on first use and cost about half a second.
    from wetext import Normalizer

    if language == "zh":
        # WeTextProcessing's ZhNormalizer defaults with upstream's overrides (remove_erhua=False,
        # full_to_half=False): traditional -> simplified and interjection removal stay on.
        return Normalizer(lang="zh", operator="tn", traditional_to_simple=True, remove_interjections=True,
                          full_to_half=False, remove_erhua=False, remove_puncts=False, tag_oov=False)
    return Normalizer(lang="en", operator="tn")


def wetext_normalize(text: str, language: Language) -> str:
    """TN with wetext; on a grammar failure the text goes on unnormalised rather than failing the request."""
    if language == "en":
        # wetext's English grammar rejects runs of whitespace that WeTextProcessing collapses; collapse first
        text = _WHITESPACE_RUN.sub(" ", text)
    try:
        return _wetext_normalizer(language).normalize(text)
    except (AssertionError, RuntimeError) as error:
        logger.warning("text normalisation failed (%s: %s); using the text as it is: %r",
                       type(error).__name__, error, text[:200])
        return text.strip()


# ------------------------------------------------------------------------------------------------------
# upstream's post-steps
# ------------------------------------------------------------------------------------------------------


def replace_blank(text: str) -> str:
    """Drop spaces unless both neighbours are non-space ASCII (keeps "hello world", drops "你 好").

    Upstream indexes text[i - 1] and text[i + 1] without bounds checks (wrapping around at the start,
    raising at the end); its input is stripped, so treating the edges as "no neighbour" is equivalent.
    """
    kept = []
    for i, char in enumerate(text):
        if char == " ":
            before = text[i - 1] if i > 0 else ""
            after = text[i + 1] if i + 1 < len(text) else ""
            if not (_is_ascii_word_neighbour(before) and _is_ascii_word_neighbour(after)):
                continue
        kept.append(char)
    return "".join(kept)


def _is_ascii_word_neighbour(char: str) -> bool:
    return char != "" and char.isascii() and char != " "


def replace_corner_mark(text: str) -> str:
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    for mark in ("（", "）", "【", "】", "`"):
        text = text.replace(mark, "")
    return text.replace("——", " ")


def spell_out_numbers(text: str) -> str:
    """Spell out the digit runs English TN left behind, one run at a time."""
    return _DIGIT_RUN.sub(lambda match: wetext_normalize(match.group(0), "en"), text)


def is_only_punctuation(text: str) -> bool:
    """True for empty text or text made only of punctuation (P*) and symbols (S*), as upstream's regex."""
    return all(unicodedata.category(char)[0] in "PS" for char in text)


def split_paragraph(text: str, tokenize: Tokenize, language: Language, token_max_n: int = TOKEN_MAX_N,
                    token_min_n: int = TOKEN_MIN_N, merge_len: int = MERGE_LEN,
                    comma_split: bool = False) -> list[str]:
    """Cut text into sentences, then pack them into pieces as upstream's `split_paragraph`.

    Length is characters for Chinese and tokens for English. A piece is closed before adding a sentence
    that would take it past token_max_n, but only once it already exceeds token_min_n; a last piece
    shorter than merge_len is appended to the previous one. A closing quote after a sentence end stays
    with its sentence, and text without a final sentence end gets one ('。' or '.').
    """
    if text == "":
        return []

    def length(piece: str) -> int:
        return len(piece) if language == "zh" else len(tokenize(piece))

    sentence_ends = list(_ZH_SENTENCE_ENDS if language == "zh" else _EN_SENTENCE_ENDS)
    if comma_split:
        sentence_ends.extend(_COMMAS)
    if text[-1] not in sentence_ends:
        text += "。" if language == "zh" else "."

    sentences = []
    start = 0
    for i, char in enumerate(text):
        if char not in sentence_ends:
            continue
        if i > start:
            sentences.append(text[start:i + 1])
        if i + 1 < len(text) and text[i + 1] in _CLOSING_QUOTES:
            # Upstream appends the quote to the last sentence even when this end mark opened no new one.
            if sentences:
                sentences[-1] += text[i + 1]
            start = i + 2
        else:
            start = i + 1

    pieces: list[str] = []
    current = ""
    for sentence in sentences:
        if length(current + sentence) > token_max_n and length(current) > token_min_n:
            pieces.append(current)
            current = ""
        current += sentence
    if current:
        if length(current) < merge_len and pieces:
            pieces[-1] += current
        else:
            pieces.append(current)
    return pieces


# ------------------------------------------------------------------------------------------------------
# the whole of text_normalize
# ------------------------------------------------------------------------------------------------------


def postprocess_chinese(text: str) -> str:
    """Upstream's steps after Chinese TN, in its order."""
    text = text.replace("\n", "")
    text = replace_blank(text)
    text = replace_corner_mark(text)
    text = text.replace(".", "。")
    text = text.replace(" - ", "，")
    text = remove_bracket(text)
    return _TRAILING_COMMAS.sub("。", text)


def normalize_chinese(text: str) -> str:
    return postprocess_chinese(wetext_normalize(text, "zh"))


def normalize_english(text: str) -> str:
    return spell_out_numbers(wetext_normalize(text, "en"))


def split_pieces(text: str, tokenize: Tokenize, language: Language) -> list[str]:
    """Normalised text -> the pieces upstream synthesises one by one (pieces of only punctuation dropped)."""
    pieces = split_paragraph(text, tokenize, language)
    return [piece for piece in pieces if not is_only_punctuation(piece)]


def text_normalize(text: str, tokenize: Tokenize, split: bool = True,
                   text_frontend: bool = True) -> list[str] | str:
    """Upstream's `CosyVoiceFrontEnd.text_normalize` for a string.

    split=True returns the list of pieces to synthesise one after another (pieces of only punctuation
    dropped); split=False returns the normalised text whole (used for prompt texts). text_frontend=False
    or empty text passes the text through untouched, as upstream does.
    """
    if not text_frontend or text == "":
        return [text] if split else text
    text = text.strip()
    language = detect_language(text)
    text = normalize_chinese(text) if language == "zh" else normalize_english(text)
    return split_pieces(text, tokenize, language) if split else text
