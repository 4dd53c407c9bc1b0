"""PNG plots of a bench run (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def first_chunk_cdf(records: list[dict], path: Path, title: str = "") -> Path:
    """CDF of first-chunk latency of ok requests; one curve per sweep level when there are levels."""
    plt = _plt()
    groups: dict = {}
    for r in records:
        if r["outcome"] == "ok" and r.get("first_chunk_ms") is not None:
            groups.setdefault(r.get("level"), []).append(r["first_chunk_ms"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for level in sorted(groups, key=lambda x: (x is None, x)):
        xs = sorted(groups[level])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        label = f"concurrency {level} (n={len(xs)})" if level is not None else f"n={len(xs)}"
        ax.step(xs, ys, where="post", label=label)
    for q in (0.5, 0.95):
        ax.axhline(q, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("first audio chunk after first text, ms")
    ax.set_ylabel("fraction of ok requests")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "First-chunk latency CDF")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rtf_over_time(records: list[dict], path: Path, title: str = "") -> Path:
    """RTF of each ok request at its end time, coloured by worker; failures marked on the axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_worker: dict = {}
    for r in records:
        if r["outcome"] == "ok" and r.get("rtf") is not None:
            by_worker.setdefault(r.get("worker") or "(unknown)", []).append((r["t_end"], r["rtf"]))
    for w in sorted(by_worker):
        pts = sorted(by_worker[w])
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, label=w, alpha=0.8)
    fails = [r["t_end"] for r in records if r["outcome"] != "ok" and r.get("t_end") is not None]
    if fails:
        ax.scatter(fails, [0] * len(fails), marker="x", color="red", s=25, label="failed request")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("time since the run started, s (request end)")
    ax.set_ylabel("RTF (total time / audio seconds)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if by_worker or fails:
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "RTF over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_chart(levels: list[dict], slo_ms: float | None, best: int | None, path: Path,
                title: str = "") -> Path:
    """Latency (p50/p95 first chunk) and throughput against concurrency, with the SLO and its limit."""
    plt = _plt()
    cs = [lv["concurrency"] for lv in levels]
    p50 = [lv["summary"]["first_chunk_ms"]["p50"] for lv in levels]
    p95 = [lv["summary"]["first_chunk_ms"]["p95"] for lv in levels]
    thr = [lv["summary"]["audio_s_per_wall_s"] for lv in levels]
    rps = [lv["summary"]["throughput_rps"] for lv in levels]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7.5, 7), sharex=True)
    ax1.plot(cs, [v if v is not None else float("nan") for v in p50], "o-", label="p50 first chunk")
    ax1.plot(cs, [v if v is not None else float("nan") for v in p95], "s-", label="p95 first chunk")
    if slo_ms is not None:
        ax1.axhline(slo_ms, color="red", ls="--", lw=1, label=f"SLO {slo_ms:g} ms")
    if best is not None:
        for ax in (ax1, ax2):
            ax.axvline(best, color="green", ls=":", lw=1.2)
        ax1.annotate(f" highest concurrency under the SLO: {best}", xy=(best, 0.95),
                     xycoords=("data", "axes fraction"), fontsize=8, color="green",
                     ha="left" if best != cs[-1] else "right")
    for c, v, lv in zip(cs, p95, levels):  # p50/p95 are over ok requests: say where some failed
        rate = lv["summary"]["error_rate"]
        if rate > 0:
            ax1.annotate(f"{100 * rate:.0f}% failed", xy=(c, v if v is not None else 0), fontsize=8,
                         color="red", textcoords="offset points",
                         xytext=(4, 6) if c != cs[-1] else (-60, 6))
    ax1.set_ylabel("first chunk, ms (ok requests)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(cs, [v if v is not None else float("nan") for v in thr], "o-", color="tab:purple",
             label="audio seconds per wall second")
    ax2.set_ylabel("audio-s / wall-s")
    ax2b = ax2.twinx()
    ax2b.plot(cs, [v if v is not None else float("nan") for v in rps], "^--", color="tab:orange",
              label="requests per second")
    ax2b.set_ylabel("req/s")
    h1, l1 = ax2.get_legend_handles_labels()
    h2, l2 = ax2b.get_legend_handles_labels()
    ax2.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
    ax2.set_xlabel("concurrent sessions")
    ax2.grid(alpha=0.3)
    if cs and min(cs) > 0 and max(cs) / min(cs) >= 8:
        ax2.set_xscale("log", base=2)
    ax2.set_xticks(cs)
    ax2.set_xticklabels([str(c) for c in cs])
    fig.suptitle(title or "Concurrency sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
