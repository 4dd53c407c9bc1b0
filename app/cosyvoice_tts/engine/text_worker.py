"""Text normalisation in a process of its own.

Normalising a sentence (`text.text_normalize`) spends most of its few milliseconds in wetext's FST tagging, one
C++ call that holds the GIL throughout. Run where requests are submitted, every arrival would stop the engine's
loop for that long: under load, new requests come in tens per second, and each stop delays every stream's next
LM step. In a worker process the submitting thread only waits for the answer, without the GIL.

The worker is `python -m cosyvoice_tts.engine.text_worker_main TOKENIZER_DIR`, one JSON line per text in and one
per answer out on its pipes: unlike a multiprocessing pool, it does not re-import the caller's main module.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

READY = "ready"


class TextNormalizer:
    """`text_normalize(text, split=True)` answered by a worker process; `fallback` (the same function in this
    process) answers once the worker is gone. Thread-safe: callers take turns."""

    def __init__(self, tokenizer_dir: str | Path, fallback):
        self.fallback = fallback
        package_root = str(Path(__file__).resolve().parents[2])  # where `cosyvoice_tts` is importable from
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "cosyvoice_tts.engine.text_worker_main", str(tokenizer_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8", env=env, bufsize=1)
        self._lock = threading.Lock()
        self._ready = False

    def _call(self, text: str) -> list[str]:
        if not self._ready:
            line = self._process.stdout.readline()
            if line.strip() != READY:
                raise BrokenPipeError("the text worker did not start")
            self._ready = True
        self._process.stdin.write(json.dumps(text) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise BrokenPipeError("the text worker exited")
        answer = json.loads(line)
        if "error" in answer:  # the text itself could not be normalised: as the in-process call would raise
            raise ValueError(answer["error"])
        return answer["pieces"]

    def normalize(self, text: str) -> list[str]:
        with self._lock:
            if self._process is not None:
                try:
                    return self._call(text)
                except (BrokenPipeError, OSError, json.JSONDecodeError):
                    log.exception("the text normalisation process is gone; normalising in the engine's process")
                    self._stop()
        return self.fallback(text)

    def warm(self) -> None:
        """Wait for the worker to load (a few seconds), so the first request does not."""
        self.normalize("warm up.")

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        process.stdout.close()


def serve(tokenizer_dir: str, stdin=sys.stdin, stdout=sys.stdout) -> None:
    from .frontend import QwenTextTokenizer
    from .text import text_normalize

    tokenizer = QwenTextTokenizer(tokenizer_dir)
    print(READY, file=stdout, flush=True)
    for line in stdin:
        try:
            answer = {"pieces": text_normalize(json.loads(line), tokenizer.encode, split=True)}
        except Exception as exc:  # this text fails, as it would in the caller's process; the worker goes on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), file=stdout, flush=True)

