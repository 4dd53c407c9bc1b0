"""Streaming text segmenter for LLM output.

An LLM streams text in fragments that may be single tokens (" the", "29", ".", "9"). Stages that need whole
sentences (text normalisation: numbers, dates, abbreviations) get them from :class:`TextSegmenter`:

    seg = TextSegmenter()
    for fragment in llm_stream:
        for sentence in seg.feed(fragment):
            engine_request.push_text(sentence)
    for sentence in seg.flush():          # end of text or an explicit flush
        engine_request.push_text(sentence)

Rules (see ``docs/protocol.md``):

- Cuts after Chinese/full-width ``。！？；…`` and after ASCII ``. ! ? ;`` followed by whitespace (or a CJK
  character); a run of terminators and closing quotes/brackets stays with its sentence (``“好。”``,
  ``"Done."``). A terminator at the very end of the buffer waits for the next fragment (``$29.`` may go on
  with ``99``) unless the text is flushed.
- ``.`` is not a sentence end in decimals (``3.14``), URLs/e-mails/file names (``example.com``), after titles
  (``Mr.``, ``Dr.``), initials (``J. K.``, ``U.S.``), or after abbreviations such as ``e.g.``/``etc.`` unless
  an upper-case word follows.
- A line break ends a segment (markdown lists, headings).
- Sentences shorter than ``min_chars`` speakable characters are merged with the next one (prosody).
- The first segment may be cut early at a clause mark (``，,、：:``) once it has ``first_clause_chars``
  speakable characters, to get the first audio out sooner.
- A run longer than ``max_chars`` without a sentence end is split at its last clause mark, else at its last
  space, else (CJK) between two CJK characters.
- Emitted text is cleaned: markdown syntax (emphasis, headings, list markers, links, images, tables, HTML
  tags, code fences and code blocks), emoji and extra whitespace are removed; segments with nothing to read
  are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["TextSegmenter", "clean_text", "segment_text", "join_segments", "speakable_chars"]

# Sentence terminators.
CJK_TERMINATORS = "。！？；…"
ASCII_TERMINATORS = ".!?;"
# Clause marks used for an early first cut and for forced splits.
CJK_CLAUSE = "，、：；"
ASCII_CLAUSE = ",:;"
# Characters that stay with the sentence after its terminator.
CLOSERS = "\"'”’」』》〉）)】]*_`~"

# Titles: a following capitalised name never starts a new sentence.
TITLE_ABBREVIATIONS = frozenset(
    "mr mrs ms mx dr prof sr jr st mt ft vs gen col capt lt sgt rev hon gov pres sen rep messrs no nos "
    "fig figs eq eqs vol vols pp approx dept est ca cf".split()
)
# Abbreviations that also end sentences: a cut only when an upper-case word follows.
OTHER_ABBREVIATIONS = frozenset("etc e.g i.e a.m p.m inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec".split())

_EMOJI_RANGES = (
    (0x1F000, 0x1FAFF),  # mahjong .. symbols & pictographs extended-A (incl. emoticons, flags, skin tones)
    (0x2600, 0x27BF),  # misc symbols, dingbats
    (0x2B00, 0x2BFF),  # arrows/stars (⭐ ⬆)
    (0x2190, 0x21FF),  # arrows
    (0x2300, 0x23FF),  # misc technical (⌚ ⏰)
    (0x25A0, 0x25FF),  # geometric shapes (▶ ◀)
    (0xFE00, 0xFE0F),  # variation selectors
    (0xE0020, 0xE007F),  # tag characters (subdivision flags)
)
_EMOJI_SINGLES = frozenset([0x200D, 0x20E3, 0x3030, 0x303D, 0x3297, 0x3299, 0x00A9, 0x00AE, 0x2122, 0x2139])

_RE_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_RE_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_RE_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_RE_AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>")
_RE_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>")
_RE_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_RE_QUOTE = re.compile(r"^\s*(?:>\s*)+")
_RE_BULLET = re.compile(r"^\s*[-*+•·]\s+")
_RE_NUMBERED = re.compile(r"^\s*\d{1,3}[.)]\s+")
_RE_TASK = re.compile(r"^\[[ xX]\]\s+")
_RE_HRULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$")
_RE_TABLE_SEP = re.compile(r"^\s*\|?\s*:?-{2,}:?\s*(?:\|\s*:?-{2,}:?\s*)*\|?\s*$")
_RE_EMPHASIS = re.compile(r"\*{1,3}|~~|__")
_RE_UNDERSCORE_EMPH = re.compile(r"(?<![\w])_([^_\s][^_]*?)_(?![\w])")
_RE_SPACES = re.compile(r"\s+")
_RE_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?，。；：！？、])")
_RE_MARK_RUN = re.compile(r"([!?.;,。！？；，…]{3})[!?.;,。！？；，…]+")


def _is_emoji(ch: str) -> bool:
    cp = ord(ch)
    if cp in _EMOJI_SINGLES:
        return True
    for lo, hi in _EMOJI_RANGES:
        if lo <= cp <= hi:
            return True
    return False


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF  # CJK unified ideographs
        or 0x3400 <= cp <= 0x4DBF  # extension A
        or 0x20000 <= cp <= 0x2FA1F  # extensions B.. and compatibility supplement
        or 0xF900 <= cp <= 0xFAFF  # compatibility ideographs
        or 0x3040 <= cp <= 0x30FF  # hiragana, katakana
        or 0xAC00 <= cp <= 0xD7AF  # hangul syllables
    )


def _is_cjk_or_fullwidth_punct(ch: str) -> bool:
    return _is_cjk(ch) or 0x3000 <= ord(ch) <= 0x303F or 0xFF00 <= ord(ch) <= 0xFFEF


def speakable_chars(text: str) -> int:
    """Number of characters that are read aloud (letters, digits, CJK)."""
    return sum(1 for ch in text if ch.isalnum() and not _is_emoji(ch))


def clean_text(text: str, line_start: bool = True) -> str:
    """Remove what must not be read aloud: markdown syntax, HTML tags, emoji, extra whitespace.

    ``line_start``: the text begins at the start of a line, so line-level markdown (headings, list markers,
    quotes, rules, table separators) at its beginning is removed. Every line of a multi-line text is
    treated as starting a line. Returns ``""`` when nothing speakable remains.
    """
    lines = text.split("\n")
    out: list[str] = []
    for n, line in enumerate(lines):
        if line_start or n > 0:
            if _RE_HRULE.match(line) or _RE_TABLE_SEP.match(line):
                continue
            line = _RE_QUOTE.sub("", line)
            line = _RE_HEADING.sub("", line)
            line = _RE_BULLET.sub("", line)
            line = _RE_NUMBERED.sub("", line)
            line = _RE_TASK.sub("", line)
        if "|" in line and line.count("|") >= 2:  # table row: cells become a list
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            line = ", ".join(c for c in cells if c)
        out.append(line)
    text = " ".join(out)
    text = _RE_IMAGE.sub(" ", text)
    text = _RE_LINK.sub(r"\1", text)
    text = _RE_REF_LINK.sub(r"\1", text)
    text = _RE_AUTOLINK.sub(r"\1", text)
    text = _RE_HTML_TAG.sub(" ", text)
    text = _RE_EMPHASIS.sub("", text)
    text = _RE_UNDERSCORE_EMPH.sub(r"\1", text)
    text = text.replace("`", "")
    text = "".join(" " if _is_emoji(ch) else ch for ch in text)
    text = _RE_SPACES.sub(" ", text).strip()
    text = _RE_SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _RE_MARK_RUN.sub(r"\1", text)
    if speakable_chars(text) == 0:
        return ""
    return text


def join_segments(segments: list[str]) -> str:
    """Join segments into one text: no space after CJK text, one space otherwise."""
    out = ""
    for seg in segments:
        if out and not _is_cjk_or_fullwidth_punct(out[-1]):
            out += " "
        out += seg
    return out


@dataclass
class _Cut:
    end: int  # index in the buffer after the segment


class TextSegmenter:
    """Buffers streamed text fragments and returns whole, cleaned segments.

    ``feed(fragment)`` returns the segments completed by that fragment (often none); ``flush()`` returns
    everything still buffered. Both return cleaned, non-empty strings. The segmenter can go on after
    ``flush()`` (the protocol's ``flush`` message); the first-segment rule applies once per instance.
    """

    def __init__(
        self,
        *,
        min_chars: int = 4,
        max_chars: int = 60,
        first_clause_chars: int = 10,
        eager_first: bool = True,
    ) -> None:
        if not 1 <= min_chars <= max_chars:
            raise ValueError("need 1 <= min_chars <= max_chars")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.first_clause_chars = first_clause_chars
        self.eager_first = eager_first
        self._raw = ""  # text not yet past the code-fence filter
        self._buf = ""  # text waiting for a cut
        self._in_code = False  # inside a ``` fenced block (dropped)
        self._code_header = False  # dropping an opening fence's info string up to its newline
        self._line_start = True  # self._buf starts at the start of a line
        self._emitted = 0  # number of segments emitted
        self._raw_limit = max(16 * max_chars, 1024)  # raw characters buffered at most without a cut

    # -- public API ------------------------------------------------------------------------------------
    @property
    def pending(self) -> str:
        """Raw text buffered and not yet emitted."""
        return self._buf + self._raw

    @property
    def segments_emitted(self) -> int:
        return self._emitted

    def feed(self, fragment: str) -> list[str]:
        if not isinstance(fragment, str):
            raise TypeError("fragment must be str")
        if fragment:
            self._raw += fragment.replace("\r\n", "\n").replace("\r", "\n")
        return self._process(final=False)

    def flush(self) -> list[str]:
        """Emit everything buffered (end of text or an explicit flush)."""
        return self._process(final=True)

    # -- internals -------------------------------------------------------------------------------------
    def _process(self, final: bool) -> list[str]:
        out: list[str] = []
        while True:
            self._filter_code(final, out)
            cut = self._find_cut(final=False)
            if cut is None:
                break
            self._emit(cut.end, out)
        if final:
            self._filter_code(True, out)
            if not self._in_code:
                self._raw = ""
            # Whatever remains (possibly several sentences when a pending terminator was resolved by
            # the end of the text) is cut with end-of-text semantics.
            while True:
                cut = self._find_cut(final=True)
                if cut is None:
                    break
                self._emit(cut.end, out)
            if self._buf:
                self._emit(len(self._buf), out)
        return out

    def _filter_code(self, final: bool, out: list[str]) -> None:
        """Move text from ``_raw`` to ``_buf``, dropping fenced code blocks."""
        while self._raw:
            if self._code_header:
                nl = self._raw.find("\n")
                if nl < 0:
                    self._raw = ""
                    return
                self._raw = self._raw[nl + 1 :]
                self._code_header = False
                continue
            if self._in_code:
                idx = self._raw.find("```")
                if idx < 0:
                    # keep a possible partial fence
                    keep = len(self._raw) - len(self._raw.rstrip("`"))
                    self._raw = self._raw[len(self._raw) - keep :] if keep and not final else ""
                    return
                self._raw = self._raw[idx + 3 :]
                self._in_code = False
                # the rest of the closing fence line is dropped too
                self._code_header = True
                continue
            idx = self._raw.find("```")
            if idx < 0:
                tail = len(self._raw) - len(self._raw.rstrip("`")) if not final else 0
                tail = min(tail, 2)
                self._buf += self._raw[: len(self._raw) - tail]
                self._raw = self._raw[len(self._raw) - tail :] if tail else ""
                return
            # text before the fence ends a segment
            self._buf += self._raw[:idx]
            self._raw = self._raw[idx + 3 :]
            if self._buf.strip():
                self._emit(len(self._buf), out)
            else:
                self._buf = ""
            self._line_start = True
            self._in_code = True
            self._code_header = True

    def _emit(self, end: int, out: list[str]) -> None:
        raw = self._buf[:end]
        self._buf = self._buf[end:]
        text = clean_text(raw, line_start=self._line_start)
        self._line_start = raw.endswith("\n") or (not raw.strip() and self._line_start)
        # leading spaces of the next segment are not read; a newline there starts a line
        stripped = self._buf.lstrip(" \t")
        self._buf = stripped
        if text:
            out.append(text)
            self._emitted += 1

    def _word_before(self, i: int) -> str:
        """The token (letters, digits, dots) that ends just before index ``i``."""
        j = i
        buf = self._buf
        while j > 0 and (buf[j - 1].isalnum() or buf[j - 1] == ".") and not _is_cjk(buf[j - 1]):
            j -= 1
        return buf[j:i]

    def _is_abbreviation_stop(self, i: int, next_index: int, final: bool) -> bool | None:
        """For a single '.' at ``i``: True if it is not a sentence end, None if undecidable yet."""
        word = self._word_before(i)
        if not word:
            return False
        low = word.lower()
        if low in TITLE_ABBREVIATIONS:
            return True
        # initials and dotted abbreviations: "J." "U.S." "e.g."
        parts = word.split(".")
        if all(len(p) == 1 and p.isalpha() for p in parts if p) and any(p.isupper() for p in parts):
            return True
        if low in OTHER_ABBREVIATIONS:
            # a cut only when an upper-case word follows
            k = next_index
            buf = self._buf
            while k < len(buf) and buf[k] in " \t":
                k += 1
            if k >= len(buf):
                return None if not final else False
            return not buf[k].isupper()
        return False

    def _find_cut(self, final: bool) -> _Cut | None:
        buf = self._buf
        n = len(buf)
        if not n:
            return None
        # prefix[k] = speakable characters in buf[:k]
        prefix = [0] * (n + 1)
        for k, ch in enumerate(buf):
            prefix[k + 1] = prefix[k] + (1 if ch.isalnum() and not _is_emoji(ch) else 0)
        if n > self._raw_limit:
            # pathological input (long runs of punctuation, symbols): never buffer without bound
            return _Cut(self._last_space_cut(buf, prefix, n) or self._hard_cut(buf, prefix))
        eager = self.eager_first and self._emitted == 0
        i = 0
        while i < n:
            ch = buf[i]
            if ch == "\n":
                # a line break ends a segment (list items, headings); an empty one is dropped by _emit
                return _Cut(i + 1)
            if ch in CJK_TERMINATORS or ch in ASCII_TERMINATORS:
                j = i + 1
                while j < n and (buf[j] in CJK_TERMINATORS or buf[j] in ASCII_TERMINATORS or buf[j] in CLOSERS):
                    j += 1
                if j >= n and not final:
                    # undecidable until the next fragment ("$29." + "99", "。" + "”")
                    return None
                ok: bool = True
                if ch not in CJK_TERMINATORS:
                    nxt = buf[j] if j < n else ""
                    ok = nxt == "" or nxt.isspace() or _is_cjk_or_fullwidth_punct(nxt)
                    if ok and ch == "." and j == i + 1:
                        stop = self._is_abbreviation_stop(i, j, final)
                        if stop is None:
                            return None
                        ok = not stop
                if ok and prefix[j] >= self.min_chars:
                    return _Cut(j)
                i = j
                continue
            if eager and (ch in CJK_CLAUSE or ch in ASCII_CLAUSE) and prefix[i] >= self.first_clause_chars:
                # the first segment is cut at its first clause mark past first_clause_chars
                j = i + 1
                if ch in ASCII_CLAUSE:
                    if j >= n:
                        if not final:
                            return None  # "1," + "000"?
                    elif not (buf[j].isspace() or _is_cjk(buf[j])):
                        i += 1
                        continue
                while j < n and buf[j] in CLOSERS:
                    j += 1
                return _Cut(j)
            i += 1
        # no sentence end: a forced split of a long run
        speak = prefix[n]
        if speak > self.max_chars:
            # the latest boundary that keeps the segment within max_chars
            k = self._last_clause_cut(buf, prefix, self.min_chars, self.max_chars)
            if k is None:
                k = self._last_space_cut(buf, prefix, self.max_chars)
            if k is None:
                k = self._cjk_cut(buf, prefix, self.max_chars)
            if k is None and speak > 3 * self.max_chars:
                k = self._hard_cut(buf, prefix)
            if k is not None:
                return _Cut(k)
        return None

    def _last_clause_cut(self, buf: str, prefix: list[int], min_before: int, max_before: int) -> int | None:
        best = None
        n = len(buf)
        for i, ch in enumerate(buf):
            if ch in CJK_CLAUSE:
                j = i + 1
            elif ch in ASCII_CLAUSE:
                j = i + 1
                if j >= n or not (buf[j].isspace() or _is_cjk(buf[j])):
                    continue  # "1,000", "10:30", "http://"
            else:
                continue
            while j < n and buf[j] in CLOSERS:
                j += 1
            if prefix[j] > max_before:
                break
            if prefix[j] >= min_before:
                best = j
        return best

    def _last_space_cut(self, buf: str, prefix: list[int], max_before: int) -> int | None:
        # the text after the last space may be an incomplete word: cut at a space, never inside a word
        for i in range(len(buf) - 1, 0, -1):
            if buf[i].isspace() and self.min_chars <= prefix[i] <= max_before:
                return i + 1
        return None

    def _cjk_cut(self, buf: str, prefix: list[int], max_before: int) -> int | None:
        # between two CJK characters, as late as possible; never after the last one (a word may go on)
        for i in range(len(buf) - 1, 0, -1):
            if _is_cjk(buf[i - 1]) and _is_cjk(buf[i]) and self.min_chars <= prefix[i] <= max_before:
                return i
        return None

    def _hard_cut(self, buf: str, prefix: list[int]) -> int:
        for k in range(1, len(buf) + 1):
            if prefix[k] >= self.max_chars:
                return k
        return len(buf)


def segment_text(text: str, **kwargs) -> list[str]:
    """Segment a whole text at once (the same rules as streaming, then a flush)."""
    seg = TextSegmenter(**kwargs)
    return seg.feed(text) + seg.flush()
