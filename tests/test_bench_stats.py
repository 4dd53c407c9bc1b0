"""Unit tests of the bench's statistics, stall detection, timing and reports, on hand-made timelines."""

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import report, stats  # noqa: E402
from bench.client import RequestResult, finalize_timing  # noqa: E402
from bench.corpus import BUILTIN, TextPicker, builtin_texts, llm_fragments, load_texts  # noqa: E402


# ---- percentiles ----

def test_percentile_hand_computed():
    xs = [4, 1, 3, 2]  # unsorted on purpose
    assert stats.percentile(xs, 0) == 1
    assert stats.percentile(xs, 50) == pytest.approx(2.5)
    assert stats.percentile(xs, 90) == pytest.approx(3.7)   # rank 2.7: 3 + 0.7 * (4 - 3)
    assert stats.percentile(xs, 100) == 4
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([], 50) is None
    assert stats.percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 95) == pytest.approx(95.5)
    with pytest.raises(ValueError):
        stats.percentile(xs, 101)


def test_percentile_matches_numpy_linear():
    np = pytest.importorskip("numpy")
    rng = random.Random(3)
    for n in (2, 3, 10, 101):
        xs = [rng.uniform(0, 1000) for _ in range(n)]
        for q in (50, 90, 95, 99):
            assert stats.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_with_failures_as_infinity():
    # 19 answered + 1 never answered: p95 rank 18.05 lies between the slowest answer and infinity
    xs = [float(i) for i in range(1, 20)] + [math.inf]
    assert stats.percentile(xs, 95) == math.inf
    assert stats.percentile(xs, 90) == pytest.approx(18.1)
    assert stats.percentile([math.inf, math.inf], 50) == math.inf


def test_describe():
    d = stats.describe([None, 3.0, 1.0, 2.0])
    assert d["n"] == 3 and d["min"] == 1.0 and d["max"] == 3.0 and d["mean"] == pytest.approx(2.0)
    assert d["p50"] == 2.0 and d["p99"] == pytest.approx(2.98)
    e = stats.describe([])
    assert e["n"] == 0 and e["p95"] is None and e["max"] is None


# ---- playback stall detection ----

def test_no_stall_when_chunks_outrun_playback():
    st = stats.playback_stalls([0.0, 0.5, 1.0, 1.5], [1.0, 1.0, 1.0, 1.0])
    assert st["stall_count"] == 0 and st["stall_total"] == 0.0
    assert st["gaps"] == pytest.approx([0.5, 0.5, 0.5])
    assert st["buffered"] == pytest.approx([1.0, 1.5, 2.0, 2.5])


def test_stalls_when_gap_exceeds_buffer():
    # 0.2 s chunks. t=0: 0.2 s buffered. Next at 0.5: the gap 0.5 outlasts 0.2 buffered -> 0.3 s silence;
    # playback resumes at 0.5, runs out at 0.7. Next at 0.6 (gap 0.1 < 0.1 + ... buffered 0.2): fine, runs
    # out at 0.9. Next at 1.0: 0.1 s silence.
    st = stats.playback_stalls([0.0, 0.5, 0.6, 1.0], [0.2, 0.2, 0.2, 0.2])
    assert st["stall_count"] == 2
    assert [i for i, _ in st["stalls"]] == [1, 3]
    assert [s for _, s in st["stalls"]] == pytest.approx([0.3, 0.1])
    assert st["stall_total"] == pytest.approx(0.4)
    assert st["stall_max"] == pytest.approx(0.3)
    assert st["buffered"] == pytest.approx([0.2, 0.2, 0.3, 0.2])


def test_gap_equal_to_buffer_is_not_a_stall_and_big_first_chunk_absorbs_gaps():
    st = stats.playback_stalls([0.0, 0.25], [0.25, 0.25])
    assert st["stall_count"] == 0
    # 2 s first chunk covers a 1.9 s gap; later the buffer is spent and a late chunk stalls
    st = stats.playback_stalls([0.0, 1.9, 2.1, 2.5], [2.0, 0.1, 0.1, 0.1])
    assert st["stall_count"] == 1
    assert st["stalls"][0][0] == 3 and st["stalls"][0][1] == pytest.approx(0.3)


def test_stall_input_checks():
    empty = stats.playback_stalls([], [])
    assert empty["stall_count"] == 0 and empty["gaps"] == []
    with pytest.raises(ValueError):
        stats.playback_stalls([0.0, 1.0], [0.1])
    with pytest.raises(ValueError):
        stats.playback_stalls([1.0, 0.5], [0.1, 0.1])


