"""Write a small, working Qwen2-style tokenizer directory (for random model directories and tests).

The release's `CosyVoice-BlankEN/` holds Qwen2's byte-level BPE tokenizer (151,643 merges-based tokens,
then `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`). We cannot ship that vocabulary, so we train a small
byte-level BPE with the `tokenizers` library using Qwen2's exact pipeline (NFC, Qwen2's split regex,
byte-level mapping) on a built-in Chinese/English corpus, and lay it out as Qwen2 does: BPE ids first,
the three special tokens right after them. Every string still tokenizes (byte-level alphabet), and
`AutoTokenizer.from_pretrained` loads it as `Qwen2Tokenizer` in transformers 4.x and 5.x with equal ids.

No `config.json` is written: the model writer puts the Qwen2 model config into the same directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# Qwen2's pre-tokenisation regex (its tokenizer.json): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's special tokens, in id order after the BPE vocabulary
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_MODEL_MAX_LENGTH = 32768

DEFAULT_VOCAB_SIZE = 1024

# Training text written for this purpose: everyday Chinese and English sentences with numbers and the
# punctuation the normaliser leaves, so common words and characters become single tokens.
_CORPUS = """
今天天气很好，我们一起去公园散步吧。
你好，欢迎使用语音合成服务，请问有什么可以帮您？
这家餐厅的菜味道不错，价格也比较合理。
明天上午九点，我们在会议室讨论下一季度的计划。
他每天早上六点起床，先跑步半小时，然后吃早饭。
请把窗户关上，外面的风太大了。
我最近在读一本关于历史的书，内容非常有意思。
火车晚点了二十分钟，大家都在站台上等着。
孩子们在操场上踢足球，笑声传得很远。
这个问题有点复杂，我需要再想一想。
春天来了，路边的花都开了，空气里有淡淡的香味。
感谢您的耐心等待，您的订单已经发货了。
请在提示音之后留言，我们会尽快给您回电话。
北京是中国的首都，也是一座有三千多年历史的城市。
下雨的时候记得带伞，不要着凉了。
妈妈做的红烧肉是我最喜欢的一道菜。
学习一门新的语言需要时间和耐心。
我们的产品支持中文和英文两种语言。
周末我打算去图书馆借几本小说。
医生说他需要多喝水，早点休息。
这首歌的旋律很优美，我听了很多遍。
飞机将在二十分钟后降落，请系好安全带。
他说：“我一定会按时完成任务的！”
人工智能正在改变我们生活和工作的方式。
这座桥全长一千二百米，是城市的重要交通要道。
我们应该节约用水，保护环境。
昨天晚上的电影特别感人，很多观众都哭了。
老师耐心地回答了每一个同学的问题。
欢迎大家来到我们的直播间，今天给大家介绍几款新产品。
如果您需要帮助，请随时联系我们的客服人员。
Hello, welcome to our text to speech service. How can I help you today?
The weather is lovely this morning, so we decided to walk to the station.
Please leave a message after the tone and we will call you back as soon as possible.
She has been learning to play the piano for three years.
The meeting starts at nine o'clock, so don't be late.
I think this is the best book I've read all year.
Thank you for your patience; your order has been shipped.
The train was twenty minutes late, and everyone waited on the platform.
Our new model supports both Chinese and English speech.
It's important to drink enough water and get plenty of sleep.
He said, "I'll finish the report by Friday afternoon."
The museum is open from ten in the morning until six in the evening.
Could you please turn the volume down a little?
We're going to the mountains for the weekend, weather permitting.
Artificial intelligence is changing the way we live and work.
The children were playing football in the park while their parents talked.
Reading every day helps you learn new words and ideas.
The bridge is one thousand two hundred meters long.
They'd already left when we arrived at the restaurant.
If you need any help, feel free to contact our support team.
The quick brown fox jumps over the lazy dog.
Numbers like 1, 2, 3, 42 and 2024 appear in text as well.
What time is it? It's a quarter past seven!
Good morning, everyone. Let's get started with today's lesson.
"""


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the byte-level BPE on the built-in corpus and append Qwen2's special tokens."""
    tokenizer = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    # added after training so they sit right after the BPE ids, as in Qwen2
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN2_SPECIAL_TOKENS])
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {}
    for token in QWEN2_SPECIAL_TOKENS:
        added[str(tokenizer.token_to_id(token))] = {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN2_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": QWEN2_MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_dir(path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE) -> int:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json into `path`.

    vocab_size is the size of the BPE vocabulary (256 bytes plus merges); the built-in corpus yields at
    most about 1,600, so larger values stop short of it. Returns the number of ids in the written tokenizer
    (BPE vocabulary plus Qwen2's three special tokens). CosyVoice's frontend adds its own special tokens
    after these (`engine.frontend.COSYVOICE_SPECIAL_TOKENS`), so a text embedding must cover more ids.
    """
    if vocab_size < 256 + 1:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt, for slow-tokenizer loaders
    with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(tokenizer), f, ensure_ascii=False, indent=2)
    return tokenizer.get_vocab_size(with_added_tokens=True)
