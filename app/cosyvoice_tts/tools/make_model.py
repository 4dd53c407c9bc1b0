"""Write a CosyVoice2 model directory in the official release layout, with random weights.

    python -m cosyvoice_tts.tools.make_model OUT --size tiny|full [--seed N]

`tiny` runs on a CPU in seconds (tests, the worker's embedded default); `full` has the real CosyVoice2-0.5B
dimensions (GPU benchmarks). The directory loads through exactly the code path a real release takes.

Random weights never end an utterance on their own, so the LM's control tokens are wired by hand (see
`wire_control_tokens`): the compute is unchanged (every layer still runs), only some projections are zero.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SPEAKERS = ("中文女", "中文男", "日语男", "粤语女", "英文女", "英文男", "韩语女")
QWEN2_SPECIAL_TOKENS = 293  # room above the BPE vocabulary for Qwen2's and CosyVoice's added special tokens


@dataclass(frozen=True)
class Size:
    llm_hidden: int
    llm_layers: int
    llm_heads: int
    llm_kv_heads: int
    llm_intermediate: int
    llm_vocab: int | None  # None: fit the tokenizer
    flow_dim: int
    flow_heads: int
    flow_units: int
    flow_blocks: int
    est_channels: int
    est_head_dim: int
    est_heads: int
    est_blocks: int
    est_mid_blocks: int
    hift_channels: int
    tokenizer_vocab: int


SIZES = {
    "tiny": Size(64, 2, 4, 2, 128, None, 64, 2, 128, 2, 64, 16, 2, 1, 1, 32, 1200),
    "full": Size(896, 24, 14, 2, 4864, 151936, 512, 8, 2048, 6, 256, 64, 8, 4, 12, 512, 8000),
}

YAML_TEMPLATE = """\
# CosyVoice2 model configuration (release layout), written by cosyvoice_tts.tools.make_model
# size: {size}, seed: {seed}; weights are random
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]

sample_rate: 24000
llm_input_size: {llm_hidden}
llm_output_size: {llm_hidden}
spk_embed_dim: 192
qwen_pretrain_path: ''
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25

llm: !new:cosyvoice.llm.llm.Qwen2LM
    llm_input_size: !ref <llm_input_size>
    llm_output_size: !ref <llm_output_size>
    speech_token_size: 6561
    length_normalized_loss: True
    lsm_weight: 0
    mix_ratio: [5, 15]
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>
    sampling: !name:cosyvoice.utils.common.ras_sampling
        top_p: 0.8
        top_k: 25
        win_size: 10
        tau_r: 0.1

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {flow_dim}
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 6561
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {flow_dim}
        attention_heads: {flow_heads}
        linear_units: {flow_units}
        num_blocks: {flow_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {flow_dim}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{est_channels}]
            dropout: 0.0
            attention_head_dim: {est_head_dim}
            n_blocks: {est_blocks}
            num_mid_blocks: {est_mid_blocks}
            num_heads: {est_heads}
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: -1

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift_channels}
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {hift_channels}

get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


def qwen2_config(size: Size, vocab: int) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "hidden_size": size.llm_hidden,
        "intermediate_size": size.llm_intermediate,
        "num_attention_heads": size.llm_heads,
        "num_hidden_layers": size.llm_layers,
        "num_key_value_heads": size.llm_kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 32768,
        "max_window_layers": size.llm_layers,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": True,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def init_llm_weights(llm: torch.nn.Module, generator: torch.Generator) -> None:
    """Qwen2-style init (normal, std 0.02; norms at one; biases at zero)."""
    for name, param in llm.named_parameters():
        if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
            torch.nn.init.ones_(param)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(param)
        else:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


