"""Runs flow + HiFT batches beside the LM steps, so LM steps never wait for them. Two placements:

- "thread": a Python thread of its own runs each batch (on its own low-priority CUDA stream). A vocoder batch
  costs tens to hundreds of milliseconds while an LM step costs a few; run in line, every stream's next token
  would wait for other streams' audio. But the two threads share the GIL: each of the vocoder's few hundred
  torch calls per batch releases it, and taking it back from the LM loop (or the loop taking it back) can wait
  a switch interval, so under load both slow down.
- "overlap": the engine loop itself launches each batch's kernels on the vocoder stream (between launching an
  LM step and reading its result back, see `Engine._lm_decode`) and picks up the audio once the GPU is done with
  it, while it goes on stepping the LM. One Python thread does all the host work, so nothing waits for the GIL;
  the GPU still runs both stages side by side. A batch is launched in two stages: the flow when it is handed
  over, HiFT at a later step once the flow is done (`advance`), so that no launch waits behind the sampler. A
  helper thread only waits for each stage's completion event (without the GIL) to wake the loop when it has
  nothing else to do. The flow sampler's graph replays (ten per batch, each about a millisecond of host time)
  are launched by a thread of their own (`ReplayLauncher`): a replay releases the GIL, so the loop goes on
  stepping the LM meanwhile.

Either way the engine hands a batch over when the vocoder is idle and collects the results at its next step;
at most one batch is in flight, so the batch grows with the load.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from .token2wav import FlowLaunched, Token2Wav, VocodedBatch

log = logging.getLogger(__name__)

VOCODER_MODES = ("thread", "overlap")


def check_mode(mode: str) -> None:
    if mode not in VOCODER_MODES:
        raise ValueError(f"vocoder_mode must be one of {', '.join(VOCODER_MODES)}, not {mode!r}")


def on_stream(stream: torch.cuda.Stream | None):
    """Work queued in the block goes on `stream` (None: the CPU, or the current stream)."""
    return torch.cuda.stream(stream) if stream is not None else nullcontext()


def make_vocoder(mode: str, token2wav: Token2Wav, device: torch.device, on_done,
                 stream: torch.cuda.Stream | None = None) -> "VocoderWorker | OverlappedVocoder":
    check_mode(mode)
    worker = VocoderWorker if mode == "thread" else OverlappedVocoder
    return worker(token2wav, device, on_done, stream)


class _Vocoder:
    """What both placements share: the stream, the batch as the engine hands it over, its outcome."""

    mode = ""
    stage_due = False  # overlap only: a launched batch's next stage waits to be launched (`advance`)

    def __init__(self, token2wav: Token2Wav, device: torch.device, on_done, stream: torch.cuda.Stream | None = None):
        self.token2wav = token2wav
        self.device = device
        self.on_done = on_done  # called (from any thread) once a batch's results can be taken: wakes the loop
        # `stream`: the vocoder's SM partition (sm_partition.py), where its graphs were captured
        self.stream = stream if stream is not None else torch.cuda.Stream(device) if device.type == "cuda" else None
        self.busy_s = 0.0  # from each batch's launch to its audio on the host, for the engine's counters

    def _on_stream(self):
        return on_stream(self.stream)

    def advance(self) -> None:
        pass

    @staticmethod
    def _items(batch: list) -> list:
        """The engine's [(request, state, chunk, generator)] as Token2Wav's [(state, chunk, generator)]."""
        return [(state, chunk, gen) for _, state, chunk, gen in batch]

    @staticmethod
    def _outcome(batch: list, audios: list | None, error: Exception | None) -> list:
        if error is not None:
            return [(request, state, None, error) for request, state, _, _ in batch]
        return [(request, state, audio, None) for (request, state, _, _), audio in zip(batch, audios)]


class VocoderWorker(_Vocoder):
    """The "thread" placement (see the module doc)."""

    mode = "thread"

    def __init__(self, token2wav: Token2Wav, device: torch.device, on_done, stream: torch.cuda.Stream | None = None):
        super().__init__(token2wav, device, on_done, stream)
        self._jobs: deque = deque()
        self._results: deque = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
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
                with self._on_stream():
                    launched = self.token2wav.launch_batch(self._items(batch))
                outcome = self._outcome(batch, launched.result(), None)
            except Exception as exc:  # reported per request by the engine; the worker thread lives on
                log.exception("vocoder batch failed")
                outcome = self._outcome(batch, None, exc)
            self.busy_s += time.perf_counter() - started
            with self._cond:
                self._results.extend(outcome)
                self._busy = bool(self._jobs)
            self.on_done()


class ReplayLauncher:
    """Launches queued CUDA graph replays on a stream, in order, from a thread of its own, then marks each job's
    end (`FlowLaunched.record`, on that stream). The engine loop queues a job only after every kernel the
    replays read, on the same stream, so stream order keeps them right; and it reads their outputs only once
    the job's event has fired."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream | None):
        self.device = device
        self.stream = stream
        self.busy_s = 0.0  # host time spent launching, for the engine's counters
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cosyvoice-vocoder-replays", daemon=True)
        self._thread.start()

    def submit(self, replays: list, launched) -> None:
        self._jobs.put((replays, launched))

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        on_gpu = self.device.type == "cuda"
        with torch.cuda.device(self.device) if on_gpu else nullcontext(), on_stream(self.stream):
            while (job := self._jobs.get()) is not None:
                replays, launched = job
                started = time.perf_counter()
                try:
                    for replay in replays:
                        replay()
                except Exception as exc:  # the batch fails, reported by the engine; the thread lives on
                    log.exception("launching a vocoder graph failed")
                    launched.fail(exc)
                else:
                    launched.record()
                self.busy_s += time.perf_counter() - started


