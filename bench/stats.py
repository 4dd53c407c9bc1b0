"""Statistics for the bench: percentiles, playback stall detection, run summaries.

Pure functions over plain numbers and dicts, so they can be checked with hand-made timelines.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks.

    Same definition as numpy's default ("linear"): rank h = (n - 1) * q / 100, interpolate between
    floor(h) and ceil(h) of the sorted values. None for an empty sequence.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return None
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    hi = math.ceil(h)
    if lo == hi or xs[lo] == xs[hi]:
        return xs[lo]
    if math.isinf(xs[hi]):
        return math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (h - lo)


def describe(values: Iterable[float | None]) -> dict:
    """n, mean, min, p50/p90/p95/p99 and max of the non-missing values (None for each when empty)."""
    xs = sorted(float(v) for v in values if v is not None and not math.isnan(v))
    out: dict = {"n": len(xs)}
    if not xs:
        out.update({"mean": None, "min": None, "max": None})
        out.update({f"p{p}": None for p in PERCENTILES})
        return out
    out["mean"] = sum(xs) / len(xs)
    out["min"] = xs[0]
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(xs, p)
    out["max"] = xs[-1]
    return out


def playback_stalls(arrivals: Sequence[float], durations: Sequence[float]) -> dict:
    """Simulates a player that starts playing the moment the first chunk arrives.

    ``arrivals[i]`` is when chunk i arrived (seconds, any origin), ``durations[i]`` its audio length in
    seconds. The player plays chunks back to back; when the next chunk has not arrived by the time the
    buffered audio runs out, playback stops (a stall) until it arrives. Equivalently: the gap between two
    chunks is a stall when it is longer than the audio that was buffered ahead of the playhead when the
    earlier chunk arrived.

    Returns gaps (seconds between consecutive arrivals), the buffer ahead of the playhead at each arrival
    (after adding that chunk), the stalls as (chunk index, seconds of silence), their count, total and max.
    """
    if len(arrivals) != len(durations):
        raise ValueError("arrivals and durations differ in length")
    gaps: list[float] = []
    buffered: list[float] = []
    stalls: list[tuple[int, float]] = []
    if not arrivals:
        return {"gaps": gaps, "buffered": buffered, "stalls": stalls, "stall_count": 0,
                "stall_total": 0.0, "stall_max": 0.0}
    play_end = arrivals[0]  # the moment the buffered audio runs out
    prev = None
    for i, (t, d) in enumerate(zip(arrivals, durations)):
        if prev is not None:
            if t < prev:
                raise ValueError("arrival times must not decrease")
            gaps.append(t - prev)
        if t > play_end and i > 0:
            stalls.append((i, t - play_end))
        play_end = max(play_end, t) + d
        buffered.append(play_end - t)
        prev = t
    total = sum(s for _, s in stalls)
    return {"gaps": gaps, "buffered": buffered, "stalls": stalls, "stall_count": len(stalls),
            "stall_total": total, "stall_max": max((s for _, s in stalls), default=0.0)}


def error_kind(rec: dict) -> str | None:
    """'busy', 'error:<code>', 'dropped:<reason>' for a failed request, None for an ok one."""
    outcome = rec.get("outcome")
    if outcome == "ok":
        return None
    if outcome == "busy":
        return "busy"
    detail = rec.get("error_code") or "unknown"
    return f"{outcome}:{detail}"


def summarize(records: Sequence[dict], wall_s: float | None = None) -> dict:
    """The run summary over request records (see ``client.RequestResult.to_dict``).

    Latency, RTF and stall statistics are over ok requests only (a refused request has no first chunk).
    ``wall_s``: the measured window; by default from the first request's start to the last one's end.
    """
    recs = list(records)
    ok = [r for r in recs if r.get("outcome") == "ok"]
    outcomes = Counter(r.get("outcome") for r in recs)
    errors = Counter(k for k in (error_kind(r) for r in recs) if k is not None)
    if wall_s is None:
        starts = [r["t_start"] for r in recs if r.get("t_start") is not None]
        ends = [r["t_end"] for r in recs if r.get("t_end") is not None]
        wall_s = (max(ends) - min(starts)) if starts and ends else 0.0
    audio_total = sum(r.get("audio_s") or 0.0 for r in ok)
    workers: dict[str, dict] = defaultdict(lambda: {"requests": 0, "ok": 0, "audio_s": 0.0,
                                                     "first_chunk_ms": []})
    for r in recs:
        w = workers[r.get("worker") or "(unknown)"]
        w["requests"] += 1
        if r.get("outcome") == "ok":
            w["ok"] += 1
            w["audio_s"] += r.get("audio_s") or 0.0
            if r.get("first_chunk_ms") is not None:
                w["first_chunk_ms"].append(r["first_chunk_ms"])
    balance = {}
    for name, w in sorted(workers.items()):
        balance[name] = {
            "requests": w["requests"],
            "ok": w["ok"],
            "share": w["requests"] / len(recs) if recs else 0.0,
            "audio_s": w["audio_s"],
            "first_chunk_p50_ms": percentile(w["first_chunk_ms"], 50),
        }
    stalled = [r for r in ok if (r.get("stall_count") or 0) > 0]
    return {
        "requests": len(recs),
        "outcomes": {k: outcomes.get(k, 0) for k in ("ok", "busy", "error", "dropped")},
        "errors": dict(sorted(errors.items())),
        "error_rate": (len(recs) - len(ok)) / len(recs) if recs else 0.0,
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "audio_s_total": audio_total,
        "audio_s_per_wall_s": audio_total / wall_s if wall_s > 0 else None,
        "bytes_total": sum(r.get("bytes") or 0 for r in recs),
        "first_chunk_ms": describe(r.get("first_chunk_ms") for r in ok),
        # failed requests count as infinitely late: what a user waiting for audio experienced
        "first_chunk_p95_all_ms": percentile(
            [r["first_chunk_ms"] if r.get("outcome") == "ok" and r.get("first_chunk_ms") is not None
             else math.inf for r in recs], 95),
        "first_chunk_after_end_ms": describe(r.get("first_chunk_after_end_ms") for r in ok),
        "total_ms": describe(r.get("total_ms") for r in ok),
        "rtf": describe(r.get("rtf") for r in ok),
        "max_gap_ms": describe(r.get("max_gap_ms") for r in ok),
        "stalls": {
            "requests_with_stalls": len(stalled),
            "stall_count": sum(r.get("stall_count") or 0 for r in ok),
            "stall_total_ms": sum(r.get("stall_total_ms") or 0.0 for r in ok),
            "stall_max_ms": max((r.get("stall_max_ms") or 0.0 for r in ok), default=0.0),
        },
        "workers": balance,
    }


def slo_max_concurrency(levels: Sequence[dict], slo_ms: float) -> int | None:
    """The highest concurrency up to which every level kept p95 first chunk under ``slo_ms``.

    ``levels``: [{"concurrency": c, "summary": summarize(...)}]. The p95 is over all requests of a level
    with failed ones (busy, error, dropped) counted as infinitely late, so a level that refuses more than
    5% of its requests never qualifies. Levels are walked from the lowest concurrency up and the walk
    stops at the first one that misses the SLO. None when the lowest level already misses it.
    """
    best = None
    for lv in sorted(levels, key=lambda x: x["concurrency"]):
        p95 = lv["summary"].get("first_chunk_p95_all_ms")
        if p95 is None or not p95 < slo_ms:
            break
        best = lv["concurrency"]
    return best
