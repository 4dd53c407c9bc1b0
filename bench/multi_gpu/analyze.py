"""The numbers of the multi-GPU bench (bench/multi_gpu/run.sh) from bench/run.py results documents and
worker /metrics scrapes: per-level rows, per-worker balance, scaling efficiency against N x one worker,
the failure run; and the markdown summary. Pure functions (tests/test_multi_gpu_units.py)."""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text format -> {(sample name, sorted label items): value} (enough for counters/gauges)."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        try:
            out[(m.group(1), labels)] = float(m.group(4))
        except ValueError:
            pass
    return out


def metric(samples: dict | None, name: str, **labels) -> float:
    if not samples:
        return 0.0
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def worker_counters(samples: dict | None) -> dict:
    """The worker counters the report uses (``cosyvoice_tts_*``)."""
    return {
        "finished": metric(samples, "cosyvoice_tts_requests_total", outcome="finished"),
        "disconnected": metric(samples, "cosyvoice_tts_requests_total", outcome="disconnected"),
        "error": metric(samples, "cosyvoice_tts_requests_total", outcome="error"),
        "busy": metric(samples, "cosyvoice_tts_requests_total", outcome="busy"),
        "audio_s": metric(samples, "cosyvoice_tts_audio_seconds_total"),
        "sessions_active": metric(samples, "cosyvoice_tts_sessions_active"),
    }


def counter_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per worker: after - before of worker_counters() (a restarted worker's counters start again at 0:
    then the delta is just ``after``)."""
    out = {}
    for w in sorted(set(before) | set(after)):
        b, a = before.get(w) or {}, after.get(w) or {}
        restarted = any(a.get(k, 0.0) < b.get(k, 0.0) for k in ("finished", "audio_s"))
        out[w] = {k: (a.get(k, 0.0) if restarted else a.get(k, 0.0) - b.get(k, 0.0))
                  for k in ("finished", "disconnected", "error", "busy", "audio_s")}
        out[w]["restarted"] = restarted
    return out


def _p(d: dict | None, key: str):
    return None if not d else d.get(key)


def level_rows(doc: dict | None) -> list[dict]:
    """One row per sweep level of a bench/run.py results document."""
    if not doc or not doc.get("sweep"):
        return []
    rows = []
    for lv in doc["sweep"]["levels"]:
        s = lv["summary"]
        rows.append({
            "concurrency": lv["concurrency"],
            "requests": s["requests"],
            "ok": s["outcomes"]["ok"],
            "failed": s["requests"] - s["outcomes"]["ok"],
            "errors": s.get("errors", {}),
            "wall_s": s.get("wall_s"),
            "rps": s.get("throughput_rps"),
            "audio_s_per_wall_s": s.get("audio_s_per_wall_s"),
            "first_chunk_p50_ms": _p(s.get("first_chunk_ms"), "p50"),
            "first_chunk_p95_ms": _p(s.get("first_chunk_ms"), "p95"),
            "first_chunk_p95_all_ms": s.get("first_chunk_p95_all_ms"),
            "rtf_p50": _p(s.get("rtf"), "p50"),
            "stalled_requests": (s.get("stalls") or {}).get("requests_with_stalls"),
            "workers": {w: {"requests": v["requests"], "ok": v["ok"], "share": v["share"], "audio_s": v["audio_s"],
                            "first_chunk_p50_ms": v.get("first_chunk_p50_ms")}
                        for w, v in (s.get("workers") or {}).items()},
        })
    return rows


def _ratio(values: list[float]):
    if not values:
        return None
    lo, hi = min(values), max(values)
    return None if lo <= 0 else hi / lo


def balance(rows: list[dict], workers: list[str], doc: dict | None = None,
            metrics_delta: dict[str, dict] | None = None, gpu_util: dict | None = None) -> dict:
    """Per-worker balance of a multi-worker sweep: per level and in total (ok requests, audio seconds,
    share), max/min ratios (None when a worker served nothing: then ``idle_workers`` names it), and the
    cross-check against the workers' own counters (bench ok requests incl. warm-up vs ``finished``)."""
    per_level = []
    tot = {w: {"requests": 0, "ok": 0, "audio_s": 0.0} for w in workers}
    for r in rows:
        lv = {}
        for w in workers:
            v = r["workers"].get(w, {"requests": 0, "ok": 0, "audio_s": 0.0, "share": 0.0})
            lv[w] = {"requests": v["requests"], "ok": v["ok"], "audio_s": v["audio_s"], "share": v["share"]}
            for k in ("requests", "ok", "audio_s"):
                tot[w][k] += v[k]
        per_level.append({"concurrency": r["concurrency"], "workers": lv,
                          "ok_max_over_min": _ratio([lv[w]["ok"] for w in workers]),
                          "audio_max_over_min": _ratio([lv[w]["audio_s"] for w in workers])})
    n_req = sum(t["requests"] for t in tot.values())
    for w in workers:
        tot[w]["share"] = tot[w]["requests"] / n_req if n_req else 0.0
    out = {
        "workers": workers,
        "per_level": per_level,
        "total": tot,
        "ok_max_over_min": _ratio([tot[w]["ok"] for w in workers]),
        "audio_max_over_min": _ratio([tot[w]["audio_s"] for w in workers]),
        "idle_workers": [w for w in workers if tot[w]["ok"] == 0],
        "all_workers_served": bool(workers) and all(tot[w]["ok"] > 0 for w in workers),
    }
    if metrics_delta is not None:
        out["metrics_delta"] = metrics_delta
        if doc is not None:
            bench_ok = Counter(r.get("worker") for r in (doc.get("requests") or []) + (doc.get("warmup") or [])
                               if r.get("outcome") == "ok")
            out["metrics_agree"] = all(int(round(metrics_delta.get(w, {}).get("finished", 0))) == bench_ok.get(w, 0)
                                       for w in workers)
            out["bench_ok_incl_warmup"] = {w: bench_ok.get(w, 0) for w in workers}
    if gpu_util:
        out["gpu_util"] = gpu_util
    return out


