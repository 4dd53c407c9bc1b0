"""Does splitting the GPU's SMs between the LM and the vocoder keep LM steps fast while the vocoder runs?

Under load an LM decode step (a few hundred small kernels in one CUDA graph) waits behind the flow's large
kernels: 1.5 ms alone, ~4.6 ms beside the vocoder on an H100 (docs/performance.md, r11). Stream priority only
orders blocks not yet started. This probe replays an LM-like graph and a vocoder-like graph, alone and together,
on the whole device (priority streams, as the engine runs today) and on disjoint green contexts (CUDA 12.4+
SM partitions, `engine/sm_partition.py`), and checks that a graph captured on a partition's stream stays there.

    PYTHONPATH=app python3 bench/sm_partition_probe.py [--lm-sms 16,24,32]
"""
from __future__ import annotations

import argparse
import time

import torch
from cosyvoice_tts.engine.sm_partition import split_streams


def lm_like(device):
    """24 layers of a Qwen2-0.5B decode step at batch 32: the GEMMs and a few elementwise kernels each."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(32, 896, device=device, dtype=torch.bfloat16, generator=g)
    layers = [[torch.randn(k, n, device=device, dtype=torch.bfloat16, generator=g) * 0.02
               for k, n in ((896, 1152), (896, 896), (896, 9728), (4864, 896))] for _ in range(24)]

    def step():
        h = x
        for qkv, o, gate_up, down in layers:
            a = (h @ qkv)[:, :896]
            h = h + torch.nn.functional.layer_norm(a @ o, (896,))
            gu = h @ gate_up
            h = h + (torch.nn.functional.silu(gu[:, :4864]) * gu[:, 4864:]) @ down
        return h
    return step


def vocoder_like(device):
    """Flow-estimator-sized work: GEMMs over 16 x 500 frames, 1024 wide."""
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(16 * 500, 1024, device=device, dtype=torch.float16, generator=g)
    weights = [torch.randn(1024, 1024, device=device, dtype=torch.float16, generator=g) * 0.03 for _ in range(8)]

    def call():
        h = x
        for _ in range(25):
            for w in weights:
                h = torch.nn.functional.gelu(h @ w)
        return h
    return call


def capture(fn, stream):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


def replay_ms(graph, stream, n=20):
    with torch.cuda.stream(stream):
        graph.replay()
        stream.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            graph.replay()
        stream.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def together(lm_graph, lm_stream, voc_graph, voc_stream, steps=200, vocoder_calls=12):
    """LM steps one at a time (each waited for, as the engine's step ends in a host copy) while a queue of
    vocoder calls runs: per-step ms p50/p95 and the vocoder's ms per call."""
    with torch.cuda.stream(voc_stream):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(vocoder_calls):
            voc_graph.replay()
        end.record()
    times = []
    with torch.cuda.stream(lm_stream):
        for _ in range(steps):
            t = time.perf_counter()
            lm_graph.replay()
            lm_stream.synchronize()
            times.append((time.perf_counter() - t) * 1e3)
            if end.query():
                break
    end.synchronize()
    times.sort()
    return (times[len(times) // 2], times[int(len(times) * 0.95)], len(times),
            start.elapsed_time(end) / vocoder_calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-sms", default="16,24,32")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{torch.cuda.get_device_name(device)}: {sms} SMs, torch {torch.__version__}")
    lm_step, voc_call = lm_like(device), vocoder_like(device)

    high, low = torch.cuda.Stream(device, priority=-1), torch.cuda.Stream(device)
    lm_g, voc_g = capture(lm_step, high), capture(voc_call, low)
    print(f"whole device: LM step alone {replay_ms(lm_g, high, 200):.3f} ms, vocoder call alone "
          f"{replay_ms(voc_g, low):.2f} ms")
    p50, p95, n, voc = together(lm_g, high, voc_g, low)
    print(f"whole device, together (LM on the high-priority stream): LM step p50 {p50:.3f} p95 {p95:.3f} ms "
          f"({n} steps), vocoder {voc:.2f} ms/call")

    for count in (int(s) for s in args.lm_sms.split(",")):
        split = split_streams(device, count)
        if split is None:
            print(f"lm_sms={count}: no split (see the log above)")
            continue
        lm_s, voc_s = split.lm, split.vocoder
        lm_p, voc_p = capture(lm_step, lm_s), capture(voc_call, voc_s)
        print(f"split {split.lm_sms} / {split.vocoder_sms} SMs: LM step alone {replay_ms(lm_p, lm_s, 200):.3f} ms, "
              f"vocoder call alone {replay_ms(voc_p, voc_s):.2f} ms")
        p50, p95, n, voc = together(lm_p, lm_s, voc_p, voc_s)
        print(f"  together: LM step p50 {p50:.3f} p95 {p95:.3f} ms ({n} steps), vocoder {voc:.2f} ms/call")
        # Where does a graph run: the stream it was captured on, or the one it is replayed on?
        print(f"  vocoder graph captured on the whole device, replayed on the LM's {split.lm_sms} SMs: "
              f"{replay_ms(voc_g, lm_s, 5):.2f} ms; captured on the LM's SMs, replayed on a whole-device "
              f"stream: {replay_ms(capture(voc_call, lm_s), low, 5):.2f} ms")
        p50, p95, n, voc = together(lm_g, lm_s, voc_g, voc_s)
        print(f"  together, graphs captured on the whole device, replayed on the split: LM p50 {p50:.3f} "
              f"p95 {p95:.3f} ms, vocoder {voc:.2f} ms/call")


if __name__ == "__main__":
    main()
