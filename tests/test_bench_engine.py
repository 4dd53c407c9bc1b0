"""The in-process engine benchmark (`cosyvoice_tts.tools.bench_engine`) on the tiny model and the CPU: the report
has what docs/performance.md quotes (the paged flow against the re-run, stage times of both, levels of both)."""
from __future__ import annotations

import json
import time

from dataclasses import replace

import pytest
import torch

from cosyvoice_tts.tools import bench_engine


def test_stage_shapes_parse_first_and_last_chunks():
    assert bench_engine.parse_stage_shapes("1x28,16x253L,,2x9l") == [(1, 28, False), (16, 253, True), (2, 9, True)]
    with pytest.raises(ValueError):
        bench_engine.parse_stage_shapes("16")


def test_report_compares_the_paged_flow_with_the_rerun(tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    code = bench_engine.main(["--model-dir", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
                              "--concurrency", "1", "--duration", "1", "--max-sessions", "2",
                              "--stage-times", "1x28,1x90L", "--rerun-levels", "1", "--paged-from-frames", "0",
                              "--single-prefill-levels", "2", "--burst-levels", "2", "--default-switch-levels", "1",
                              "--flow-levels", "1:rerun", "--vocoder-levels", "1:thread,1:overlap:hold_ahead_s=0.5",
                              # no ramp: on a slow CPU a level's first request could outlast it (the ramp's
                              # counting is tested below with stand-in requests)
                              "--ramp", "0", "--out", str(out)])
    assert code in (0, None)
    report = json.loads(out.read_text())
    assert report["paged_flow_vs_rerun_max_abs_diff"] < 1e-4
    assert report["flow_memory_pages"] > 0
    stages = {(row["flow"], row["chunk"]) for row in report["vocoder_stage_ms"]}
    assert stages == {("paged", "first"), ("paged", "last"), ("rerun", "first"), ("rerun", "last")}
    assert [(level["concurrency"], level["flow"], level["prefill"], level["arrivals"]) for level in report["levels"]] \
        == [(1, "paged", "batched", "staggered"), (1, "rerun", "batched", "staggered"),
            (2, "paged", "single", "staggered"), (2, "paged", "batched", "burst"),
            (1, "paged", "batched", "staggered"), (1, "rerun", "batched", "staggered"),
            (1, "paged", "batched", "staggered"), (1, "paged", "batched", "staggered")]
    paged_level, rerun_level, single_level, burst_level, switch_level, flow_level, thread_level, overlap_level = \
        report["levels"]
    assert [level["vocoder"] for level in report["levels"]] == ["overlap"] * 6 + ["thread", "overlap"]
    assert overlap_level["settings"] == {"hold_ahead_s": 0.5} and thread_level["settings"] == {}
    for level in (overlap_level, thread_level):
        assert not level["errors"] and level["requests"] >= 1 and level["engine"]["vocoder_batches"] > 0
    assert flow_level["engine"]["flow_paged_graphed_calls"] + flow_level["engine"]["flow_paged_eager_calls"] == 0
    assert burst_level["warmup_requests"] == 0 and not burst_level["errors"]
    assert switch_level["gil_switch_interval_s"] == bench_engine.DEFAULT_SWITCH_INTERVAL_S
    assert paged_level["gil_switch_interval_s"] < switch_level["gil_switch_interval_s"]
    # One stream alone: its first chunk's 28 tokens (25 + 3 lookahead) took 28 engine steps (prefill included).
    assert paged_level["first_chunk_lm_steps_p50"] == 28 and paged_level["first_chunk_lm_ms_per_step_p50"] > 0
    assert not single_level["errors"] and single_level["requests"] >= 2
    assert paged_level["engine"]["flow_paged_eager_calls"] > 0  # on the CPU every call is eager
    # the sampling's CPU time leaves out GIL waits: never more than its wall time
    assert 0 < paged_level["engine"]["sample_cpu_s"] <= paged_level["engine"]["sample_s"] + 1e-3
    assert rerun_level["engine"]["flow_paged_graphed_calls"] + rerun_level["engine"]["flow_paged_eager_calls"] == 0
    assert not paged_level["errors"] and not rerun_level["errors"]


def test_staggered_users_start_over_the_ramp_and_count_after_it(monkeypatch):
    submitted: list[tuple[int, float]] = []
    started = time.monotonic()

    def fake_request(engine, text, seed, voice):
        submitted.append((seed // 1000, time.monotonic() - started))
        time.sleep(0.05)
        return {"first_chunk_ms": 10.0, "audio_s": 1.0, "wall_s": 0.05, "rtf": 0.05, "stall_s": 0.0,
                "chunks": 1, "outcome": "ok"}

    monkeypatch.setattr(bench_engine, "run_request", fake_request)

    class CpuEngine:
        device = torch.device("cpu")

    summary = bench_engine.run_level(CpuEngine(), 4, 0.3, "text", "voice", arrivals="staggered", ramp_s=0.4)
    first_by_user = {}
    for user, at in submitted:
        first_by_user.setdefault(user, at)
    # user i's first request comes i/4 of the ramp after the start
    for user, at in first_by_user.items():
        assert at == pytest.approx(0.1 * user, abs=0.04)
    assert summary["warmup_requests"] + summary["requests"] == len(submitted)
    assert summary["warmup_requests"] > 0 and summary["requests"] > 0
    with pytest.raises(ValueError):
        bench_engine.run_level(CpuEngine(), 1, 0.1, "text", "voice", arrivals="sometimes")


def test_scheduling_levels_name_the_vocoder_policies():
    from cosyvoice_tts.engine.scheduler import SchedulerConfig

    assert bench_engine.parse_scheduling_levels("32:none,,48:fit+hold") == [(32, "none"), (48, "fit+hold")]
    assert bench_engine.parse_named_levels("32:paged,32:rerun", bench_engine.FLOWS, "FLOW") == [(32, "paged"),
                                                                                              (32, "rerun")]
    with pytest.raises(ValueError, match="LEVEL:FLOW"):
        bench_engine.parse_named_levels("32:fast", bench_engine.FLOWS, "FLOW")
    with pytest.raises(ValueError):
        bench_engine.parse_scheduling_levels("32:fastest")
    base = SchedulerConfig()
    none = bench_engine.scheduling_config(base, "none")
    assert (none.fit_batches, none.hold_ahead_s) == (False, None)
    both = bench_engine.scheduling_config(none, "fit+hold")
    assert both.fit_batches and both.hold_ahead_s == SchedulerConfig.hold_ahead_s


def test_decode_check_runs_where_there_are_no_graphs(tiny_model_dir):
    from cosyvoice_tts.engine import Engine

    engine = Engine.load(tiny_model_dir, max_sessions=4)  # CPU: both steps eager, so equal
    assert bench_engine.check_decode_graphs(engine) == 0.0
    assert engine.runner.cache.free_slots() == 4


def test_vocoder_levels_name_a_placement_and_scheduler_settings():
    from cosyvoice_tts.engine.scheduler import SchedulerConfig

    runs = bench_engine.parse_vocoder_levels("32:thread,,16:overlap:hold_ahead_s=0.5:max_vocoder_frames=4096")
    assert runs == [(32, "thread", ()), (16, "overlap", (("hold_ahead_s", 0.5), ("max_vocoder_frames", 4096.0)))]
    config = bench_engine.level_config(SchedulerConfig(), runs[1][2])
    assert config.hold_ahead_s == 0.5 and config.max_vocoder_frames == 4096
    assert isinstance(config.max_vocoder_frames, int)
    (_, _, settings), = bench_engine.parse_vocoder_levels(
        "32:overlap:first_chunks_apart=0:replays_apart=0:text_worker=0:prefill_with_decode=0")
    assert settings == (("first_chunks_apart", 0.0), ("replays_apart", 0.0), ("text_worker", 0.0),
                        ("prefill_with_decode", 0.0))
    config = bench_engine.level_config(SchedulerConfig(), settings)  # the vocoder's own setting is not the config's
    assert config.first_chunks_apart is False and config == replace(SchedulerConfig(), first_chunks_apart=False)
    for bad in ("32:fast", "32:overlap:hold_ahead_s", "32:overlap:nope=2", "32:overlap:prompt=1"):
        with pytest.raises(ValueError, match="LEVEL:PLACEMENT|FIELD=VALUE"):
            bench_engine.parse_vocoder_levels(bad)


def test_a_profiled_level_reports_the_loop_by_span(tiny_model_dir, tmp_path):
    from cosyvoice_tts.engine import host_spans

    out, trace = tmp_path / "report.json", tmp_path / "trace.json"
    code = bench_engine.main(["--model-dir", str(tiny_model_dir), "--device", "cpu", "--dtype", "fp32",
                              "--concurrency", "1", "--duration", "3", "--max-sessions", "2", "--ramp", "0",
                              "--vocoder-levels",
                              "1:overlap:first_chunks_apart=0:replays_apart=0:text_worker=0:prefill_with_decode=0",
                              "--profile-level", "1", "--profile-seconds", "2", "--profile-trace", str(trace),
                              "--out", str(out)])
    assert code in (0, None)
    report = json.loads(out.read_text())
    *_, settings_level, profiled = report["levels"]
    assert settings_level["settings"] == {"first_chunks_apart": 0.0, "replays_apart": 0.0, "text_worker": 0.0,
                                          "prefill_with_decode": 0.0}
    assert settings_level["engine"]["prefills_with_decode"] == 0
    assert not settings_level["errors"] and settings_level["requests"] >= 1
    assert profiled["profiled"] is True and not profiled["errors"]
    spans = report["host_profile"]["spans"]
    known = {"loop.bookkeeping", "lm.extend", "lm.launch", "lm.readback", "lm.sample", "vocoder.hand_off",
             "vocoder.flow", "vocoder.sample", "vocoder.hift", "(none)"}
    assert set(spans) <= known and set(spans) & (known - {"(none)"})  # on the CPU one batch can fill the window
    assert any(span["ops"] for name, span in spans.items() if name != "(none)")  # torch calls found their span
    assert json.loads(trace.read_text())["traceEvents"]
    assert host_spans.span("x").__class__.__name__ == "nullcontext"  # spans are off again after the window