def scaling(single: list[dict], multi: list[dict], n: int) -> dict:
    """Aggregate audio-s per wall-s of N workers against N x one worker's, level by level (a multi level
    pairs with the single level N times smaller; else by position), and best against best."""
    by_c = {r["concurrency"]: r for r in single}
    pairs = []
    for i, m in enumerate(multi):
        s = by_c.get(m["concurrency"] // n) if m["concurrency"] % n == 0 else None
        if s is None and i < len(single):
            s = single[i]
        if s is None:
            continue
        sa, ma = s.get("audio_s_per_wall_s"), m.get("audio_s_per_wall_s")
        eff = (ma / (n * sa)) if (sa and ma is not None) else None
        sr, mr = s.get("rps"), m.get("rps")
        pairs.append({
            "single_concurrency": s["concurrency"], "multi_concurrency": m["concurrency"],
            "single_audio_s_per_s": sa, "multi_audio_s_per_s": ma,
            "ideal_audio_s_per_s": n * sa if sa is not None else None,
            "efficiency": eff,
            "rps_efficiency": (mr / (n * sr)) if (sr and mr is not None) else None,
            "single_first_chunk_p95_ms": s.get("first_chunk_p95_ms"),
            "multi_first_chunk_p95_ms": m.get("first_chunk_p95_ms"),
            "single_failed": s.get("failed"), "multi_failed": m.get("failed"),
        })
    bs = max((r.get("audio_s_per_wall_s") or 0.0 for r in single), default=0.0)
    bm = max((r.get("audio_s_per_wall_s") or 0.0 for r in multi), default=0.0)
    effs = [p["efficiency"] for p in pairs if p["efficiency"] is not None]
    return {
        "n": n,
        "pairs": pairs,
        "best_single_audio_s_per_s": bs or None,
        "best_multi_audio_s_per_s": bm or None,
        "best_efficiency": (bm / (n * bs)) if bs else None,
        "mean_efficiency": (sum(effs) / len(effs)) if effs else None,
    }


def failed_requests(doc: dict | None, victim: str) -> dict:
    """Failed requests of the failure run's bench document, by kind and by worker."""
    reqs = (doc or {}).get("requests") or []
    failed = [r for r in reqs if r.get("outcome") != "ok"]
    kinds = Counter((r.get("outcome") or "?") + (":" + r["error_code"] if r.get("error_code") else "") for r in failed)
    by_worker = Counter(r.get("worker") or "(none)" for r in failed)
    ends = sorted(r["t_end"] for r in failed if r.get("t_end") is not None)
    in_flight = sum(1 for r in failed if r.get("worker") == victim and r.get("outcome") == "dropped")
    not_ready = sum(1 for r in failed if r.get("error_code") == "not_ready")
    return {
        "requests": len(reqs),
        "ok": len(reqs) - len(failed),
        "failed": len(failed),
        # cut off by the kill: the victim had sent `started`, then its connection dropped
        "failed_in_flight_at_kill": in_flight,
        # sent to the restarted worker while it was loading: it accepts the WebSocket and answers not_ready
        "failed_not_ready": not_ready,
        "failed_other": len(failed) - in_flight - not_ready,
        "failed_by_kind": dict(sorted(kinds.items())),
        "failed_by_worker": dict(sorted(by_worker.items())),
        "failed_on_victim": by_worker.get(victim, 0),
        "failed_t_end_s": ends,  # bench clock (s since its start)
        "ok_by_worker": dict(sorted(Counter(r.get("worker") for r in reqs if r.get("outcome") == "ok").items())),
    }


def supervisor_timeline(events: list[dict], t_kill_mono: float) -> dict:
    """From a supervisor's events (supervise.py) around a kill at ``t_kill_mono`` (CLOCK_MONOTONIC): when
    the exit was seen, when the restart began, and the number of starts."""
    exit_ev = next((e for e in events if e.get("event") == "exit" and e["mono"] >= t_kill_mono - 1.0), None)
    start_ev = None
    if exit_ev:
        start_ev = next((e for e in events if e.get("event") == "start" and e["mono"] >= exit_ev["mono"]), None)
    return {
        "starts": sum(1 for e in events if e.get("event") == "start"),
        "exit": exit_ev,
        "restart": start_ev,
        "exit_seen_after_kill_s": (exit_ev["mono"] - t_kill_mono) if exit_ev else None,
        "restart_after_exit_s": (start_ev["mono"] - exit_ev["mono"]) if (exit_ev and start_ev) else None,
        "restart_after_kill_s": (start_ev["mono"] - t_kill_mono) if start_ev else None,
    }


# ---- markdown -------------------------------------------------------------------------------------------

def _f(v, digits=1, suffix=""):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{suffix}"
    return f"{v}{suffix}"


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def markdown(s: dict) -> str:
    L = []
    cfg = s.get("config", {})
    L.append(f"# Multi-GPU bench: {s.get('n_workers')} worker(s), {s.get('mode')} mode")
    L.append("")
    L.append(f"- started {s.get('started_utc')} on {s.get('host')}; {_f(s.get('elapsed_s'), 0)} s of a "
             f"{_f(cfg.get('budget_s'), 0)} s budget")
    if s.get("gpus"):
        L.append("- GPUs: " + "; ".join(f"{g.get('index')}: {g.get('name')} ({g.get('memory_total_mib')} MiB)"
                                        for g in s["gpus"]))
    L.append(f"- model: {cfg.get('model_dir')} ({cfg.get('model_size')}), dtype {cfg.get('dtype')}, "
             f"max sessions {cfg.get('max_sessions')}; workers: " +
             ", ".join(f"{w['name']} on :{w['port']}" for w in s.get("workers", [])))
    ng = s.get("nginx") or {}
    if ng:
        L.append(f"- nginx: {ng.get('version')} from {ng.get('source')}; config rendered by the nginx_lb role "
                 f"({ng.get('renderer')}; other renderer identical: {ng.get('renders_equal')})")
    L.append(f"- supervisor: restart after {cfg.get('restart_sec')} s (systemd Restart=always, RestartSec)")
    L.append("")
    L.append("## What ran")
    L.append("")
    for ph in s.get("phases", []):
        extra = f" ({ph['reason']})" if ph.get("reason") else ""
        L.append(f"- {ph['name']}: **{ph['status']}**{extra}" +
                 (f", {_f(ph.get('seconds'), 0)} s" if ph.get("seconds") is not None else ""))
    for c in s.get("commands", []):
        L.append(f"  - `{c}`")
    sc = s.get("scaling")
    if sc and sc.get("pairs"):
        n = sc["n"]
        L.append("")
        L.append(f"## Scaling: {n} workers vs {n} x one worker (through nginx)")
        L.append("")
        L.append("| 1-worker conc. | audio-s/s | p95 first chunk ms | N-worker conc. | audio-s/s | ideal (N x 1) | "
                 "efficiency | p95 first chunk ms | failed (1 / N) |")
        L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for p in sc["pairs"]:
            L.append(f"| {p['single_concurrency']} | {_f(p['single_audio_s_per_s'], 2)} | "
                     f"{_f(p['single_first_chunk_p95_ms'], 0)} | {p['multi_concurrency']} | "
                     f"{_f(p['multi_audio_s_per_s'], 2)} | {_f(p['ideal_audio_s_per_s'], 2)} | {_pct(p['efficiency'])} | "
                     f"{_f(p['multi_first_chunk_p95_ms'], 0)} | {p['single_failed']} / {p['multi_failed']} |")
        L.append("")
        L.append(f"Best level against best level: {_f(sc.get('best_multi_audio_s_per_s'), 2)} vs "
                 f"{n} x {_f(sc.get('best_single_audio_s_per_s'), 2)} audio-s/s = {_pct(sc.get('best_efficiency'))}.")
    b = s.get("balance")
    if b and b.get("per_level"):
        ws = b["workers"]
        L.append("")
        L.append("## Per-GPU balance (multi-worker sweep)")
        L.append("")
        L.append("| concurrency | " + " | ".join(f"{w} ok (share)" for w in ws) + " | " +
                 " | ".join(f"{w} audio s" for w in ws) + " | max/min audio |")
        L.append("| --- |" + " --- |" * (2 * len(ws) + 1))
        for lv in b["per_level"]:
            L.append(f"| {lv['concurrency']} | " +
                     " | ".join(f"{lv['workers'][w]['ok']} ({_pct(lv['workers'][w]['share'])})" for w in ws) + " | " +
                     " | ".join(_f(lv['workers'][w]['audio_s'], 1) for w in ws) + f" | {_f(lv['audio_max_over_min'], 2)} |")
        t = b["total"]
        L.append("| all | " + " | ".join(f"{t[w]['ok']} ({_pct(t[w]['share'])})" for w in ws) + " | " +
                 " | ".join(_f(t[w]['audio_s'], 1) for w in ws) + f" | {_f(b.get('audio_max_over_min'), 2)} |")
        L.append("")
        if "metrics_agree" in b:
            L.append("- workers' own `/metrics` (finished requests, incl. warm-up): "
                     + ", ".join(f"{w} {int(b['metrics_delta'].get(w, {}).get('finished', 0))}" for w in ws)
                     + f"; equal to the bench's per-worker ok counts: {b['metrics_agree']}")
        if b.get("gpu_util"):
            L.append("- GPU utilisation during the sweep (nvidia-smi, 1 s samples): " + ", ".join(
                f"GPU {g}: mean {_f(u.get('util_mean'), 0)}%, memory {_f(u.get('mem_max_mib'), 0)} MiB"
                for g, u in sorted(b["gpu_util"].items())))
        if b.get("idle_workers"):
            L.append(f"- **idle workers: {', '.join(b['idle_workers'])}**")
    f = s.get("failure")
    if f and f.get("status") == "ran":
        L.append("")
        L.append("## Failure run: one worker killed (SIGKILL) mid-benchmark")
        L.append("")
        fr = f.get("requests") or {}
        tl = f.get("supervisor") or {}
        L.append(f"- load: {f.get('concurrency')} closed-loop sessions through nginx, "
                 f"{'a new connection per request' if f.get('reconnect') else 'connections kept'}, "
                 f"{_f(f.get('bench_duration_s'), 0)} s; killed {f.get('victim')} (pid {f.get('victim_pid')}) "
                 f"{_f(f.get('kill_after_launch_s'), 1)} s after the bench started, with "
                 f"{_f(f.get('victim_sessions_active_before_kill'), 0)} request(s) in flight on it")
        L.append(f"- requests: {fr.get('requests')}, ok {fr.get('ok')}, **failed {fr.get('failed')}**: "
                 f"{fr.get('failed_in_flight_at_kill')} in flight on {f.get('victim')} when it was killed, "
                 f"{fr.get('failed_not_ready')} answered `not_ready` (sent to it while it was loading again), "
                 f"{fr.get('failed_other')} other; by kind: {fr.get('failed_by_kind')}")
        L.append(f"- supervisor: saw the exit {_f(tl.get('exit_seen_after_kill_s'), 2)} s after the kill, "
                 f"restarted it {_f(tl.get('restart_after_exit_s'), 2)} s later; "
                 f"**/readyz 200 again {_f(f.get('recovery_s'), 1)} s after the kill** "
                 f"(start to ready {_f(f.get('start_to_ready_s'), 1)} s; first start took "
                 f"{_f(f.get('first_start_to_ready_s'), 1)} s)")
        L.append(f"- the restarted worker finished {f.get('served_after_restart')} request(s) before the bench ended; "
                 f"ok requests by worker: {fr.get('ok_by_worker')}")
    elif f:
        L.append("")
        L.append(f"## Failure run: {f.get('status')} ({f.get('reason', '')})")
    nr = [ph for ph in s.get("phases", []) if ph["status"] != "ran"]
    L.append("")
    L.append("## Not run")
    L.append("")
    if nr:
        for ph in nr:
            L.append(f"- {ph['name']}: {ph['status']}" + (f" ({ph['reason']})" if ph.get("reason") else ""))
    else:
        L.append("- nothing: every phase ran")
    for note in s.get("notes", []):
        L.append(f"- note: {note}")
    return "\n".join(L) + "\n"


def gpu_util_summary(samples: list[dict]) -> dict:
    """nvidia-smi samples [{"index", "util", "mem_mib"}] -> per GPU mean/max utilisation, max memory."""
    by = defaultdict(list)
    for x in samples:
        by[str(x["index"])].append(x)
    return {g: {"samples": len(xs), "util_mean": sum(x["util"] for x in xs) / len(xs),
                "util_max": max(x["util"] for x in xs), "mem_max_mib": max(x["mem_mib"] for x in xs)}
            for g, xs in by.items() if xs}
