"""The in-process engine benchmark (`cosyvoice_tts.tools.bench_engine`) on the tiny model and the CPU: the report
has what docs/performance.md quotes (the paged flow against the re-run, stage times of both, levels of both)."""
from __future__ import annotations

import json

import pytest

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
                              "--single-prefill-levels", "2",
                              "--out", str(out)])
    assert code in (0, None)
    report = json.loads(out.read_text())
    assert report["paged_flow_vs_rerun_max_abs_diff"] < 1e-4
    assert report["flow_memory_pages"] > 0
    stages = {(row["flow"], row["chunk"]) for row in report["vocoder_stage_ms"]}
    assert stages == {("paged", "first"), ("paged", "last"), ("rerun", "first"), ("rerun", "last")}
    assert [(level["concurrency"], level["flow"], level["prefill"]) for level in report["levels"]] == \
        [(1, "paged", "batched"), (1, "rerun", "batched"), (2, "paged", "single")]
    paged_level, rerun_level, single_level = report["levels"]
    # One stream alone: its first chunk's 28 tokens (25 + 3 lookahead) took 28 engine steps (prefill included).
    assert paged_level["first_chunk_lm_steps_p50"] == 28 and paged_level["first_chunk_lm_ms_per_step_p50"] > 0
    assert not single_level["errors"] and single_level["requests"] >= 2
    assert paged_level["engine"]["flow_paged_eager_calls"] > 0  # on the CPU every call is eager
    assert rerun_level["engine"]["flow_paged_graphed_calls"] + rerun_level["engine"]["flow_paged_eager_calls"] == 0
    assert not paged_level["errors"] and not rerun_level["errors"]
