"""Where a vocoder batch spends GPU time: torch.profiler over HiFT on a batch of chunks, under a few settings.

    python bench/profile_vocoder.py --model-dir DIR [--batch 16 --frames 506]

Prints ms per call for: HiFT as the engine runs it (fp32, cuDNN heuristics), with cuDNN autotuning, and with
the convolutions in TF32 off; then the top CUDA kernels of the engine's setting. Needs a GPU.
"""
from __future__ import annotations

import argparse
import time

import torch

from cosyvoice_tts.engine.loader import build_modules


def timed(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats * 1000


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=506)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda:0")
    hift = build_modules(args.model_dir).hift.to(device)
    mels = [torch.randn(1, 80, args.frames, device=device) for _ in range(args.batch)]
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(args.batch)]

    def call():
        return hift.inference_batch(mels, None, generators)

    audio_s = args.batch * args.frames / 50
    for label, bench, tf32 in (("engine setting", False, True), ("cudnn.benchmark", True, True),
                               ("no TF32 convs", False, False)):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = bench, tf32
        ms = timed(call, args.repeats)
        print(f"hift {args.batch} x {args.frames} frames ({audio_s:.0f} audio-s), {label}: {ms:.1f} ms "
              f"({audio_s / ms * 1000:.0f} audio-s/s)", flush=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
        print(f"hift under bf16 autocast (not what the engine runs): {timed(call, args.repeats):.1f} ms", flush=True)

    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