@torch.no_grad()
def wire_control_tokens(llm: torch.nn.Module, share: float = 0.08) -> None:
    """Make end-of-speech come only after the task token and the fill token only before it.

    One head of layer 0 attends to the task token when it is in the context and writes an indicator into one
    residual channel; every other o_proj/down_proj is zero, so the residual carries only the current input's
    embedding plus that indicator. The speech-token head reads the indicator: with it, end-of-speech is about as
    likely as the best speech tokens (~8% a step after nucleus sampling); without it, the fill token is.
    """
    body = llm.llm.model.model
    config = llm.llm.config
    head_dim = config.head_dim
    detect_dim, flag_dim = 0, 1  # embedding channel marking the task token; residual channel for the flag
    slow_rope = head_dim // 2 - 1  # the lowest-frequency rotary pair barely rotates: position-independent scores

    for embedding in (body.embed_tokens.weight, llm.speech_embedding.weight, llm.llm_embedding.weight):
        embedding[:, detect_dim] = 0.0
        embedding[:, flag_dim] = 0.0
    llm.llm_embedding.weight[llm.TASK_ID, detect_dim] = 1.0

    for layer in body.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    attn = body.layers[0].self_attn
    # Normalised task embedding has ~sqrt(hidden) in detect_dim; scale so the score is ~30 for it and 0 otherwise.
    detect_value = (config.hidden_size / (1.0 + config.hidden_size * 0.02**2)) ** 0.5
    attn.q_proj.weight[:head_dim] = 0.0
    attn.q_proj.bias[:head_dim] = 0.0
    attn.q_proj.bias[slow_rope] = 1.0
    attn.k_proj.weight[:head_dim] = 0.0
    attn.k_proj.bias[:head_dim] = 0.0
    attn.k_proj.weight[slow_rope, detect_dim] = 30.0 * head_dim**0.5 / detect_value
    attn.v_proj.weight[:head_dim] = 0.0
    attn.v_proj.bias[:head_dim] = 0.0
    attn.v_proj.weight[0, detect_dim] = 1.0 / detect_value
    attn.o_proj.weight[flag_dim, 0] = 1.0

    # Calibrate: after the final norm the flag channel is ~detect_value with the task token in context, ~0
    # without. Set each control logit so that, where allowed, it takes `share` of the nucleus (top-k) mass
    # against the best speech tokens of a typical step, and sits far below them where not allowed.
    decoder = llm.llm_decoder
    decoder.weight[:, flag_dim] = 0.0
    for token in (llm.eos_token, llm.fill_token, llm.speech_token_size + 1):
        decoder.weight[token, :] = 0.0
        decoder.bias[token] = 0.0
    speech_logits = llm.llm_decoder(body.norm(llm.speech_embedding.weight[: llm.speech_token_size]))
    top = speech_logits[:, : llm.speech_token_size].topk(23, dim=-1).values
    typical = top.logsumexp(dim=-1).mean().item()
    allowed = typical + torch.log(torch.tensor(share / (1 - share))).item()
    off = 40.0  # how far below the allowed level a control token sits where it must not appear
    decoder.weight[llm.eos_token, flag_dim] = off / detect_value
    decoder.bias[llm.eos_token] = allowed - off
    decoder.weight[llm.fill_token, flag_dim] = -off / detect_value
    decoder.bias[llm.fill_token] = allowed
    unused = llm.speech_token_size + 1
    decoder.weight[unused, :] = 0.0
    decoder.bias[unused] = -30.0


def write_blank_qwen_weights(llm: torch.nn.Module, blank_dir: Path) -> None:
    """The release ships the text LM's own weights in CosyVoice-BlankEN (upstream's loader reads them before
    llm.pt overrides them); ours never reads them, but the layout should be complete."""
    from safetensors.torch import save_file

    body = llm.llm.model
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in body.state_dict().items()
             if k != "lm_head.weight"}  # tied to the embedding, which safetensors stores once
    save_file(state, str(blank_dir / "model.safetensors"), metadata={"format": "pt"})


def _format_yaml(size_name: str, size: Size, seed: int) -> str:
    return YAML_TEMPLATE.format(size=size_name, seed=seed, **size.__dict__)


def make_model(out_dir: str | Path, size: str = "tiny", seed: int = 0, wire_control: bool = True) -> Path:
    """Write the directory atomically (built beside OUT, renamed into place) and return its path."""
    from ..engine.hparams import HParams
    from ..engine.registry import model_registry
    from .onnx_models import write_campplus, write_speech_tokenizer
    from .tokenizer_dir import write_tokenizer_dir

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    spec = SIZES[size]
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # module constructors draw from the global RNG
        blank = work / "CosyVoice-BlankEN"
        blank.mkdir()
        write_tokenizer_dir(blank, vocab_size=spec.tokenizer_vocab)
        vocab = spec.llm_vocab or _fitting_vocab(blank)
        (blank / "config.json").write_text(json.dumps(qwen2_config(spec, vocab), indent=2) + "\n")
        (blank / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151643}) + "\n")
        (work / "cosyvoice2.yaml").write_text(_format_yaml(size, spec, seed), encoding="utf-8")

        hparams = HParams.from_file(work / "cosyvoice2.yaml", overrides={"qwen_pretrain_path": str(blank)})
        registry = model_registry()
        llm = hparams.build("llm", registry)
        init_llm_weights(llm, generator)
        if wire_control:
            wire_control_tokens(llm)
        torch.save(llm.state_dict(), work / "llm.pt")
        write_blank_qwen_weights(llm, blank)
        del llm
        torch.save(hparams.build("flow", registry).state_dict(), work / "flow.pt")
        torch.save(hparams.build("hift", registry).state_dict(), work / "hift.pt")

        spk2info = {}
        for name in SPEAKERS:
            embedding = torch.randn(1, 192, generator=generator)
            spk2info[name] = {"embedding": embedding / embedding.norm()}
        torch.save(spk2info, work / "spk2info.pt")
        write_campplus(work / "campplus.onnx", seed=seed)
        write_speech_tokenizer(work / "speech_tokenizer_v2.onnx", seed=seed + 1)

        # mkdtemp makes a private directory; a model dir is read by service users too.
        for path in [work, *work.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work.rename(out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out_dir


def _fitting_vocab(tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # Room for the special tokens the frontend adds, rounded up like real vocabularies are.
    needed = len(tokenizer) + QWEN2_SPECIAL_TOKENS
    return (needed + 63) // 64 * 64


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-control-wiring", action="store_true",
                        help="leave the LM fully random (it then rarely ends an utterance)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = make_model(args.out, size=args.size, seed=args.seed, wire_control=not args.no_control_wiring)
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {args.size} model to {path} ({total / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
