"""The speech-token LM: KV-cached decoding, numerics against transformers and the upstream code, sampling."""
from __future__ import annotations

import torch

from refrun import run_reference
from cosyvoice_tts.engine.kv_cache import KVCache
from cosyvoice_tts.engine.lm_program import BistreamProgram, WholeTextProgram, pieces_length
from cosyvoice_tts.engine.loader import build_modules
from cosyvoice_tts.engine.model_runner import DecodeRow, ModelRunner
from cosyvoice_tts.engine.modules.qwen2 import AttentionInputs, Qwen2Config, Qwen2ForCausalLM
from cosyvoice_tts.engine.sampling import RasConfig, TokenRng, ras_sample

CONFIG = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128, vocab_size=300)


def random_body(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.1)  # non-trivial gains catch a norm applied in the wrong place
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def full_forward(model: Qwen2ForCausalLM, embeds: torch.Tensor) -> torch.Tensor:
    cache = KVCache(CONFIG.num_hidden_layers, 1, embeds.shape[1], CONFIG.num_key_value_heads, CONFIG.head_dim,
                    torch.float32, torch.device("cpu"))
    positions = torch.arange(embeds.shape[1]).unsqueeze(0)
    attn = AttentionInputs.build(torch.tensor([0]), positions, embeds.shape[1])
    return model.model(embeds, cache.k, cache.v, attn)


@torch.inference_mode()
def test_matches_transformers_qwen2():
    from transformers import Qwen2Config as HFConfig
    from transformers import Qwen2ForCausalLM as HFQwen2

    ours = random_body()
    hf = HFQwen2(HFConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, vocab_size=300, tie_word_embeddings=True,
                          rope_theta=CONFIG.rope_theta, rms_norm_eps=CONFIG.rms_norm_eps)).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    embeds = torch.randn(1, 23, 64)
    expected = hf(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1]
    got = full_forward(ours, embeds)
    assert (got - expected).abs().max() < 1e-4


@torch.inference_mode()
def test_cached_decode_of_interleaved_sequences_equals_full_forward():
    model = random_body(1)
    prompt_a, prompt_b = torch.randn(1, 7, 64), torch.randn(1, 4, 64)
    steps_a, steps_b = torch.randn(5, 64), torch.randn(5, 64)
    cache = KVCache(2, 3, 32, 2, 16, torch.float32, torch.device("cpu"))
    slot_a, slot_b = 2, 0

    def extend(slot, start, embeds):
        positions = torch.arange(start, start + embeds.shape[1]).unsqueeze(0)
        attn = AttentionInputs.build(torch.tensor([slot]), positions, start + embeds.shape[1])
        return model.model(embeds, cache.k, cache.v, attn)

    extend(slot_a, 0, prompt_a)
    extend(slot_b, 0, prompt_b)
    outs_a, outs_b = [], []
    for i in range(5):
        # both sequences in one batch, at different positions; padded to the cache length like the graph
        attn = AttentionInputs.build(torch.tensor([slot_a, slot_b]), torch.tensor([[7 + i], [4 + i]]), 32)
        hidden = model.model(torch.stack([steps_a[i], steps_b[i]]).unsqueeze(1), cache.k, cache.v, attn)
        outs_a.append(hidden[0, 0])
        outs_b.append(hidden[1, 0])
    full_a = full_forward(model, torch.cat([prompt_a, steps_a.unsqueeze(0)], dim=1))[0, 7:]
    full_b = full_forward(model, torch.cat([prompt_b, steps_b.unsqueeze(0)], dim=1))[0, 4:]
    assert (torch.stack(outs_a) - full_a).abs().max() < 1e-5
    assert (torch.stack(outs_b) - full_b).abs().max() < 1e-5


def run_program(runner: ModelRunner, program, slot: int = 0) -> tuple[list[int], list[torch.Tensor]]:
    """Drive one LM programme to the end with the runner (the engine loop, minus scheduling)."""
    position, tokens, logps = 0, [], []
    while not program.done:
        pieces = program.take_input()
        if len(pieces) == 1 and pieces[0][0] == "speech" and len(pieces[0][1]) == 1:
            # the batched path: top-k candidates come precomputed with the distribution
            step = runner.decode([DecodeRow(slot, position, pieces[0][1][0])])[0]
            logps.append(step.logp)
        else:
            step = runner.extend(slot, position, pieces)
            logps.append(step)
        position += pieces_length(pieces)
        tokens.extend(program.on_logprobs(step).tokens)
    return tokens, logps


