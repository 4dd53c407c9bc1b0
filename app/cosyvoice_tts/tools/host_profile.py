"""Where the engine's host time goes, from a torch.profiler Chrome trace with the engine's spans
(engine/host_spans.py): per span, its wall time and what it spent in CUDA runtime calls and top-level torch
ops; per GPU stream, its kernels' busy time.

    python -m cosyvoice_tts.tools.host_profile TRACE.json[.gz]
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

SPAN_CATEGORY = "user_annotation"
RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
OP_CATEGORY = "cpu_op"
KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_trace(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def _complete(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("ph") == "X" and "dur" in e and "ts" in e]


class _ThreadSpans:
    """One thread's spans, sorted by start: on one thread they nest or are disjoint, so the innermost span
    around an event is the latest-starting one that holds it."""

    LOOK_BACK = 16  # spans before an event's start examined: more than any nesting of the engine's spans

    def __init__(self, spans: list[dict]):
        self.spans = sorted(spans, key=lambda s: (s["ts"], -s["dur"]))
        self.starts = [s["ts"] for s in self.spans]

    def innermost(self, ts: float, end: float) -> dict | None:
        at = bisect.bisect_right(self.starts, ts)
        for span in reversed(self.spans[max(0, at - self.LOOK_BACK):at]):
            if end <= span["ts"] + span["dur"]:
                return span
        return None


def summarize(events: list[dict], top: int = 8) -> dict:
    """{"spans": {name: {count, total_ms, runtime: {call: [count, ms]}, ops: {op: [count, ms]}}},
    "streams": {stream: busy_ms}, "window_ms": ...}. Runtime calls and top-level ops count toward the
    innermost span around them on their thread ("(none)" outside every span)."""
    done = _complete(events)
    by_thread: dict = defaultdict(list)
    for e in done:
        if e.get("cat") == SPAN_CATEGORY:
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    spans: dict = defaultdict(lambda: {"count": 0, "total_ms": 0.0, "runtime": defaultdict(lambda: [0, 0.0]),
                                       "ops": defaultdict(lambda: [0, 0.0])})
    for span_list in by_thread.values():
        for s in span_list:
            spans[s["name"]]["count"] += 1
            spans[s["name"]]["total_ms"] += s["dur"] / 1000
    threads = {key: _ThreadSpans(span_list) for key, span_list in by_thread.items()}
    nowhere = _ThreadSpans([])
    ops_by_thread: dict = defaultdict(list)
    for e in done:
        if e.get("cat") == OP_CATEGORY:
            ops_by_thread[(e.get("pid"), e.get("tid"))].append(e)
    for key, ops in ops_by_thread.items():
        ops.sort(key=lambda e: (e["ts"], -e["dur"]))
        open_until = -1.0
        for op in ops:  # top level only: an op inside another op is part of it
            if op["ts"] < open_until:
                continue
            open_until = op["ts"] + op["dur"]
            span = threads.get(key, nowhere).innermost(op["ts"], open_until)
            entry = spans[span["name"] if span else "(none)"]["ops"][op["name"]]
            entry[0] += 1
            entry[1] += op["dur"] / 1000
    for e in done:
        if e.get("cat") in RUNTIME_CATEGORIES:
            span = threads.get((e.get("pid"), e.get("tid")), nowhere).innermost(e["ts"], e["ts"] + e["dur"])
            entry = spans[span["name"] if span else "(none)"]["runtime"][e["name"]]
            entry[0] += 1
            entry[1] += e["dur"] / 1000
    streams: dict = defaultdict(float)
    starts, ends = [], []
    for e in done:
        if e.get("cat") in KERNEL_CATEGORIES:
            streams[str(e.get("args", {}).get("stream", e.get("tid")))] += e["dur"] / 1000
        starts.append(e["ts"])
        ends.append(e["ts"] + e["dur"])

    def top_of(table):
        ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
        return {name: [count, round(ms, 2)] for name, (count, ms) in ranked}

    return {
        "window_ms": round((max(ends) - min(starts)) / 1000, 1) if starts else 0.0,
        "spans": {name: {"count": s["count"], "total_ms": round(s["total_ms"], 1), "runtime": top_of(s["runtime"]),
                         "ops": top_of(s["ops"])}
                  for name, s in sorted(spans.items(), key=lambda kv: -kv[1]["total_ms"])},
        "streams": {k: round(v, 1) for k, v in sorted(streams.items(), key=lambda kv: -kv[1])},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args(argv)
    print(json.dumps(summarize(load_trace(args.trace), args.top), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
