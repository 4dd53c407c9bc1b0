"""Errors the engine reports to its callers, each with a stable code the worker passes on."""
from __future__ import annotations


class EngineError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class UnknownVoiceError(EngineError):
    def __init__(self, voice: str, known: list[str]):
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        super().__init__("unknown_voice", f"unknown voice {voice!r}; available: {shown}")


class CapacityError(EngineError):
    def __init__(self, limit: int):
        super().__init__("capacity", f"all {limit} sessions of this engine are in use")


class InvalidRequestError(EngineError):
    def __init__(self, message: str):
        super().__init__("invalid_request", message)