def test_finalize_timing_of_a_streamed_request():
    res = RequestResult(request_id="r", session=0, index=0, level=None, text_chars=10, mode="stream",
                        sample_rate=24000)
    # first text at 10.0, end of text at 10.5; 0.5 s of audio at 10.2, 1.0 s at 10.9; finished at 11.0
    finalize_timing(res, t_first_text=10.0, t_end_text=10.5, t_finished=11.0,
                    arrivals=[10.2, 10.9], sizes=[24000, 48000])
    assert res.bytes == 72000 and res.chunks == 2
    assert res.audio_s == pytest.approx(1.5)
    assert res.first_chunk_ms == pytest.approx(200.0)
    assert res.first_chunk_after_end_ms == pytest.approx(-300.0)  # audio began before the text ended
    assert res.total_ms == pytest.approx(1000.0)
    assert res.rtf == pytest.approx(1.0 / 1.5)
    assert res.gaps_ms == pytest.approx([700.0])
    assert res.max_gap_ms == pytest.approx(700.0)
    assert res.stall_count == 1 and res.stall_total_ms == pytest.approx(200.0)


# ---- summaries ----

def _rec(outcome, worker="w1", first=None, rtf=None, audio=0.0, t=(0.0, 1.0), code=None, stalls=0,
         stall_ms=0.0):
    return {"outcome": outcome, "worker": worker, "first_chunk_ms": first, "rtf": rtf, "audio_s": audio,
            "t_start": t[0], "t_end": t[1], "error_code": code, "stall_count": stalls,
            "stall_total_ms": stall_ms, "stall_max_ms": stall_ms, "bytes": int(audio * 48000),
            "total_ms": None if first is None else first + 500, "first_chunk_after_end_ms": first,
            "max_gap_ms": 10.0 if outcome == "ok" else None}


def test_summarize_hand_made_run():
    recs = [
        _rec("ok", "w1", 100.0, 0.5, 2.0, (0.0, 1.0)),
        _rec("ok", "w1", 300.0, 0.7, 3.0, (0.5, 2.5), stalls=2, stall_ms=150.0),
        _rec("ok", "w2", 200.0, 0.6, 1.0, (1.0, 4.0)),
        _rec("busy", None, t=(1.0, 1.01), code="busy"),
        _rec("dropped", "w2", t=(2.0, 3.0), code="timeout"),
        _rec("error", None, t=(2.0, 2.1), code="unknown_voice"),
    ]
    s = stats.summarize(recs)
    assert s["requests"] == 6
    assert s["outcomes"] == {"ok": 3, "busy": 1, "error": 1, "dropped": 1}
    assert s["errors"] == {"busy": 1, "dropped:timeout": 1, "error:unknown_voice": 1}
    assert s["error_rate"] == pytest.approx(0.5)
    assert s["wall_s"] == pytest.approx(4.0)           # first start 0.0 -> last end 4.0
    assert s["throughput_rps"] == pytest.approx(0.75)  # 3 ok in 4 s
    assert s["audio_s_total"] == pytest.approx(6.0)
    assert s["audio_s_per_wall_s"] == pytest.approx(1.5)
    assert s["first_chunk_ms"]["n"] == 3 and s["first_chunk_ms"]["p50"] == pytest.approx(200.0)
    assert s["first_chunk_ms"]["max"] == 300.0
    assert s["rtf"]["p90"] == pytest.approx(0.68)
    assert s["first_chunk_p95_all_ms"] == math.inf   # 3 of 6 never answered
    assert s["stalls"] == {"requests_with_stalls": 1, "stall_count": 2, "stall_total_ms": 150.0,
                           "stall_max_ms": 150.0}
    w = s["workers"]
    assert set(w) == {"w1", "w2", "(unknown)"}
    assert w["w1"]["requests"] == 2 and w["w1"]["ok"] == 2 and w["w1"]["audio_s"] == pytest.approx(5.0)
    assert w["w1"]["first_chunk_p50_ms"] == pytest.approx(200.0)
    assert w["w2"]["requests"] == 2 and w["w2"]["ok"] == 1
    assert w["(unknown)"]["requests"] == 2
    assert sum(v["share"] for v in w.values()) == pytest.approx(1.0)
    # an explicit window overrides the one derived from the records
    assert stats.summarize(recs, wall_s=6.0)["throughput_rps"] == pytest.approx(0.5)


def test_summarize_empty():
    s = stats.summarize([])
    assert s["requests"] == 0 and s["throughput_rps"] is None and s["first_chunk_p95_all_ms"] is None


