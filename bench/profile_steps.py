"""What one LM decode step and one flow sampler call cost on the GPU, kernel by kernel, and what each
kernel-saving option buys.

    python bench/profile_steps.py --model-dir DIR
    python bench/profile_steps.py --paged

With --paged: the incremental flow's sampler (engine/flow_pages.py) against the re-run of the same chunk's prefix.
Otherwise: graphed ms per call for the LM decode step (batch 1 and 32, context bucket 256) and the CFM sampler
(batch 1 x 50 frames, 16 x 500) with the compiled elementwise kernels off and on, then the CUDA kernels of one
eager call of each (count and time by kernel name) in the engine's setting. Needs a GPU.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch

from cosyvoice_tts.engine.cuda_graphs import capture_graph
from cosyvoice_tts.engine.loader import build_modules
from cosyvoice_tts.engine.model_runner import ModelRunner
from cosyvoice_tts.engine.modules import pointwise


def graphed_ms(run, device: torch.device, repeats: int) -> float:
    graph, _ = capture_graph(run, device, None, warmups=2)
    graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


def kernel_table(run, calls: int = 1, rows: int = 20) -> str:
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    count, micros = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name[:90]
            count[name] += 1
            micros[name] += event.device_time
    total = sum(count.values())
    lines = [f"  {total / calls:.0f} kernels per call, {sum(micros.values()) / calls / 1000:.2f} ms of kernel time"]
    for name, n in count.most_common(rows):
        lines.append(f"  {n / calls:7.1f} x {micros[name] / n:7.1f} us  {name}")
    return "\n".join(lines)


def paged_against_rerun(flow, sampler, device: torch.device, repeats: int) -> None:
    """The incremental (paged) sampler's 10 Euler steps for (batch, new frames, past pages) against the re-run
    sampler over the whole prefix that the same chunk would otherwise cost, both graphed; then the kernels of
    one Euler step of each."""
    from cosyvoice_tts.engine.flow_pages import PagedFlow, StepRunner

    estimator = flow.decoder.estimator
    paged = PagedFlow(flow.decoder, device, torch.float16, [1, 16, 32], [50, 100, 200, 300], 300, page_frames=50)
    paged.attach(paged.memory_for(estimator, 64, 65))

    def paged_call(batch: int, frames: int, past: int):
        runner = StepRunner(paged, batch, frames, past)

        def run():
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                return runner.sample()
        return run

    cases = (((1, 100, 0), (1, 100)), ((32, 50, 3), (32, 200)), ((16, 200, 8), (16, 500)), ((16, 100, 16), (16, 900)))
    for (batch, frames, past), (rows, prefix) in cases:
        paged_ms = graphed_ms(paged_call(batch, frames, past), device, max(3, repeats // 5))
        rerun_ms = graphed_ms(sampler(rows, prefix), device, max(3, repeats // 5))
        print(f"paged sampler {batch} x {frames} frames after {past} pages: {paged_ms:.2f} ms; re-run of the "
              f"{rows} x {prefix} prefix: {rerun_ms:.2f} ms", flush=True)
    print("paged sampler 16 x 200 after 8 pages, per Euler step:\n" + kernel_table(paged_call(16, 200, 8), calls=10,
                                                                                   rows=30), flush=True)
    print("re-run sampler 16 x 500, per Euler step:\n" + kernel_table(sampler(16, 500), calls=10, rows=30), flush=True)


def release_size_flow():
    """The flow at the release size with random weights, built from `make_model`'s configuration without
    writing a model directory (the paged comparison needs nothing else)."""
    import tempfile
    from pathlib import Path

    from cosyvoice_tts.engine.hparams import HParams
    from cosyvoice_tts.engine.registry import model_registry
    from cosyvoice_tts.tools.make_model import SIZES, _format_yaml

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cosyvoice2.yaml"
        path.write_text(_format_yaml("full", SIZES["full"], 0), encoding="utf-8")
        return HParams.from_file(path, overrides={"qwen_pretrain_path": folder}).build("flow", model_registry())


def sampler_call(flow, device: torch.device):
    """sampler(batch, frames) -> a call of the flow's CFM sampler (10 steps) on fixed random inputs."""
    def sampler(batch: int, frames: int):
        mu = torch.randn(batch, 80, frames, device=device, dtype=torch.float16)
        mask = torch.ones(batch, 1, frames, device=device, dtype=torch.float16)
        spks = torch.randn(batch, 80, device=device, dtype=torch.float16)
        cond = torch.zeros_like(mu)
        flags = torch.ones(batch, dtype=torch.bool, device=device)

        def run():
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                return flow.decoder(mu=mu, mask=mask, n_timesteps=10, spks=spks, cond=cond, streaming=flags)[0]
        return run
    return sampler


def engine_flow(flow, device: torch.device):
    """The flow as the engine holds it: on the GPU, half weights, fused projections."""
    flow = flow.to(device)
    flow.store_weights_in(torch.float16)
    flow.decoder.estimator.fuse_projections()
    return flow


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", help="a model directory (needed unless --paged, which builds its own flow)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--paged", action="store_true",
                        help="only the incremental (paged) flow sampler against the re-run, compiled kernels")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    if args.paged:
        flow = engine_flow(build_modules(args.model_dir).flow if args.model_dir else release_size_flow(), device)
        if not pointwise.use_compiled(device):
            print("compiled kernels unavailable", flush=True)
        paged_against_rerun(flow, sampler_call(flow, device), device, args.repeats)
        return
    if not args.model_dir:
        parser.error("--model-dir is required")
    model = build_modules(args.model_dir)

    llm = model.llm.to(device=device, dtype=torch.bfloat16)
    llm.llm.model.model.fuse_projections()
    runner = ModelRunner(llm, device, torch.bfloat16, max_sessions=32, max_len=4096, use_cuda_graphs=False)

    def decode_step(batch: int):
        tokens = torch.zeros(batch, dtype=torch.long, device=device)
        slots = torch.arange(batch, device=device)
        positions = torch.full((batch, 1), 100, device=device)
        return lambda: runner._decode_forward(tokens, slots, positions, 256)

    flow = engine_flow(model.flow, device)
    sampler = sampler_call(flow, device)

    for compiled in (False, True):
        if compiled and not pointwise.use_compiled(device):
            print("compiled kernels unavailable", flush=True)
            break
        label = "compiled" if compiled else "eager elementwise"
        for batch in (1, 32):
            ms = graphed_ms(decode_step(batch), device, args.repeats)
            print(f"LM decode step, batch {batch}, {label}: {ms:.3f} ms", flush=True)
        for batch, frames in ((1, 50), (16, 500)):
            ms = graphed_ms(sampler(batch, frames), device, max(3, args.repeats // 5))
            print(f"CFM sampler {batch} x {frames} frames, {label}: {ms:.2f} ms", flush=True)

    print("LM decode step, batch 1, eager call (engine setting):\n" + kernel_table(decode_step(1)), flush=True)
    print("CFM sampler 1 x 50, per Euler step (engine setting):\n" + kernel_table(sampler(1, 50), calls=10),
          flush=True)


if __name__ == "__main__":
    main()
