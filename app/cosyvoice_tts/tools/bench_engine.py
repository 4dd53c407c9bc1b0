"""Benchmark the engine in-process: first-chunk latency, real-time factor, stalls, throughput, memory.

    python -m cosyvoice_tts.tools.bench_engine --model-dir DIR --device cuda:0 --dtype bf16 \
        --concurrency 1,8,16,32,48,64 --duration 20 [--unbatched] [--out results.json]

Each concurrency level runs N closed-loop users for --duration seconds: each user submits a whole-text streaming
request, reads its audio as it comes, and submits the next when it ends. Latency is from submission (the
whole text is known then, i.e. "after end of text"). A stall is time a listener playing from the first chunk
would have spent waiting: a chunk arriving after the audio before it had already played out.

Arrivals: by default ("staggered") the users start one after another, evenly over --ramp seconds, and only
requests submitted after the ramp count, so a level measures N streams in steady state. Every request here has
the same text and length, so users that start together stay in step: with "burst" (all start at once, every
request counted; the bench before 2026-11-28) a level measures N requests arriving at the same instant, again
and again, the worst case of N streams.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..engine import Engine, SynthesisParams
from ..engine import host_spans
from ..engine.errors import EngineError
from ..engine.scheduler import SchedulerConfig
from ..engine.vocoder_worker import VOCODER_MODES
from .host_profile import load_trace, summarize

TWENTY_WORDS = ("Thanks for calling, your order has shipped today and should arrive at your door "
                "within three business days, anything else?")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_request(engine: Engine, text: str, seed: int, voice: str) -> dict:
    submitted = time.monotonic()
    request = engine.submit(SynthesisParams(voice=voice, seed=seed, stream=True), text=text)
    arrivals, delivered, stall = [], 0.0, 0.0
    first = None
    for chunk in request:
        now = time.monotonic()
        if first is None:
            first = now
        else:
            played_until = first + delivered + stall
            if now > played_until:
                stall += now - played_until
        arrivals.append(now)
        delivered += chunk.size / engine.sample_rate
    end = time.monotonic()
    return {"first_chunk_ms": (first - submitted) * 1000 if first else None, "audio_s": delivered,
            "wall_s": end - submitted, "rtf": (end - submitted) / delivered if delivered else None,
            "stall_s": stall, "chunks": len(arrivals), "outcome": request.stats.outcome,
            **request.first_chunk_phases()}


ARRIVALS = ("staggered", "burst")  # see the module doc


def run_level(engine: Engine, users: int, duration: float, text: str, voice: str, arrivals: str = "staggered",
              ramp_s: float = 2.0) -> dict:
    """`duration` seconds of requests after the ramp (staggered) or from the start (burst); see the module doc."""
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")
    results: list[dict] = []
    warmup: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    ramp = ramp_s if arrivals == "staggered" else 0.0
    start = time.monotonic()
    measured_from = start + ramp
    deadline = measured_from + duration
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)

    def user(index: int) -> None:
        seed = index * 1000
        time.sleep(max(0.0, start + ramp * index / users - time.monotonic()))
        while time.monotonic() < deadline:
            seed += 1
            counted = time.monotonic() >= measured_from
            try:
                outcome = run_request(engine, text, seed, voice)
            except EngineError as exc:
                with lock:
                    errors.append(exc.code)
                time.sleep(0.05)
                continue
            with lock:
                (results if counted else warmup).append(outcome)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - measured_from
    firsts = [r["first_chunk_ms"] for r in results if r["first_chunk_ms"] is not None]
    audio = sum(r["audio_s"] for r in results)
    stalled = [r for r in results if r["stall_s"] > 0.05]
    summary = {
        "concurrency": users, "arrivals": arrivals, "requests": len(results), "warmup_requests": len(warmup),
        "errors": errors, "wall_s": round(wall, 2),
        "first_chunk_ms_p50": percentile(firsts, 50), "first_chunk_ms_p95": percentile(firsts, 95),
        "first_chunk_ms_max": max(firsts) if firsts else None,
        "rtf_p50": percentile([r["rtf"] for r in results if r["rtf"]], 50),
        "audio_s_per_wall_s": round(audio / wall, 2),
        "streams_with_stall": len(stalled), "stall_s_total": round(sum(r["stall_s"] for r in results), 3),
        "mean_audio_s": round(statistics.mean([r["audio_s"] for r in results]), 2) if results else None,
    }
    # Where the first chunk's time went (p50 of each part): LM tokens, wait for the vocoder, flow + HiFT.
    for part in ("lm", "queue", "vocoder"):
        key = f"first_chunk_{part}_ms"
        for q in (50, 95):
            summary[f"{key}_p{q}"] = percentile([r[key] for r in results if key in r], q)
    # The LM part in engine steps, and what each cost: the steps a request sat out, or a slow loop?
    steps = [r for r in results if r.get("first_chunk_lm_steps")]
    summary["first_chunk_lm_steps_p50"] = percentile([r["first_chunk_lm_steps"] for r in steps], 50)
    per_step = percentile([r["first_chunk_lm_ms"] / r["first_chunk_lm_steps"] for r in steps], 50)
    summary["first_chunk_lm_ms_per_step_p50"] = None if per_step is None else round(per_step, 2)
    if engine.device.type == "cuda":
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(engine.device) / 2**30, 2)
    return summary


@torch.inference_mode()
def check_flow_graphs(engine: Engine) -> float:
    """The graphed CFM sampler against the eager one on the same padded-bucket inputs (3 requests, 130 frames)."""
    graphed = engine.flow_graphs
    device, dtype = engine.device, graphed.dtype
    generator = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(3, 80, 130, generator=generator).to(device, dtype)
    cond = torch.randn(3, 80, 130, generator=generator).to(device, dtype)
    spks = torch.randn(3, 80, generator=generator).to(device, dtype)
    mask = torch.ones(3, 1, 130, device=device, dtype=dtype)
    flags = torch.tensor([True, True, False], device=device)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
        eager = graphed.inner(mu, mask, 10, spks=spks, cond=cond, streaming=flags)[0]
        replay = graphed(mu, mask, 10, spks=spks, cond=cond, streaming=flags)[0]
    return round(float((eager.float() - replay.float()).abs().max()), 6)


@torch.inference_mode()
def check_encoder_graphs(engine: Engine) -> float:
    """The whole flow (graphed encoder + graphed sampler) against eager encoding, 3 requests of 28-153 tokens."""
    flow, device = engine.flow, engine.device
    generator = torch.Generator(device="cpu").manual_seed(2)
    lengths = [28, 78, 153]
    tokens = torch.zeros(3, max(lengths), dtype=torch.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(0, 6561, (n,), generator=generator)
    inputs = dict(token=tokens.to(device), token_len=torch.tensor(lengths, device=device),
                  prompt_token=torch.zeros(3, 1, dtype=torch.int32, device=device),
                  prompt_token_len=torch.zeros(3, dtype=torch.long, device=device),
                  prompt_feat=torch.zeros(3, 0, 80, device=device),
                  prompt_feat_len=torch.zeros(3, dtype=torch.long, device=device),
                  embedding=torch.randn(3, 192, generator=generator).to(device),
                  streaming=[True, True, True], finalize=[False, False, True])
    dtype = engine.flow_graphs.dtype
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
        graphed = flow.inference_batch(**inputs)
        flow.encoder = engine.encoder_graphs.inner
        try:
            eager = flow.inference_batch(**inputs)
        finally:
            flow.encoder = engine.encoder_graphs
    return round(max(float((a - b).abs().max()) for a, b in zip(graphed, eager)), 6)


@torch.inference_mode()
def check_hift_graphs(engine: Engine) -> float:
    """Graphed HiFT against eager on the same 3 chunks (50, 108 and 208 frames, two with a source cache)."""
    device, hift = engine.device, engine.hift
    source = torch.Generator(device="cpu").manual_seed(1)
    mels = [torch.randn(1, 80, n, generator=source).to(device) for n in (50, 108, 208)]
    cache_len = engine.stream_config.source_cache_len
    caches = [None] + [torch.randn(1, 1, cache_len, generator=source).to(device) * 0.1 for _ in range(2)]

    def gens():
        return [torch.Generator(device).manual_seed(i) for i in range(3)]

    graphed = engine.hift_graphs.inference_batch(mels, caches, gens())
    eager = hift.inference_batch(mels, caches, gens())
    return round(max(float((a[0] - b[0]).abs().max()) for a, b in zip(graphed, eager)), 7)


@torch.inference_mode()
def check_prefill_graphs(engine: Engine) -> float:
    """A graphed one-request prefill against the eager one (same slot, same 40 text tokens): max abs diff of
    the log-probabilities."""
    runner = engine.runner
    slot = runner.cache.allocate()
    try:
        pieces = [("sos", []), ("text", list(range(100, 140))), ("task", [])]
        graphed = runner.extend(slot, 0, pieces)
        saved, runner.extend_graphs = runner.extend_graphs, {}
        try:
            eager = runner.extend(slot, 0, pieces)
        finally:
            runner.extend_graphs = saved
    finally:
        runner.cache.release(slot)
    return round(float((graphed - eager).abs().max()), 6)


@torch.inference_mode()
def check_decode_graphs(engine: Engine) -> float:
    """A graphed decode step of three requests (read back through the runner's pinned buffer) against the eager
    step on the same rows: max abs diff of the log-probabilities."""
    from ..engine.model_runner import DecodeRow

    runner = engine.runner
    slots = [runner.cache.allocate() for _ in range(3)]
    try:
        for slot in slots:
            runner.extend(slot, 0, [("sos", []), ("text", list(range(100, 120))), ("task", [])])
        rows = [DecodeRow(slot, 22, 5 + i) for i, slot in enumerate(slots)]
        graphed = [d.logp.clone() for d in runner.decode(rows)]
        saved, runner.graphs = runner.graphs, {}
        try:
            eager = [d.logp for d in runner.decode(rows)]
        finally:
            runner.graphs = saved
    finally:
        for slot in slots:
            runner.cache.release(slot)
    return round(max(float((a - b).abs().max()) for a, b in zip(graphed, eager)), 6)


@torch.inference_mode()
def check_batched_prefill(engine: Engine) -> float:
    """Three prompts prefilled in one captured batch against each alone: max abs diff of the log-probabilities."""
    runner = engine.runner
    prompts = [[("sos", []), ("text", list(range(start, start + n))), ("task", [])]
               for start, n in ((100, 40), (300, 12), (500, 25))]
    slots = [runner.cache.allocate() for _ in prompts]
    try:
        together = runner.extend_batch([(slot, 0, p) for slot, p in zip(slots, prompts)])
        alone = [runner.extend(slot, 0, p) for slot, p in zip(slots, prompts)]
    finally:
        for slot in slots:
            runner.cache.release(slot)
    return round(max(float((a - b).abs().max()) for a, b in zip(together, alone)), 6)


@contextmanager
def flow_setting(engine: Engine, paged, from_frames: int):
    """The vocoder's flow for the duration: `paged` (the engine's PagedFlow, or None: every chunk re-runs its
    prefix) from prefixes longer than `from_frames`; the engine's own setting again afterwards."""
    token2wav = engine.token2wav
    saved = token2wav.paged, token2wav.paged_from_frames
    token2wav.paged, token2wav.paged_from_frames = paged, from_frames
    try:
        yield
    finally:
        token2wav.paged, token2wav.paged_from_frames = saved


