"""Text reports: the summary table, the sweep table, and the side-by-side comparison of two runs."""

from __future__ import annotations

import json
from pathlib import Path

DIST_ROWS = [
    ("first_chunk_ms", "first chunk, ms (from first text)"),
    ("first_chunk_after_end_ms", "first chunk, ms (from end of text)"),
    ("total_ms", "total time, ms"),
    ("rtf", "RTF (total time / audio s)"),
    ("max_gap_ms", "largest inter-chunk gap, ms"),
]
COLS = ("n", "p50", "p90", "p95", "p99", "max", "mean")


def _num(v, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return str(v)
    if v == float("inf"):
        return "inf"
    return f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = []
    for i, row in enumerate([header] + rows):
        cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary_text(summary: dict, title: str = "") -> str:
    s = summary
    lines = []
    if title:
        lines.append(title)
    o = s["outcomes"]
    lines.append(f"requests {s['requests']}: ok {o['ok']}, busy {o['busy']}, error {o['error']}, "
                 f"dropped {o['dropped']} (error rate {100 * s['error_rate']:.1f}%)")
    lines.append(f"throughput: {_num(s['throughput_rps'], 2)} req/s, "
                 f"{_num(s['audio_s_per_wall_s'], 2)} audio-s per wall-s "
                 f"({_num(s['audio_s_total'], 1)} audio s in {_num(s['wall_s'], 1)} s)")
    lines.append("")
    rows = []
    for key, label in DIST_ROWS:
        d = s[key]
        digits = 3 if key == "rtf" else 1
        rows.append([label] + [_num(d[c], digits) if c != "n" else str(d["n"]) for c in COLS])
    lines.append(_table(["metric (ok requests)"] + list(COLS), rows))
    st = s["stalls"]
    lines.append("")
    lines.append(f"stalls (gap longer than the audio buffered ahead): {st['requests_with_stalls']} "
                 f"requests stalled, {st['stall_count']} stalls, {st['stall_total_ms']:.0f} ms silent "
                 f"in total, longest {st['stall_max_ms']:.0f} ms")
    if s["errors"]:
        lines.append("")
        lines.append(_table(["errors by kind", "count"], [[k, str(v)] for k, v in s["errors"].items()]))
    if s["workers"]:
        lines.append("")
        rows = [[w, str(v["requests"]), f"{100 * v['share']:.1f}%", str(v["ok"]), _num(v["audio_s"], 1),
                 _num(v["first_chunk_p50_ms"], 1)] for w, v in s["workers"].items()]
        lines.append(_table(["worker", "requests", "share", "ok", "audio s", "first p50 ms"], rows))
    return "\n".join(lines)


def sweep_text(levels: list[dict], slo_ms: float | None, best: int | None) -> str:
    rows = []
    for lv in levels:
        s = lv["summary"]
        f = s["first_chunk_ms"]
        rows.append([str(lv["concurrency"]), str(s["requests"]), str(s["outcomes"]["ok"]),
                     _num(f["p50"]), _num(f["p95"]), _num(s["first_chunk_p95_all_ms"]),
                     _num(s["rtf"]["p50"], 3), _num(s["throughput_rps"], 2),
                     _num(s["audio_s_per_wall_s"], 2)])
    out = _table(["concurrency", "requests", "ok", "first p50", "first p95", "p95 all*", "RTF p50",
                  "req/s", "audio-s/s"], rows)
    out += "\n* p95 first chunk with failed requests counted as never answered"
    if slo_ms is not None:
        out += (f"\nhighest concurrency keeping p95 first chunk under {slo_ms:g} ms: "
                + (str(best) if best is not None else "none (the lowest level already misses it)"))
    return out


def load_results(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if "summary" not in data:
        raise ValueError(f"{path}: not a bench results.json (no summary)")
    return data


COMPARE_ROWS = [
    ("requests", ("requests",), 0),
    ("ok", ("outcomes", "ok"), 0),
    ("error rate %", ("error_rate",), 2),
    ("first chunk p50 ms", ("first_chunk_ms", "p50"), 1),
    ("first chunk p90 ms", ("first_chunk_ms", "p90"), 1),
    ("first chunk p95 ms", ("first_chunk_ms", "p95"), 1),
    ("first chunk p99 ms", ("first_chunk_ms", "p99"), 1),
    ("first chunk max ms", ("first_chunk_ms", "max"), 1),
    ("first after end p50 ms", ("first_chunk_after_end_ms", "p50"), 1),
    ("total p50 ms", ("total_ms", "p50"), 1),
    ("RTF p50", ("rtf", "p50"), 3),
    ("RTF p95", ("rtf", "p95"), 3),
    ("RTF max", ("rtf", "max"), 3),
    ("req/s", ("throughput_rps",), 2),
    ("audio-s per wall-s", ("audio_s_per_wall_s",), 2),
    ("stalls", ("stalls", "stall_count"), 0),
    ("largest gap p95 ms", ("max_gap_ms", "p95"), 1),
]


def _get(d: dict, path: tuple):
    for k in path:
        if d is None:
            return None
        d = d.get(k)
    return d


def ratio(a, b) -> str:
    if a is None or b is None:
        return "-"
    if a == 0:
        return "-" if b == 0 else "inf"
    return f"{b / a:.2f}x"


def compare_text(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    rows = []
    for label, path, digits in COMPARE_ROWS:
        va, vb = _get(a["summary"], path), _get(b["summary"], path)
        if path == ("error_rate",):
            va = None if va is None else 100 * va
            vb = None if vb is None else 100 * vb
        fmt = (lambda v: "-" if v is None else (str(int(v)) if digits == 0 else _num(float(v), digits)))
        rows.append([label, fmt(va), fmt(vb), ratio(va, vb)])
    out = [f"A: {name_a}\n   {a.get('command', '')}", f"B: {name_b}\n   {b.get('command', '')}", ""]
    out.append(_table(["metric", "A", "B", "B/A"], rows))
    sa, sb = a.get("sweep"), b.get("sweep")
    if sa and sb:
        la = {lv["concurrency"]: lv["summary"] for lv in sa["levels"]}
        lb = {lv["concurrency"]: lv["summary"] for lv in sb["levels"]}
        rows = []
        for c in sorted(set(la) | set(lb)):
            pa = _get(la.get(c), ("first_chunk_ms", "p95"))
            pb = _get(lb.get(c), ("first_chunk_ms", "p95"))
            ta = _get(la.get(c), ("audio_s_per_wall_s",))
            tb = _get(lb.get(c), ("audio_s_per_wall_s",))
            rows.append([str(c), _num(pa), _num(pb), ratio(pa, pb), _num(ta, 2), _num(tb, 2), ratio(ta, tb)])
        out.append("")
        out.append(_table(["concurrency", "A p95 first", "B p95 first", "B/A", "A audio-s/s",
                           "B audio-s/s", "B/A"], rows))
        out.append(f"highest concurrency under the SLO: A {sa.get('best_concurrency')} "
                   f"(slo {sa.get('slo_ms')} ms), B {sb.get('best_concurrency')} (slo {sb.get('slo_ms')} ms)")
    return "\n".join(out)