class OverlappedVocoder(_Vocoder):
    """The "overlap" placement (see the module doc): every method but the watcher runs on the engine loop's
    thread."""

    mode = "overlap"

    def __init__(self, token2wav: Token2Wav, device: torch.device, on_done, stream: torch.cuda.Stream | None = None):
        super().__init__(token2wav, device, on_done, stream)
        # (batch, FlowLaunched then VocodedBatch, launch time)
        self._in_flight: tuple[list, FlowLaunched | VocodedBatch, float] | None = None
        self._done: list = []  # outcomes to take: failed launches, and the batch once its audio is in
        self._launched: queue.SimpleQueue = queue.SimpleQueue()
        self._watcher = threading.Thread(target=self._watch, name="cosyvoice-vocoder-done", daemon=True)
        self._watcher.start()
        self.launcher = ReplayLauncher(device, self.stream) if self.stream is not None else None
        self.replays_apart = self.launcher is not None  # False: the loop launches the replays itself

    @property
    def idle(self) -> bool:
        return self._in_flight is None

    @property
    def stage_due(self) -> bool:
        """The batch's flow is done and its HiFT waits to be launched (`advance`)."""
        flight = self._in_flight
        return flight is not None and isinstance(flight[1], FlowLaunched) and self._guarded(flight, flight[1].ready)

    def submit(self, batch: list) -> None:
        started = time.perf_counter()
        try:
            with self._on_stream():
                launched = self.token2wav.launch_flow(self._items(batch),
                                                      self.launcher if self.replays_apart else None)
        except Exception as exc:  # reported per request by the engine, as the thread placement does
            log.exception("vocoder batch failed")
            self._done.extend(self._outcome(batch, None, exc))
            self.on_done()
            return
        self._in_flight = (batch, launched, started)
        self._launched.put(launched)

    def advance(self) -> None:
        """Launch the in-flight batch's HiFT if its flow is done."""
        if not self.stage_due:
            return
        batch, flow, started = self._in_flight
        try:
            with self._on_stream():
                vocoded = flow.launch_vocoder()
        except Exception as exc:
            self._fail_in_flight(exc)
            return
        self._in_flight = (batch, vocoded, started)
        self._launched.put(vocoded)

    def take_results(self) -> list:
        flight = self._in_flight
        if flight is not None and isinstance(flight[1], VocodedBatch) and self._guarded(flight, flight[1].ready):
            try:
                outcome = self._outcome(flight[0], flight[1].result(), None)
            except Exception as exc:  # a failed kernel shows here: those requests fail, the loop goes on
                self._fail_in_flight(exc)
            else:
                self._in_flight = None
                self.busy_s += time.perf_counter() - flight[2]
                self._done.extend(outcome)
        results, self._done = self._done, []
        return results

    def _guarded(self, flight, check) -> bool:
        """`check()`, with a device error failing the batch in flight (and answering False)."""
        try:
            return check()
        except Exception as exc:
            self._fail_in_flight(exc, flight)
            return False

    def _fail_in_flight(self, exc: Exception, flight=None) -> None:
        log.error("vocoder batch failed: %r", exc)
        flight = flight or self._in_flight
        if flight is not None and flight is self._in_flight:
            self._in_flight = None
            self.busy_s += time.perf_counter() - flight[2]
            self._done.extend(self._outcome(flight[0], None, exc))
            self.on_done()

    def stop(self) -> None:
        self._launched.put(None)
        self._watcher.join(timeout=30)
        if self.launcher is not None:
            self.launcher.stop()

    def _watch(self) -> None:
        while (launched := self._launched.get()) is not None:
            try:
                launched.wait()  # without the GIL
            except RuntimeError:  # a failed kernel: the loop's own checks report it
                log.exception("waiting for a vocoder batch failed")
            self.on_done()