def check_paged_flow(engine: Engine, text: str = "", voice: str = "") -> float:
    """One streaming request with the incremental (paged) flow against the same request re-running each prefix
    (upstream's flow): max abs diff of the audio. Both use this engine's graphs."""
    text = text or TWENTY_WORDS
    voice = voice or engine.voices()[0]

    def synthesize():
        return engine.submit(SynthesisParams(voice=voice, seed=11, stream=True), text=text).audio()

    with flow_setting(engine, engine.paged_flow, 0):  # paged from the second chunk
        paged_audio = synthesize()
    with flow_setting(engine, None, engine.token2wav.paged_from_frames):
        rerun_audio = synthesize()
    if paged_audio.shape != rerun_audio.shape:
        raise AssertionError(f"audio lengths differ: {paged_audio.shape} vs {rerun_audio.shape}")
    return round(float(abs(paged_audio - rerun_audio).max()), 7)


def batch_invariance(engine: Engine, text: str, voice: str, others: int) -> dict:
    """The issue's "same seed, same output alone or batched" on this device: one request alone, then the same
    request among `others` concurrent ones (other seeds); compares speech-token counts and audio."""
    def submit(seed: int):
        return engine.submit(SynthesisParams(voice=voice, seed=seed, stream=True), text=text)

    alone = submit(7)
    alone_audio = alone.audio()
    crowd = [submit(7)] + [submit(1000 + i) for i in range(others)]
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i, r=r: results.__setitem__(i, r.audio())) for i, r in enumerate(crowd)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched_audio = results[0]
    same_shape = batched_audio.shape == alone_audio.shape
    return {"others": others,
            "speech_tokens_alone": alone.summary["speech_tokens"],
            "speech_tokens_batched": crowd[0].summary["speech_tokens"],
            "audio_same_length": same_shape,
            "audio_max_abs_diff": round(float(abs(batched_audio - alone_audio).max()), 7) if same_shape else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timed:
    """Wraps a callable to add its synchronised wall time to `totals[name]` (stage timing only)."""

    def __init__(self, fn, name: str, totals: dict, device: torch.device):
        self.fn, self.name, self.totals, self.device = fn, name, totals, device

    def __call__(self, *args, **kwargs):
        _sync(self.device)
        started = time.perf_counter()
        out = self.fn(*args, **kwargs)
        _sync(self.device)
        self.totals[self.name] = self.totals.get(self.name, 0.0) + (time.perf_counter() - started) * 1000
        return out


@torch.inference_mode()
def vocoder_stage_times(engine: Engine, voice: str, shapes: list[tuple[int, int, bool]],
                        repeats: int = 5) -> list[dict]:
    """ms per vocoder batch and per stage (flow encoder, CFM sampler, HiFT) for (batch, speech tokens, last)
    shapes, run through `Token2Wav.run_batch`: each item the first chunk of a fresh stream of that many tokens, or
    with `last` the final chunk of such a stream after its earlier chunks (untimed). With the incremental flow,
    every shape is timed twice: with it from each stream's first chunk on ("paged"; a batch of one re-runs its first
    chunk, see Token2Wav._paged_row), and with each prefix re-run ("rerun")."""
    from ..engine.voices import voice_prompt

    prompt = voice_prompt("sft", engine._voice(voice), engine._tokenize, None)
    flow, token2wav = engine.flow, engine.token2wav
    hift = token2wav.hift  # the graphed wrapper when there is one
    totals: dict[str, float] = {}
    # Instance attributes shadow the methods for this run only (deleted again below).
    patched = ((flow.encoder, "encode", "encoder"), (flow.decoder, "forward", "sampler"),
               (hift, "inference_batch", "hift"))
    if engine.paged_flow is not None:
        patched += ((engine.paged_flow, "sample", "sampler"),)
    for module, method, name in patched:
        setattr(module, method, _Timed(getattr(module, method), name, totals, engine.device))
    modes = {"paged": (engine.paged_flow, 0), "rerun": (None, token2wav.paged_from_frames)}
    if engine.paged_flow is None:
        del modes["paged"]
    rows = []
    try:
        for mode, setting in modes.items():
            with flow_setting(engine, *setting):
                for batch, tokens, last in shapes:
                    rows.append({"flow": mode, "batch": batch, "tokens": tokens, "chunk": "last" if last else "first",
                                 **_stage_ms(engine, prompt, totals, batch, tokens, last, repeats)})
                    print(json.dumps({"vocoder_stage_ms": rows[-1]}), flush=True)
    finally:
        for module, method, _ in patched:
            delattr(module, method)
    return rows


def _stage_ms(engine: Engine, prompt, totals: dict, batch: int, tokens: int, last: bool, repeats: int) -> dict:
    """One shape of `vocoder_stage_times`: a warm-up, then `repeats` timed batches; ms per batch by stage."""
    from ..engine.token2wav import StreamState

    token2wav = engine.token2wav
    generator = torch.Generator().manual_seed(batch * 7919 + tokens)
    for attempt in range(repeats + 1):
        if attempt == 1:
            totals.clear()  # the first run of a shape is a warm-up
        states = []
        for _ in range(batch):
            state = StreamState(prompt.flow_prompt_speech, prompt.prompt_feat, prompt.embedding, stream=True,
                                speed=1.0, cfg=engine.stream_config)
            state.tokens = torch.randint(0, 6561, (tokens,), generator=generator).tolist()
            if last:
                state.lm_done = True
            else:
                state.hop = tokens - engine.stream_config.pre_lookahead_len
            states.append(state)

        def items():
            return [(s, s.next_chunk(), torch.Generator(engine.device).manual_seed(attempt)) for s in states]

        batch_items = items()
        saved = dict(totals)
        while last and not batch_items[0][1].finalize:  # the earlier chunks, untimed
            token2wav.run_batch(batch_items)
            batch_items = items()
        totals.clear()
        totals.update(saved)
        _sync(engine.device)
        started = time.perf_counter()
        token2wav.run_batch(batch_items)
        _sync(engine.device)
        if attempt:
            totals["total"] = totals.get("total", 0.0) + (time.perf_counter() - started) * 1000
        for state in states:
            token2wav.forget(state)  # the streams end here: their flow memory goes back
    return {k: round(v / repeats, 1) for k, v in totals.items()}


def parse_stage_shapes(text: str) -> list[tuple[int, int, bool]]:
    """"1x28,16x253L" -> [(1, 28, False), (16, 253, True)]: batch x tokens, L for a stream's last chunk."""
    shapes = []
    for item in filter(None, text.split(",")):
        last = item.upper().endswith("L")
        batch, tokens = item.rstrip("Ll").split("x")
        shapes.append((int(batch), int(tokens), last))
    return shapes


DEFAULT_SWITCH_INTERVAL_S = 0.005  # Python's own, against the 0.1 ms the engine's loop sets


@dataclass(frozen=True)
class LevelRun:
    users: int
    flow: str  # "paged" (from the engine's switch point) or "rerun" (every chunk re-runs its prefix)
    batch_prefill: bool = True
    arrivals: str = "staggered"
    switch_interval: float | None = None  # the GIL switch interval for the level; None: as the engine set it
    scheduling: str | None = None  # vocoder policies for the level (see scheduling_config); None: the engine's
    vocoder: str | None = None  # the vocoder's placement (engine/vocoder_worker.py); None: the engine's
    settings: tuple[tuple[str, float], ...] = ()  # SchedulerConfig fields set for the level (parse_vocoder_levels)


SCHEDULING = {"none": (False, False), "fit": (True, False), "hold": (False, True), "fit+hold": (True, True)}
FLOWS = ("paged", "rerun")  # LevelRun.flow


def scheduling_config(config: SchedulerConfig, policy: str) -> SchedulerConfig:
    """`config` with the vocoder policies named (scheduler.py): "none", "fit", "hold" or "fit+hold"."""
    if policy not in SCHEDULING:
        raise ValueError(f"scheduling must be one of {', '.join(SCHEDULING)}, not {policy!r}")
    fit, hold = SCHEDULING[policy]
    return replace(config, fit_batches=fit,
                   hold_ahead_s=(config.hold_ahead_s or SchedulerConfig.hold_ahead_s) if hold else None)


def parse_named_levels(text: str, names, what: str = "POLICY") -> list[tuple[int, str]]:
    """"32:none,32:fit" -> [(32, "none"), (32, "fit")], each name one of `names`."""
    runs = []
    for item in filter(None, text.split(",")):
        users, _, name = item.partition(":")
        if name not in names:
            raise ValueError(f"{item!r}: expected LEVEL:{what} with {what} one of {', '.join(names)}")
        runs.append((int(users), name))
    return runs


# Settings of the overlap placement's vocoder a level may set (besides SchedulerConfig's): 0 or 1.
VOCODER_SETTINGS = ("replays_apart",)
# text_worker=0: the level's texts are normalised in the submitting threads, not the engine's worker process.
# prefill_with_decode=0: a step's prefill is waited for before its decode is launched (Engine.prefill_with_decode).
ENGINE_SETTINGS = ("text_worker", "prefill_with_decode")


def parse_vocoder_levels(text: str) -> list[tuple[int, str, tuple[tuple[str, float], ...]]]:
    """"32:thread,32:overlap:hold_ahead_s=0.5" -> [(32, "thread", ()), (32, "overlap", (("hold_ahead_s", 0.5),))]:
    LEVEL:PLACEMENT, then any number of :FIELD=VALUE: numeric or yes/no (0/1) fields of SchedulerConfig,
    VOCODER_SETTINGS or ENGINE_SETTINGS, set for that level."""
    numeric = {f.name for f in fields(SchedulerConfig)
               if f.type in ("int", "float", "float | None", "int | None", "bool")} | set(VOCODER_SETTINGS) \
        | set(ENGINE_SETTINGS)
    runs = []
    for item in filter(None, text.split(",")):
        users, placement, *assignments = item.split(":")
        if placement not in VOCODER_MODES:
            raise ValueError(f"{item!r}: expected LEVEL:PLACEMENT[:FIELD=VALUE...] with PLACEMENT one of "
                             f"{', '.join(VOCODER_MODES)}")
        settings = []
        for assignment in assignments:
            name, _, value = assignment.partition("=")
            if name not in numeric or not value:
                raise ValueError(f"{item!r}: {assignment!r} is not FIELD=VALUE of a numeric scheduler setting "
                                 f"({', '.join(sorted(numeric))})")
            settings.append((name, float(value)))
        runs.append((int(users), placement, tuple(settings)))
    return runs


def level_config(config: SchedulerConfig, settings: tuple[tuple[str, float], ...]) -> SchedulerConfig:
    """`config` with a level's settings (those of SchedulerConfig), each in its field's type."""
    types = {f.name: f.type for f in fields(SchedulerConfig)}
    convert = {"int": int, "bool": bool}
    return replace(config, **{name: convert.get(types[name].split(" ")[0], float)(value)
                              for name, value in settings if name in types})


def parse_scheduling_levels(text: str) -> list[tuple[int, str]]:
    return parse_named_levels(text, SCHEDULING)


def profile_level(engine: Engine, users: int, duration: float, text: str, voice: str, ramp_s: float,
                  seconds: float, trace: Path | None) -> tuple[dict, dict]:
    """One level with torch.profiler on for `seconds` once the level is in steady state (after the ramp and a
    second); the engine's host spans are on only meanwhile. Returns (level summary, host_profile.summarize of
    the window). The profiler slows the host: the level's own numbers are not comparable with the others'."""
    holder: dict = {}
    worker = threading.Thread(target=lambda: holder.update(summary=run_level(engine, users, duration, text, voice,
                                                                             ramp_s=ramp_s)), daemon=True)
    worker.start()
    time.sleep(ramp_s + 1.0)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:  # the engine's loop is not the thread that starts the profiler; syncs shown where CUDA can show them
        config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True, enable_cuda_sync_events=True)
    except TypeError as exc:
        raise SystemExit(f"--profile-level needs a torch whose profiler records every thread: {exc}") from exc
    host_spans.enable(True)
    try:
        with torch.profiler.profile(activities=activities, experimental_config=config) as prof:
            time.sleep(seconds)
    finally:
        host_spans.enable(False)
    path = trace or Path(f"/tmp/bench_engine_trace_{os.getpid()}.json")
    prof.export_chrome_trace(str(path))
    window = summarize(load_trace(path))
    if trace is None:
        path.unlink()
    worker.join()
    return holder["summary"], window