def test_sampler_draws_what_the_reference_draws(ref_python, tmp_path):
    generator = torch.Generator().manual_seed(5)
    logps = [torch.randn(6564, generator=generator).mul(3).log_softmax(0) for _ in range(40)]
    decoded_lists = [[int(t) for t in torch.randint(0, 6564, (i % 12,), generator=generator)] for i in range(40)]
    # make some windows repeat the likeliest token so the repetition branch is taken
    for i in range(0, 40, 3):
        decoded_lists[i] = decoded_lists[i] + [int(logps[i].argmax())] * 2
    torch.save({"logps": logps, "decoded": decoded_lists, "seed": 1234}, tmp_path / "in.pt")
    script = tmp_path / "ras.py"
    script.write_text(
        "import sys, torch\n"
        "from cosyvoice.utils.common import ras_sampling\n"
        "spec = torch.load(sys.argv[1])\n"
        "torch.manual_seed(spec['seed'])\n"
        "ids = [int(ras_sampling(l, d, 25)) for l, d in zip(spec['logps'], spec['decoded'])]\n"
        "torch.save(ids, sys.argv[2])\n")
    import subprocess

    subprocess.run([ref_python, str(script), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], check=True)
    expected = torch.load(tmp_path / "out.pt")
    gen = TokenRng(1234)
    got = [ras_sample(l, d, RasConfig(), gen) for l, d in zip(logps, decoded_lists)]
    assert got == expected


def _tiny_runner(model_dir) -> tuple[ModelRunner, object]:
    model = build_modules(model_dir)
    return ModelRunner(model.llm, torch.device("cpu"), torch.float32, max_sessions=1, max_len=1024), model


def test_whole_text_tokens_match_reference(tiny_model_dir, ref_python, tmp_path):
    runner, model = _tiny_runner(tiny_model_dir)
    text, prompt_text, prompt_speech = list(range(40, 52)), [30, 31, 32], list(range(100, 140))
    spec = {"mode": "whole", "text": text, "prompt_text": prompt_text, "prompt_speech": prompt_speech, "seed": 7}
    torch.save(spec, tmp_path / "in.pt")
    run_reference(ref_python, "llm_reference.py", tiny_model_dir, tmp_path / "in.pt", tmp_path / "out.pt")
    expected = torch.load(tmp_path / "out.pt")
    program = WholeTextProgram(text, prompt_text, prompt_speech, model.llm.speech_token_size, RasConfig(),
                               TokenRng(7))
    tokens, logps = run_program(runner, program)
    assert len(logps) == len(expected["logp"])
    diffs = [(a - b).abs().max().item() for a, b in zip(logps, expected["logp"])]
    print(f"max |logp diff| over {len(diffs)} steps: {max(diffs):.2e}")
    assert max(diffs) < 1e-4
    assert tokens == expected["tokens"]
    assert 2 * len(text) <= len(tokens) <= 20 * len(text)


def test_bistream_tokens_match_reference(tiny_model_dir, ref_python, tmp_path):
    runner, model = _tiny_runner(tiny_model_dir)
    text, prompt_text, prompt_speech = list(range(60, 83)), [30, 31, 32, 33], list(range(200, 230))
    spec = {"mode": "bistream", "text": text, "fragments": [[t] for t in text], "prompt_text": prompt_text,
            "prompt_speech": prompt_speech, "seed": 11}
    torch.save(spec, tmp_path / "in.pt")
    run_reference(ref_python, "llm_reference.py", tiny_model_dir, tmp_path / "in.pt", tmp_path / "out.pt")
    expected = torch.load(tmp_path / "out.pt")
    program = BistreamProgram(prompt_text, prompt_speech, model.llm.speech_token_size, RasConfig(),
                              TokenRng(11))
    # all the text arrives before decoding starts, in three uneven fragments
    program.push_text(text[:3])
    program.push_text(text[3:17])
    program.push_text(text[17:])
    program.end_text()
    tokens, _ = run_program(runner, program)
    assert tokens == expected["tokens"]
    assert len(tokens) > 0
