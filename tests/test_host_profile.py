"""tools/host_profile.py: a profiler trace summarised by the engine's spans, runtime calls, ops and GPU streams."""
from __future__ import annotations

import gzip
import json

from cosyvoice_tts.tools.host_profile import load_trace, main, summarize


def _event(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid, "args": args}


TRACE = [
    _event("user_annotation", "vocoder.flow", 0, 1000),
    _event("user_annotation", "vocoder.sample", 400, 500),  # nested in the flow span
    _event("cpu_op", "aten::copy_", 10, 100),
    _event("cpu_op", "aten::to", 20, 50),  # inside the copy: not counted on its own
    _event("cuda_runtime", "cudaMemcpyAsync", 30, 20),
    _event("cuda_runtime", "cudaGraphLaunch", 500, 300),
    _event("cuda_runtime", "cudaGraphLaunch", 820, 60),
    _event("user_annotation", "lm.launch", 2000, 100, tid=2),  # another thread's span
    _event("cuda_runtime", "cudaGraphLaunch", 2010, 50, tid=2),
    _event("cuda_runtime", "cudaEventSynchronize", 2010, 500, tid=3),  # outside every span
    _event("kernel", "gemm", 600, 400, tid=7, stream=33),
    _event("kernel", "gemm", 2020, 100, tid=8, stream=14),
    {"ph": "M", "name": "thread_name", "pid": 0, "tid": 1},
]


def test_calls_count_toward_the_innermost_span_of_their_thread():
    summary = summarize(TRACE)
    spans = summary["spans"]
    assert spans["vocoder.flow"]["count"] == 1 and spans["vocoder.flow"]["total_ms"] == 1.0
    assert spans["vocoder.flow"]["runtime"] == {"cudaMemcpyAsync": [1, 0.02]}
    assert spans["vocoder.flow"]["ops"] == {"aten::copy_": [1, 0.1]}  # the op inside it is part of it
    assert spans["vocoder.sample"]["runtime"] == {"cudaGraphLaunch": [2, 0.36]}
    assert spans["lm.launch"]["runtime"] == {"cudaGraphLaunch": [1, 0.05]}
    assert spans["(none)"]["runtime"] == {"cudaEventSynchronize": [1, 0.5]}
    assert summary["streams"] == {"33": 0.4, "14": 0.1}
    assert summary["window_ms"] == 2.5  # 0 to 2510 us, all events


def test_the_command_reads_a_gzipped_trace(tmp_path, capsys):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": TRACE}, f)
    assert load_trace(path) == TRACE
    assert main([str(path), "--top", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["spans"]["vocoder.sample"]["runtime"] == {"cudaGraphLaunch": [2, 0.36]}