def _level(c, firsts, fails=0):
    recs = [_rec("ok", first=f, rtf=0.5, audio=1.0) for f in firsts]
    recs += [_rec("busy", code="busy") for _ in range(fails)]
    return {"concurrency": c, "summary": stats.summarize(recs)}


def test_slo_max_concurrency():
    levels = [_level(1, [100] * 20), _level(2, [150] * 20), _level(4, [250] * 19 + [400]),
              _level(8, [900] * 20)]
    # p95 at c=4: rank 18.05 between 250 and 400 -> 257.5
    assert stats.slo_max_concurrency(levels, 300) == 4
    assert stats.slo_max_concurrency(levels, 200) == 2
    assert stats.slo_max_concurrency(levels, 50) is None
    assert stats.slo_max_concurrency(levels, 1000) == 8
    # a level that refuses more than 5% of its requests misses any SLO, and the walk stops there
    levels[1] = _level(2, [150] * 18, fails=2)
    assert stats.slo_max_concurrency(levels, 300) == 1
    # one refusal in 40 stays within p95
    assert stats.slo_max_concurrency([_level(1, [100] * 39, fails=1)], 300) == 1


# ---- reports ----

def test_summary_and_compare_text():
    a = {"command": "run A", "summary": stats.summarize([_rec("ok", first=100.0, rtf=0.5, audio=2.0)])}
    b = {"command": "run B", "summary": stats.summarize([_rec("ok", first=150.0, rtf=0.25, audio=2.0),
                                                         _rec("busy", code="busy")])}
    text = report.summary_text(b["summary"], title="T")
    assert "ok 1, busy 1" in text and "errors by kind" in text and "busy" in text
    assert "first chunk, ms (from first text)" in text and "150.0" in text
    cmp_ = report.compare_text(a, b)
    row = next(line for line in cmp_.splitlines() if line.startswith("first chunk p50 ms"))
    assert row.split()[-3:] == ["100.0", "150.0", "1.50x"]
    row = next(line for line in cmp_.splitlines() if line.startswith("RTF p50"))
    assert row.split()[-1] == "0.50x"
    assert report.ratio(0, 0) == "-" and report.ratio(0, 1) == "inf" and report.ratio(None, 1) == "-"


# ---- corpus ----

def test_builtin_corpus_mixes_languages_and_lengths():
    zh, en = builtin_texts("zh"), builtin_texts("en")
    assert len(zh) >= 10 and len(en) >= 10
    for texts in (zh, en):
        lengths = sorted(len(t) for t in texts)
        assert lengths[0] < 30 and lengths[-1] > 4 * lengths[0]
    assert len(builtin_texts()) == len(BUILTIN)
    with pytest.raises(ValueError):
        builtin_texts("fr")


def test_llm_fragments_round_trip_and_shape():
    for _, text in BUILTIN:
        frags = llm_fragments(text)
        assert "".join(frags) == text
        assert all(frags)
    assert llm_fragments("Hello, it's 2024.") == ["Hello", ",", " it's", " 202", "4", "."]
    assert llm_fragments("今天北京晴。") == ["今天", "北京", "晴", "。"]


def test_text_picker_covers_corpus_each_pass_and_is_seeded(tmp_path):
    texts = [f"t{i}" for i in range(7)]
    p = TextPicker(texts, seed=1)
    first = [p.next() for _ in range(7)]
    assert sorted(first) == sorted(texts)
    assert [TextPicker(texts, seed=1).next() for _ in range(1)] == first[:1]
    f = tmp_path / "texts.txt"
    f.write_text("# comment\n\nfirst line\n  second  \n", encoding="utf-8")
    assert load_texts(f) == ["first line", "second"]
    f.write_text("# only a comment\n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_texts(f)


def test_progress_line_shows_running_percentiles_and_errors():
    import io

    from bench.progress import Progress

    buf = io.StringIO()
    p = Progress(total=5, stream=buf, label="c=2 ")
    for first in (100.0, 200.0, 300.0):
        p.add(_rec("ok", first=first, rtf=0.5, audio=1.0))
    p.add(_rec("busy", code="busy"))
    line = p.line()
    assert line.startswith("c=2 [")
    assert "4/5" in line and "first p50 200ms p95 290ms" in line and "rtf p50 0.50" in line
    assert "errors 1 (busy 1 err 0 drop 0)" in line
    p.render(final=True)
    assert buf.getvalue().count("\n") == 1  # not a terminal: whole lines, no carriage returns
