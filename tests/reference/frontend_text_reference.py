"""Upstream's text post-steps and tokenizer (run under REF_PYTHON by tests/test_frontend_text_parity.py).

usage: frontend_text_reference.py CASE.json OUTPUT.json
CASE.json: {"tokenizer_dir", "zh": [Chinese TN outputs], "en": [English TN outputs], "encode": [texts]}.
Applies what cosyvoice/cli/frontend.py's text_normalize does after its TN model (the TN itself needs
ttsfrd or WeTextProcessing, absent here, so the caller passes wetext's output) and encodes texts with
upstream's QwenTokenizer. Exits 3 when an upstream import fails.
"""
import json
import re
import sys
from functools import partial

try:
    import inflect
    from cosyvoice.tokenizer.tokenizer import get_qwen_tokenizer
    from cosyvoice.utils.frontend_utils import (is_only_punctuation, remove_bracket, replace_blank,
                                                replace_corner_mark, spell_out_number, split_paragraph)
except ImportError as error:
    print(f"reference import failed: {error}", file=sys.stderr)
    sys.exit(3)


def main(case_path: str, out_path: str) -> None:
    with open(case_path, encoding="utf-8") as f:
        case = json.load(f)
    tokenizer = get_qwen_tokenizer(token_path=case["tokenizer_dir"], skip_special_tokens=True)
    encode = partial(tokenizer.encode, allowed_special="all")
    inflect_parser = inflect.engine()

    def zh_steps(text):  # frontend.py, Chinese branch after zh_tn_model.normalize
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        text = re.sub(r'[，,、]+$', '。', text)
        pieces = split_paragraph(text, encode, "zh", token_max_n=80, token_min_n=60, merge_len=20, comma_split=False)
        return text, [p for p in pieces if not is_only_punctuation(p)]

    def en_steps(text):  # English branch after en_tn_model.normalize
        text = spell_out_number(text, inflect_parser)
        pieces = split_paragraph(text, encode, "en", token_max_n=80, token_min_n=60, merge_len=20, comma_split=False)
        return text, [p for p in pieces if not is_only_punctuation(p)]

    result = {
        "zh": [zh_steps(text) for text in case["zh"]],
        "en": [en_steps(text) for text in case["en"]],
        "encode": [encode(text) for text in case["encode"]],
        "tokenizer_length": len(tokenizer.tokenizer),
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:3])
