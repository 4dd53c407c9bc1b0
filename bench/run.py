#!/usr/bin/env python3
"""Load test a CosyVoice2 TTS deployment through its load balancer (see docs/performance.md, "Bench").

    python bench/run.py --url ws://LB:8080/ws --parallel 20 --rounds 5 [--mode text|stream]
        [--texts FILE] [--duration S] [--rate R] [--out DIR] [--sweep 1,2,4,8 --slo-ms 300]
    python bench/run.py --compare A/results.json B/results.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, stats  # noqa: E402
from bench.client import Connection, RequestOptions, RequestResult, list_voices, run_request  # noqa: E402
from bench.corpus import TextPicker, builtin_texts, llm_fragments, load_texts  # noqa: E402
from bench.load import LoadConfig, LoadRunner  # noqa: E402
from bench.progress import Progress  # noqa: E402

RESULTS_VERSION = 1
DEFAULT_VOICE = os.environ.get("BENCH_VOICE") or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Load test a CosyVoice2 TTS deployment over its WebSocket protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="the load balancer's (or a worker's) /ws URL")
    load = p.add_argument_group("load")
    load.add_argument("--parallel", type=int, default=4, help="concurrent sessions (with --rate: connection limit)")
    load.add_argument("--rounds", type=int, default=5, help="requests per session (ignored with --duration)")
    load.add_argument("--duration", type=float, default=None,
                      help="start new requests for this many seconds instead of a number of rounds")
    load.add_argument("--rate", type=float, default=None,
                      help="open loop: Poisson arrivals at this many requests/s, at most --parallel at once "
                           "(arrivals finding all busy count as dropped:client_saturated)")
    load.add_argument("--sweep", default=None,
                      help="comma-separated concurrency levels, e.g. 1,2,4,8: one closed-loop run per level")
    load.add_argument("--slo-ms", type=float, default=None,
                      help="sweep: report the highest concurrency whose p95 first chunk stays under this")
    load.add_argument("--warmup", type=int, default=0, help="requests sent (one after another) before measuring")
    load.add_argument("--reconnect", action="store_true", help="open a new connection for every request")
    load.add_argument("--request-timeout", type=float, default=120.0,
                      help="seconds a request may take from its first message to `finished`")
    load.add_argument("--backoff", type=float, default=0.2, help="seconds a session pauses after a failed request")
    load.add_argument("--seed", type=int, default=0, help="seeds text order and arrival times")
    req = p.add_argument_group("requests")
    req.add_argument("--mode", choices=("text", "stream"), default="text",
                     help="text: whole text in `start`; stream: LLM-like fragments at --token-rate then `end`")
    req.add_argument("--token-rate", type=float, default=40.0, help="stream mode: fragments per second")
    req.add_argument("--texts", default=None, help="a UTF-8 file with one text per line (default: built-in corpus)")
    req.add_argument("--lang", choices=("all", "zh", "en", "mix"), default="all", help="built-in corpus subset")
    req.add_argument("--voice", default=DEFAULT_VOICE, help="voice id (env BENCH_VOICE; default: the first voice the worker lists)")
    req.add_argument("--tts-mode", default=None, help="the protocol's `mode` (sft, zero_shot, cross_lingual, instruct2)")
    req.add_argument("--speed", type=float, default=None)
    req.add_argument("--sample-rate", type=int, default=None, help="ask for this output rate")
    req.add_argument("--tts-seed", type=int, default=None, help="the protocol's `seed` field")
    req.add_argument("--start-json", default=None, help="extra `start` fields as a JSON object")
    req.add_argument("--auth-token", default=os.environ.get("TTS_AUTH_TOKEN"),
                     help="sent as `Authorization: Bearer ...` (env TTS_AUTH_TOKEN)")
    out = p.add_argument_group("output")
    out.add_argument("--out", default=None, help="results directory (default bench_results/<UTC time>)")
    out.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    out.add_argument("--quiet", action="store_true", help="no live progress")
    out.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                     help="print two results.json side by side with ratios, then exit")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.sweep is not None:
        try:
            args.sweep_levels = sorted({int(x) for x in args.sweep.split(",") if x.strip()})
        except ValueError:
            p.error(f"--sweep: comma-separated integers expected, got {args.sweep!r}")
        if not args.sweep_levels or min(args.sweep_levels) < 1:
            p.error("--sweep: levels must be positive integers")
        if args.rate is not None:
            p.error("--sweep runs closed-loop sessions; it cannot be combined with --rate")
    else:
        args.sweep_levels = None
        if args.slo_ms is not None:
            p.error("--slo-ms applies to --sweep")
    if args.start_json:
        try:
            args.start_extra = json.loads(args.start_json)
        except json.JSONDecodeError as e:
            p.error(f"--start-json: {e}")
        if not isinstance(args.start_extra, dict):
            p.error("--start-json must be a JSON object")
    else:
        args.start_extra = {}
    for name in ("parallel", "rounds", "warmup"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} is too small")
    for name in ("duration", "rate", "request_timeout", "token_rate"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def environment() -> dict:
    import websockets

    env = {
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "websockets": websockets.__version__,
    }
    env["git_commit"] = None  # of the bench's checkout; None outside a git checkout
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=5)
        if r.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", r.stdout.strip()):
            env["git_commit"] = r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def request_options(args: argparse.Namespace) -> RequestOptions:
    return RequestOptions(mode=args.mode, voice=args.voice, tts_mode=args.tts_mode, speed=args.speed,
                          sample_rate=args.sample_rate, seed=args.tts_seed, extra=args.start_extra,
                          token_rate=args.token_rate, request_timeout=args.request_timeout)


async def _warmup(args, headers, picker, opts, clock0) -> list[dict]:
    out = []
    conn = Connection(args.url, headers)
    try:
        for i in range(args.warmup):
            text = picker.next()
            res = RequestResult(request_id=f"bench-warmup-{i}", session=0, index=i, level=None,
                                text_chars=len(text), mode=opts.mode)
            await run_request(conn, text, opts, res, clock0,
                              llm_fragments(text) if opts.mode == "stream" else None)
            out.append(res.to_dict())
            print(f"warmup {i + 1}/{args.warmup}: {res.outcome}"
                  + (f" ({res.error_code})" if res.error_code else "")
                  + (f", first chunk {res.first_chunk_ms:.0f} ms" if res.first_chunk_ms else ""),
                  file=sys.stderr)
    finally:
        await conn.close()
    return out


async def run_bench(args: argparse.Namespace, texts: list[str]) -> dict:
    """Runs the whole bench (warmup, load or sweep) and returns the results document."""
    headers = {"Authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
    opts = request_options(args)
    picker = TextPicker(texts, seed=args.seed)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint():
        print("\ninterrupted: no new requests; waiting for those in flight (Ctrl-C again to abort)",
              file=sys.stderr)
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)

    try:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    except (NotImplementedError, RuntimeError):  # not the main thread (tests) or no signals
        pass
    clock0 = time.perf_counter()
    argv = ["bench/run.py"] + args.argv
    doc: dict = {"version": RESULTS_VERSION, "command": shlex.join(["python"] + argv), "argv": argv, "config": _config(args, texts), "environment": environment()}
    doc["warmup"] = await _warmup(args, headers, picker, opts, clock0) if args.warmup else []
    levels = args.sweep_levels or [None]
    records: list[dict] = []
    sweep_levels = []
    for level in levels:
        if stop.is_set():
            break
        parallel = level if level is not None else args.parallel
        cfg = LoadConfig(parallel=parallel, rounds=args.rounds, duration=args.duration, rate=args.rate,
                         reconnect=args.reconnect, backoff=args.backoff, seed=args.seed)
        label = f"c={level} " if level is not None else ""
        progress = Progress(total=cfg.expected_requests(), duration=args.duration, label=label,
                            enabled=not args.quiet)
        runner = LoadRunner(args.url, headers, picker, opts, cfg, progress=progress, level=level, stop=stop)
        progress.start()
        try:
            recs = await runner.run(clock0=clock0)
        finally:
            await progress.stop()
        records.extend(recs)
        if level is not None:
            sweep_levels.append({"concurrency": level, "summary": stats.summarize(recs)})
    doc["summary"] = stats.summarize(records) if args.sweep_levels is None else \
        stats.summarize(records, wall_s=sum(lv["summary"]["wall_s"] for lv in sweep_levels))
    if args.sweep_levels is not None:
        best = stats.slo_max_concurrency(sweep_levels, args.slo_ms) if args.slo_ms is not None else None
        doc["sweep"] = {"levels": sweep_levels, "slo_ms": args.slo_ms, "best_concurrency": best}
    doc["interrupted"] = stop.is_set()
    doc["requests"] = records
    return doc


def _config(args: argparse.Namespace, texts: list[str]) -> dict:
    keys = ("url", "parallel", "rounds", "duration", "rate", "sweep_levels", "slo_ms", "warmup", "reconnect",
            "request_timeout", "backoff", "seed", "mode", "token_rate", "texts", "lang", "voice", "tts_mode",
            "speed", "sample_rate", "tts_seed", "start_extra")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["auth"] = bool(args.auth_token)  # never the token itself
    cfg["corpus_size"] = len(texts)
    return cfg


def write_outputs(doc: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "results.json"
    path.write_text(json.dumps(_finite(doc), ensure_ascii=False, indent=1, allow_nan=False),
                    encoding="utf-8")
    written.append(path)
    (out_dir / "summary.txt").write_text(render_summary(doc) + "\n", encoding="utf-8")
    written.append(out_dir / "summary.txt")
    if plots:
        try:
            from bench import plots as P
        except ImportError as e:  # pragma: no cover - depends on the environment
            print(f"plots skipped: {e} (pip install matplotlib)", file=sys.stderr)
            return written
        try:
            written.append(P.first_chunk_cdf(doc["requests"], out_dir / "first_chunk_cdf.png"))
            written.append(P.rtf_over_time(doc["requests"], out_dir / "rtf_over_time.png"))
            if doc.get("sweep"):
                sw = doc["sweep"]
                written.append(P.sweep_chart(sw["levels"], sw["slo_ms"], sw["best_concurrency"],
                                             out_dir / "sweep.png"))
        except ImportError as e:
            print(f"plots skipped: {e} (pip install matplotlib)", file=sys.stderr)
    return written


def _finite(o):
    """JSON has no infinity: p95 values of levels where too many requests failed become null."""
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite(v) for v in o]
    return o


def render_summary(doc: dict) -> str:
    c = doc["config"]
    shape = (f"sweep {c['sweep_levels']}" if c["sweep_levels"] else f"parallel {c['parallel']}") + \
        (f", duration {c['duration']:g} s" if c["duration"] else f", rounds {c['rounds']}") + \
        (f", rate {c['rate']:g}/s" if c["rate"] else "")
    title = f"bench: {c['mode']} mode against {c['url']} ({shape})"
    parts = [report.summary_text(doc["summary"], title=title)]
    if doc.get("sweep"):
        sw = doc["sweep"]
        parts.append("")
        parts.append(report.sweep_text(sw["levels"], sw["slo_ms"], sw["best_concurrency"]))
    if doc.get("interrupted"):
        parts.append("\n(interrupted: partial run)")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        try:
            a, b = (report.load_results(p) for p in args.compare)
        except (OSError, ValueError) as e:
            print(f"--compare: {e}", file=sys.stderr)
            return 2
        print(report.compare_text(a, b, *args.compare))
        return 0
    try:
        texts = load_texts(args.texts) if args.texts else builtin_texts(args.lang)
    except (OSError, ValueError) as e:
        print(f"texts: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else \
        Path("bench_results") / _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if args.voice is None:
        headers = {"Authorization": f"Bearer {args.auth_token}"} if args.auth_token else {}
        try:
            voices = asyncio.run(list_voices(args.url, headers))
        except Exception as e:  # noqa: BLE001 - any failure here means: say so, and ask for --voice
            print(f"bench: could not ask {args.url} for its voices ({type(e).__name__}: {e}); "
                  "is it up? (or pass --voice)", file=sys.stderr)
            return 2
        if not voices:
            print("bench: the worker lists no voices; pass --voice", file=sys.stderr)
            return 2
        args.voice = voices[0]
        print(f"voice: {args.voice!r} (the first of the {len(voices)} the worker lists)", file=sys.stderr)
    doc = asyncio.run(run_bench(args, texts))
    print(render_summary(doc))
    written = write_outputs(doc, out_dir, plots=not args.no_plots)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if doc["summary"]["outcomes"]["ok"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
