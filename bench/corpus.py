"""The bench's built-in texts (Chinese and English, short to long), text files, and LLM-like fragments."""

from __future__ import annotations

import random
import re
from pathlib import Path

# Written for this bench. Mixed lengths on purpose: short replies, typical sentences, and paragraphs that
# need several segments, so first-chunk latency and RTF are not measured on one length only.
BUILTIN: list[tuple[str, str]] = [
    # Chinese, short
    ("zh", "你好，请问有什么可以帮您？"),
    ("zh", "好的，马上为您处理。"),
    ("zh", "今天北京晴，最高气温二十三度。"),
    ("zh", "您的订单已经发货了。"),
    ("zh", "请稍等，我正在查询。"),
    ("zh", "没问题，明天上午九点见。"),
    # Chinese, medium
    ("zh", "根据您提供的信息，这趟航班预计在下午三点四十分降落，比原计划晚了大约二十分钟。"),
    ("zh", "如果您需要修改收货地址，可以在订单详情页点击“修改地址”，提交后一般五分钟内生效。"),
    ("zh", "这款耳机支持主动降噪，单次充电可以连续播放三十个小时，配合充电盒还能再延长一倍。"),
    ("zh", "我们建议您每天保持七到八小时的睡眠，并在睡前一小时尽量避免使用手机和电脑。"),
    ("zh", "会议改到周四下午两点，地点在三楼的大会议室，请提前准备好季度销售数据。"),
    ("zh", "这道菜的关键在于火候：先用大火把油烧热，再放入葱姜蒜爆香，最后转小火慢炖。"),
    # Chinese, long
    ("zh", "人工智能语音合成技术在过去几年里发展得非常快。早期的系统听起来机械而生硬，"
           "而现在的模型已经能够根据上下文调整语气和停顿，甚至可以模仿特定说话人的音色。"
           "不过，在实时对话场景中，首包延迟和稳定性仍然是工程上最需要关注的两个指标。"),
    ("zh", "各位乘客请注意，开往上海虹桥的G一百零二次列车即将开始检票，请携带好您的随身物品，"
           "到八号检票口排队检票。列车停靠站台为十二站台，本次列车全程禁止吸烟，感谢您的配合，"
           "祝您旅途愉快。"),
    ("zh", "关于您咨询的退款问题，我这边已经帮您核实过了：商品在签收后七天内且未经使用的，"
           "可以申请无理由退货。退款会在仓库确认收货后的一到三个工作日内原路退回，"
           "如果是信用卡支付，到账时间可能还要再晚一到两天，请您留意银行的通知短信。"),
    ("zh", "春天到了，公园里的桃花和樱花陆续开放，吸引了很多市民前来踏青。有的人带着孩子放风筝，"
           "有的人坐在草地上野餐，还有一些摄影爱好者早早地架好了三脚架，等待最好的光线。"),
    # English, short
    ("en", "Hello! How can I help you today?"),
    ("en", "Sure, one moment please."),
    ("en", "Your package has been delivered."),
    ("en", "It's sunny in Seattle, with a high of 68 degrees."),
    ("en", "Thanks for calling, goodbye."),
    ("en", "I've set a timer for ten minutes."),
    # English, medium
    ("en", "Your flight to Denver is on time and will board from gate B twelve at four fifteen."),
    ("en", "To reset your password, open the settings page, choose security, and follow the link "
           "we send to your email address."),
    ("en", "The meeting has moved to Thursday at two in the afternoon, in the large conference room "
           "on the third floor."),
    ("en", "This recipe takes about forty minutes, and most of that time the sauce simply simmers "
           "on low heat."),
    ("en", "Based on the traffic right now, the fastest route avoids the bridge and should take "
           "about twenty five minutes."),
    ("en", "I found three Italian restaurants nearby that are open late; the closest one is a "
           "five minute walk away."),
    # English, long
    ("en", "Speech synthesis has improved a great deal over the last few years. Early systems sounded "
           "flat and robotic, while modern models adapt their rhythm and intonation to the context "
           "and can even imitate a particular speaker. In a live conversation, however, the delay "
           "before the first sound and the absence of gaps matter at least as much as quality."),
    ("en", "Here is a quick summary of your week: you have four meetings on Monday, a dentist "
           "appointment on Wednesday morning, and your sister's birthday dinner on Friday evening. "
           "The weather looks mostly dry, although light rain is expected on Thursday afternoon, "
           "so you may want to bring an umbrella to the office that day."),
    ("en", "Before you install the update, please make sure the device is charged to at least "
           "fifty percent and connected to a stable network. The installation usually takes ten to "
           "fifteen minutes, and the device will restart twice. Do not unplug it or turn it off "
           "until you see the welcome screen again."),
    ("en", "Thank you for your patience while we looked into this. The charge you noticed was a "
           "temporary authorization placed by the hotel when you checked in. It will disappear from "
           "your statement within three to five business days, and no money has actually left "
           "your account."),
    # mixed
    ("mix", "您可以在App的Settings页面里打开Dark Mode。"),
    ("mix", "明天的meeting改到下午三点，记得带上你的laptop和最新的report。"),
]


def builtin_texts(lang: str = "all") -> list[str]:
    """The built-in sentences, all or only ``zh`` / ``en`` / ``mix``."""
    if lang == "all":
        return [t for _, t in BUILTIN]
    texts = [t for lg, t in BUILTIN if lg == lang]
    if not texts:
        raise ValueError(f"no built-in texts for language {lang!r} (zh, en, mix or all)")
    return texts


def load_texts(path: str | Path) -> list[str]:
    """One text per line; blank lines and lines starting with '#' are skipped."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            texts.append(line)
    if not texts:
        raise ValueError(f"{path}: no texts (one per line; '#' starts a comment)")
    return texts


class TextPicker:
    """Deterministic text choice: request k of a run gets the same text for the same seed and corpus."""

    def __init__(self, texts: list[str], seed: int = 0):
        if not texts:
            raise ValueError("empty corpus")
        self.texts = list(texts)
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def next(self) -> str:
        # every text once per pass, each pass shuffled: all lengths appear even in short runs
        if not self._order:
            self._order = list(range(len(self.texts)))
            self._rng.shuffle(self._order)
        return self.texts[self._order.pop()]


_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_FRAGMENT_RE = re.compile(
    rf"\s*[{_CJK}]{{1,2}}"          # one or two Chinese characters, as LLM tokenizers often emit
    rf"|\s*[A-Za-z]+(?:'[A-Za-z]+)?"  # an English word with its leading space
    rf"|\s*[0-9]{{1,3}}"             # digits in groups of up to three
    rf"|\s*[^\sA-Za-z0-9{_CJK}]"     # one punctuation mark or symbol
    rf"|\s+",                        # trailing whitespace
)


def llm_fragments(text: str) -> list[str]:
    """Splits a text into pieces shaped like LLM output tokens; joined, they give the text back."""
    pieces = _FRAGMENT_RE.findall(text)
    if "".join(pieces) != text:  # cannot happen with the alternatives above; keep the contract anyway
        raise AssertionError("fragmenting lost characters")
    return pieces
