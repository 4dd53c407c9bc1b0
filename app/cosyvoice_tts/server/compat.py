"""Helpers shared by the drop-in protocols (``dashscope``, ``openai_speech``)."""

from __future__ import annotations

from typing import Any


def registered_voices(engine: Any) -> set[str]:
    """Zero-shot voices registered on the engine (``--voices-dir``); empty for engines without them."""
    reg = getattr(engine, "registered", None)
    return set(reg) if isinstance(reg, dict) else set()


def pick_mode(engine: Any, voice: str, instruction: str | None) -> str:
    """The engine mode for a voice: ``instruct2`` with an instruction, ``zero_shot`` for a registered (cloned)
    voice, ``sft`` for a built-in speaker."""
    if instruction:
        return "instruct2"
    if voice in registered_voices(engine):
        return "zero_shot"
    return "sft"


def unknown_voice_message(engine: Any, voice: str) -> str | None:
    """None when ``voice`` is known to the engine; else a message that lists the voices."""
    voices = list(engine.voices())
    if voice in voices:
        return None
    shown = ", ".join(voices[:40]) + (" ..." if len(voices) > 40 else "")
    return f"unknown voice {voice!r}; available: {shown}"


def billed_characters(text: str) -> int:
    """Characters as the cloud CosyVoice service bills them: a CJK ideograph counts 2, anything else 1."""
    n = 0
    for ch in text:
        o = ord(ch)
        if (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x20000 <= o <= 0x3134F):
            n += 2
        else:
            n += 1
    return n
