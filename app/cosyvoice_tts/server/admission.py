"""Admission control: at most ``max_sessions`` concurrent requests per worker, refused at once past that."""

from __future__ import annotations


class Admission:
    """Counts active requests. Single-threaded (used from the asyncio loop only)."""

    def __init__(self, max_sessions: int) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        self.max_sessions = max_sessions
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.max_sessions:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        if self.active <= 0:
            raise RuntimeError("Admission.release() without a matching acquire")
        self.active -= 1
