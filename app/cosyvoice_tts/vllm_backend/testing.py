"""Test helper: a tiny model directory whose LM vLLM's CPU attention accepts (head_dim 32, not the tiny 16)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def make_vllm_tiny_model(tiny_dir: str | Path, out_dir: str | Path, seed: int = 0, heads: int = 2,
                         kv_heads: int = 1) -> Path:
    """Copy a `make_model(size="tiny")` directory and rebuild its LM with fewer, wider heads (same hidden size).

    vLLM's CPU attention supports head sizes 32..512; the tiny model's 64-wide hidden with 4 heads has 16.
    The LM is initialised and wired the same way make_model does (end-of-speech only after the task token).
    """
    from ..engine.hparams import HParams
    from ..engine.registry import model_registry
    from ..tools.make_model import init_llm_weights, wire_control_tokens

    tiny_dir, out_dir = Path(tiny_dir), Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(tiny_dir, out_dir, ignore=shutil.ignore_patterns("vllm_export", ".vllm_export*"))
    config_path = out_dir / "CosyVoice-BlankEN" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_attention_heads"] = heads
    config["num_key_value_heads"] = kv_heads
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    hparams = HParams.from_file(out_dir / "cosyvoice2.yaml",
                                overrides={"qwen_pretrain_path": str(out_dir / "CosyVoice-BlankEN")})
    torch.manual_seed(seed)
    llm = hparams.build("llm", model_registry())
    init_llm_weights(llm, torch.Generator().manual_seed(seed))
    wire_control_tokens(llm)
    torch.save(llm.state_dict(), out_dir / "llm.pt")
    return out_dir


class TorchLMClient:
    """A stand-in for vLLM in tests: `driver.LMClient` computed with our own LM (native modules, CPU).

    It does what vLLM does with a SubRequest: prefill the context's embeddings, then sample a token, feed its speech
    embedding, and so on, with the RAS distribution of `ras.ras_logprobs` (what `RasLogitsProcessor` hands vLLM's
    sampler), eos masked for `mask_eos_steps` tokens, stopping at a stop token or after `max_tokens`.
    """

    def __init__(self, model_dir, max_sessions: int = 4, max_context: int = 1024):
        from ..engine.loader import build_modules
        from ..engine.model_runner import ModelRunner

        self.llm = build_modules(model_dir).llm
        self.runner = ModelRunner(self.llm, torch.device("cpu"), torch.float32, max_sessions, max_context, False)
        self.requests: list[tuple[str, list, object]] = []  # (request id, context, spec)
        self.aborted: list[str] = []
        self.active = 0

    async def generate(self, context, spec, request_id):
        import asyncio

        from ..engine.model_runner import DecodeRow
        from ..engine.lm_program import pieces_length
        from .ras import ras_logprobs, window_tensor

        self.requests.append((request_id, context, spec))
        slot = self.runner.cache.allocate()
        self.active += 1
        generator = torch.Generator().manual_seed(spec.seed)
        history = list(spec.history)
        finished = False
        try:
            logp = self.runner.extend(slot, 0, context)
            position = pieces_length(context)
            for produced in range(spec.max_tokens):
                ras = spec.ras
                mask = spec.mask_eos_steps < 0 or produced < spec.mask_eos_steps
                q = ras_logprobs(logp.unsqueeze(0), window_tensor([history], ras.win_size),
                                 torch.tensor([ras.top_k]), torch.tensor([ras.top_p]),
                                 torch.tensor([ras.win_size * ras.tau_r]), torch.tensor([mask]),
                                 torch.tensor([spec.eos]))[0]
                token = int(torch.multinomial(q.exp(), 1, generator=generator))
                history.append(token)
                yield [token]
                await asyncio.sleep(0)
                if token in spec.stop_token_ids or produced + 1 == spec.max_tokens:
                    break
                logp = self.runner.decode([DecodeRow(slot, position, token)])[0].logp
                position += 1
            finished = True
        finally:
            if not finished:
                self.aborted.append(request_id)
            self.active -= 1
            self.runner.cache.release(slot)