def parse_levels(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--max-sessions", type=int, default=0, help="default: the largest concurrency")
    parser.add_argument("--unbatched", action="store_true",
                        help="the per-request path: one request's LM step at a time, eager, no CUDA graphs")
    parser.add_argument("--text", default=TWENTY_WORDS)
    parser.add_argument("--voice", default="英文女")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--check-batch-invariance", type=int, default=0, metavar="N",
                        help="before the levels: one request alone vs the same request among N others")
    parser.add_argument("--eager-kernels", action="store_true",
                        help="no compiled elementwise kernels (the default compiles them on a GPU)")
    parser.add_argument("--flow-memory-gib", type=float, default=None,
                        help="the incremental flow's memory pool (0: every chunk re-runs its prefix, as upstream); "
                             "default: sized from the memory fraction, 0 with --unbatched")
    parser.add_argument("--paged-from-frames", type=int, default=None,
                        help="prefix length (mel frames) from which a stream's flow keeps its memory (engine default)")
    parser.add_argument("--paged-graph-past-pages", type=int, default=None,
                        help="the longest past (pages) with incremental flow graphs captured at start "
                             "(default: all; longer pasts run eagerly)")
    parser.add_argument("--lm-sms", type=int, default=None,
                        help="SMs kept for the LM alone, the vocoder getting the rest (engine/sm_partition.py); "
                             "default: both share the whole GPU")
    parser.add_argument("--single-prefill-levels", default="",
                        help="after the levels, these concurrencies again with requests that arrive together "
                             "prefilled one at a time (as before batched prefill), same engine")
    parser.add_argument("--rerun-levels", default="",
                        help="after the levels, these concurrencies again with every chunk re-running its prefix "
                             "(upstream's flow), same engine, for side-by-side ratios")
    parser.add_argument("--arrivals", default="staggered", choices=ARRIVALS,
                        help="staggered: users start evenly over --ramp and requests count after it; burst: all "
                             "start at once and every request counts (see the module doc)")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds over which staggered users start")
    parser.add_argument("--burst-levels", default="",
                        help="after the levels, these concurrencies again with every user starting at once")
    parser.add_argument("--default-switch-levels", default="",
                        help="after the levels, these concurrencies again with Python's default GIL switch interval "
                             "(5 ms) instead of the engine's 0.1 ms: how much the LM loop and the vocoder thread "
                             "wait on each other for the GIL")
    parser.add_argument("--scheduling-levels", default="",
                        help="after the levels, LEVEL:POLICY runs with the vocoder policies of scheduler.py set: "
                             "none, fit, hold or fit+hold (e.g. 32:none,32:fit)")
    parser.add_argument("--flow-levels", default="",
                        help="after the levels, LEVEL:FLOW runs with the flow paged or re-running every prefix, in "
                             "the order given (e.g. 32:paged,32:rerun,32:paged,32:rerun: interleaved rounds)")
    parser.add_argument("--vocoder", default=None, choices=VOCODER_MODES,
                        help="where the vocoder's host work runs (engine/vocoder_worker.py); default: the engine's")
    parser.add_argument("--vocoder-levels", default="",
                        help="after the levels, LEVEL:PLACEMENT[:FIELD=VALUE...] runs with the vocoder placed as "
                             "named (thread, overlap) and scheduler settings changed, in the order given "
                             "(e.g. 32:thread,32:overlap,32:overlap:hold_ahead_s=0.5)")
    parser.add_argument("--stage-times", default="",
                        help="vocoder stage timing before the levels, e.g. 1x28,16x28,16x253L (batch x tokens; "
                             "L: the last chunk of a stream that long, after its earlier chunks)")
    parser.add_argument("--profile-level", type=int, default=0, metavar="N",
                        help="after the levels, N streams again with torch.profiler on for --profile-seconds: the "
                             "engine's host time by span, CUDA runtime call and torch op (tools/host_profile.py)")
    parser.add_argument("--profile-seconds", type=float, default=2.0)
    parser.add_argument("--profile-trace", type=Path, default=None,
                        help="keep the profiler's Chrome trace there (default: summarised, then deleted)")
    args = parser.parse_args(argv)

    levels = parse_levels(args.concurrency)
    max_sessions = args.max_sessions or max(levels)
    # The per-request path as upstream runs it: one request's step at a time, chunks vocoded in arrival order.
    scheduler = SchedulerConfig(max_decode_batch=1, hold_ahead_s=None, fit_batches=False) if args.unbatched else None
    t0 = time.monotonic()
    engine = Engine.load(args.model_dir, device=args.device, dtype=args.dtype, max_sessions=max_sessions,
                         use_cuda_graphs=not args.unbatched, scheduler_config=scheduler,
                         compile_kernels=not args.eager_kernels,
                         flow_memory_gib=0 if args.unbatched and args.flow_memory_gib is None else args.flow_memory_gib,
                         lm_sms=args.lm_sms, paged_graph_past_pages=args.paged_graph_past_pages,
                         **({} if args.vocoder is None else {"vocoder_mode": args.vocoder}),
                         **({} if args.paged_from_frames is None else {"paged_from_frames": args.paged_from_frames}))
    load_s = time.monotonic() - t0
    t0 = time.monotonic()
    engine.start()
    capture_s = time.monotonic() - t0
    for _ in range(2):
        engine.warmup()
    report = {"device": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else "cpu",
              "dtype": args.dtype, "unbatched": args.unbatched, "compiled_kernels": engine.compiled_kernels,
              "load_s": round(load_s, 1),
              "graph_capture_s": round(capture_s, 1), "text": args.text, "levels": []}
    if engine.partition is not None:
        report["sm_partition"] = {"lm": engine.partition.lm_sms, "vocoder": engine.partition.vocoder_sms}
    if engine.paged_flow is not None:
        report["flow_memory_pages"] = engine.paged_flow.memory.pages - 1
        report["flow_memory_gib"] = round(engine.paged_flow.memory.kv.nbytes / 2**30, 2)
        report["paged_flow_graphs"] = len(engine.paged_flow.graphs)
    checks = (("flow_graph", engine.flow_graphs is not None, check_flow_graphs),
              ("flow_encoder_graph", engine.encoder_graphs is not None and engine.encoder_graphs.graphs,
               check_encoder_graphs),
              ("hift_graph", engine.hift_graphs is not None, check_hift_graphs),
              ("prefill_graph", bool(engine.runner.extend_graphs), check_prefill_graphs),
              ("decode_graph", bool(engine.runner.graphs), check_decode_graphs),
              ("batched_prefill_vs_single", any(rows > 1 for rows, _, _ in engine.runner.extend_graphs),
               check_batched_prefill),
              ("paged_flow_vs_rerun", engine.paged_flow is not None,
               lambda e: check_paged_flow(e, args.text, args.voice)))
    for name, applies, check in checks:
        if applies:
            key = f"{name}_max_abs_diff" if "_vs_" in name else f"{name}_vs_eager_max_abs_diff"
            try:
                report[key] = check(engine)
            except Exception as exc:  # a broken check must not cost the benchmark after it
                report[key] = f"check failed: {exc!r}"
    print(json.dumps({k: v for k, v in report.items() if k != "levels"}), flush=True)
    if args.check_batch_invariance:
        report["batch_invariance"] = batch_invariance(engine, args.text, args.voice, args.check_batch_invariance)
        print(json.dumps({"batch_invariance": report["batch_invariance"]}), flush=True)
    if args.stage_times:
        report["vocoder_stage_ms"] = vocoder_stage_times(engine, args.voice, parse_stage_shapes(args.stage_times))
    keys = ("steps", "decode_rows", "chunks", "extend_s", "decode_s", "decode_forward_s", "sample_s", "sample_cpu_s",
            "loop_s", "vocoder_s", "vocoder_batches", "vocoder_items", "flow_graphed_calls", "flow_eager_calls",
            "flow_paged_graphed_calls", "flow_paged_eager_calls", "flow_paged_fallbacks", "encoder_graphed_calls",
            "encoder_eager_calls", "hift_graphed_calls", "hift_eager_calls", "vocoder_host_prepare_s",
            "vocoder_host_sample_s", "vocoder_host_hift_s", "vocoder_host_replay_s", "prefills_with_decode")
    paged = engine.paged_flow
    default_flow = "paged" if paged is not None else "rerun"
    runs = [LevelRun(u, default_flow, arrivals=args.arrivals) for u in levels]
    # After the levels, the same engine with one thing changed, for side-by-side ratios: every chunk re-running its
    # prefix (upstream's flow), prefills one request at a time, every user starting at once, the GIL's default
    # switch interval, other vocoder policies.
    if paged is not None:
        runs += [LevelRun(u, "rerun", arrivals=args.arrivals) for u in parse_levels(args.rerun_levels)]
    runs += [LevelRun(u, default_flow, batch_prefill=False, arrivals=args.arrivals)
             for u in parse_levels(args.single_prefill_levels)]
    runs += [LevelRun(u, default_flow, arrivals="burst") for u in parse_levels(args.burst_levels)]
    runs += [LevelRun(u, default_flow, arrivals=args.arrivals, switch_interval=DEFAULT_SWITCH_INTERVAL_S)
             for u in parse_levels(args.default_switch_levels)]
    runs += [LevelRun(u, default_flow, arrivals=args.arrivals, scheduling=policy)
             for u, policy in parse_scheduling_levels(args.scheduling_levels)]
    runs += [LevelRun(u, flow, arrivals=args.arrivals) for u, flow in parse_named_levels(args.flow_levels, FLOWS, "FLOW")
             if flow == "rerun" or paged is not None]
    runs += [LevelRun(u, default_flow, arrivals=args.arrivals, vocoder=placement, settings=settings)
             for u, placement, settings in parse_vocoder_levels(args.vocoder_levels)]
    engine_vocoder = engine.vocoder_mode
    engine_scheduling = engine.scheduler.config
    for run in runs:
        switch = sys.getswitchinterval()
        if run.scheduling is not None:
            engine.scheduler.config = scheduling_config(engine_scheduling, run.scheduling)
        if run.settings:
            engine.scheduler.config = level_config(engine.scheduler.config, run.settings)
        engine.set_vocoder_mode(run.vocoder or engine_vocoder)
        vocoder_defaults = {name: getattr(engine.vocoder, name) for name, _ in run.settings
                            if name in VOCODER_SETTINGS and hasattr(engine.vocoder, name)}
        for name in vocoder_defaults:
            setattr(engine.vocoder, name, bool(dict(run.settings)[name]))
        text_normalizer = engine.text_normalizer
        if not dict(run.settings).get("text_worker", 1):
            engine.text_normalizer = None
        prefill_with_decode = engine.prefill_with_decode
        engine.prefill_with_decode = bool(dict(run.settings).get("prefill_with_decode", prefill_with_decode))
        with flow_setting(engine, paged if run.flow == "paged" else None, engine.token2wav.paged_from_frames):
            engine.runner.batch_prefill = run.batch_prefill
            if run.switch_interval is not None:
                sys.setswitchinterval(run.switch_interval)
            before = engine.stats()
            try:
                summary = run_level(engine, run.users, args.duration, args.text, args.voice, run.arrivals, args.ramp)
            finally:
                after = engine.stats()
                engine.runner.batch_prefill = True
                sys.setswitchinterval(switch)
                engine.scheduler.config = engine_scheduling
                for name, value in vocoder_defaults.items():
                    setattr(engine.vocoder, name, value)
                engine.text_normalizer = text_normalizer
                engine.prefill_with_decode = prefill_with_decode
        summary["flow"] = run.flow
        summary["prefill"] = "batched" if run.batch_prefill else "single"
        summary["gil_switch_interval_s"] = run.switch_interval or switch
        summary["scheduling"] = run.scheduling or "engine"
        summary["vocoder"] = engine.vocoder_mode
        summary["settings"] = dict(run.settings)
        summary["engine"] = {k: round(after[k] - before[k], 3) for k in keys if k in after}
        if "flow_memory_pages_free" in after:
            summary["engine"]["flow_memory_pages_free_after"] = after["flow_memory_pages_free"]
        report["levels"].append(summary)
        print(json.dumps(summary), flush=True)
    if args.profile_level:
        summary, window = profile_level(engine, args.profile_level, args.duration, args.text, args.voice, args.ramp,
                                        args.profile_seconds, args.profile_trace)
        summary["profiled"] = True
        report["levels"].append(summary)
        report["host_profile"] = window
        print(json.dumps(summary), flush=True)
        print(json.dumps({"host_profile": window}), flush=True)
    engine.shutdown()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
