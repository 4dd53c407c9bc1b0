"""Runs flow + HiFT batches on their own thread (and CUDA stream) so LM steps never wait for them.

A vocoder batch costs tens to hundreds of milliseconds while an LM step costs a few; run in line, every stream's
next token would wait for other streams' audio. The engine hands a batch over when the worker is idle and
collects the results at its next step; at most one batch is in flight, so the batch grows with the load.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from .token2wav import Token2Wav

log = logging.getLogger(__name__)


class VocoderWorker:
    def __init__(self, token2wav: Token2Wav, device: torch.device, on_done, stream: torch.cuda.Stream | None = None):
        self.token2wav = token2wav
        self.device = device
        self.on_done = on_done  # called from the worker thread after each batch (the engine wakes its loop)
        # `stream`: the vocoder's SM partition (sm_partition.py), where its graphs were captured
        self.stream = stream if stream is not None else torch.cuda.Stream(device) if device.type == "cuda" else None
        self._jobs: deque = deque()
        self._results: deque = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self.busy_s = 0.0  # time spent in batches, for the engine's counters
        self._thread = threading.Thread(target=self._run, name="cosyvoice-vocoder", daemon=True)
        self._thread.start()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._busy and not self._jobs

    def submit(self, batch: list) -> None:
        """batch: [(request, state, chunk, generator)]."""
        with self._cond:
            self._busy = True
            self._jobs.append(batch)
            self._cond.notify()

    def take_results(self) -> list:
        with self._cond:
            results = list(self._results)
            self._results.clear()
        return results

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._stopping)
                if self._stopping:
                    return
                batch = self._jobs.popleft()
            started = time.perf_counter()
            try:
                with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                    audios = self.token2wav.run_batch([(state, chunk, gen) for _, state, chunk, gen in batch])
                outcome = [(request, state, audio, None) for (request, state, _, _), audio in zip(batch, audios)]
            except Exception as exc:  # reported per request by the engine; the worker thread lives on
                log.exception("vocoder batch failed")
                outcome = [(request, state, None, exc) for request, state, _, _ in batch]
            self.busy_s += time.perf_counter() - started
            with self._cond:
                self._results.extend(outcome)
                self._busy = bool(self._jobs)
            self.on_done()
