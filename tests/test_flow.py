"""The flow stage on its own (no reference needed): noise, masks, batching, chunk-causality, arguments."""
from __future__ import annotations

import types

import pytest
import torch

from cosyvoice_tts.engine.modules.flow import (
    CausalConditionalCFM,
    CausalConditionalDecoder,
    CausalMaskedDiffWithXvec,
    UpsampleConformerEncoder,
    join_prompt_and_tokens,
)
from cosyvoice_tts.engine.flow_graphs import GraphedEncoder, _CapturedEncoder
from cosyvoice_tts.engine.modules.flow_cfm import reference_noise
from cosyvoice_tts.engine.modules.flow_masks import attention_mask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 50
ENCODER_CHUNK = 4  # tokens; the estimator's chunk below is the same span in mel frames
# Two computations of the same mel that differ only in operation order (batching, caching) agree to ~2e-5
# here; real mistakes move it by 0.1 or more.
ATOL = 2e-4
CFM_PARAMS = {"sigma_min": 1e-06, "solver": "euler", "t_scheduler": "cosine", "training_cfg_rate": 0.2,
              "inference_cfg_rate": 0.7, "reg_loss_type": "l1"}


def tiny_flow(seed: int = 0, width: int = 32) -> CausalMaskedDiffWithXvec:
    """A few-layer flow (mel 80, speaker 192 as released), 32 wide, every parameter randomised."""
    encoder = UpsampleConformerEncoder(
        input_size=width, output_size=width, attention_heads=2, linear_units=48, num_blocks=1, dropout_rate=0.1,
        positional_dropout_rate=0.1, attention_dropout_rate=0.1, normalize_before=True, input_layer="linear",
        pos_enc_layer_type="rel_pos_espnet", selfattention_layer_type="rel_selfattn", use_cnn_module=False,
        macaron_style=False, use_dynamic_chunk=True, static_chunk_size=ENCODER_CHUNK)
    estimator = CausalConditionalDecoder(
        in_channels=320, out_channels=80, channels=[32], dropout=0.0, attention_head_dim=16, n_blocks=1,
        num_mid_blocks=1, num_heads=2, act_fn="gelu", static_chunk_size=2 * ENCODER_CHUNK, num_decoding_left_chunks=2)
    flow = CausalMaskedDiffWithXvec(
        input_size=width, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=VOCAB, input_frame_rate=25,
        only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3, encoder=encoder,
        decoder=CausalConditionalCFM(in_channels=240, n_spks=1, spk_emb_dim=80, cfm_params=CFM_PARAMS,
                                     estimator=estimator))
    randomize_(flow, seed)
    return flow.eval()


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values everywhere (norm gains around 1), so no parameter sits at a neutral value that would
    hide a wiring mistake. Query/key/position projections get 3x the usual scale: with the usual scale the
    attention stays nearly uniform and position handling (e.g. swapped relative distances or pos_bias_u/v)
    would barely move the output."""
    sharp = ("linear_q", "linear_k", "linear_pos", "to_q", "to_k")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() >= 2:
                gain = 3.0 if any(part in name for part in sharp) else 1.0
                param.copy_(noise * (gain / param[0].numel() ** 0.5))
            elif "pos_bias" in name:
                param.copy_(noise)
            elif name.endswith("weight"):  # norms
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def request(generator: torch.Generator, prompt_len: int, token_len: int) -> dict:
    return {
        "token": torch.randint(0, VOCAB, (1, token_len), generator=generator),
        "prompt_token": torch.randint(0, VOCAB, (1, prompt_len), generator=generator),
        "prompt_feat": torch.randn(1, 2 * prompt_len, 80, generator=generator),
        "embedding": torch.randn(1, 192, generator=generator),
    }


def run_single(flow, req: dict, streaming: bool, finalize: bool) -> torch.Tensor:
    mel, extra = flow.inference(
        token=req["token"], token_len=torch.tensor([req["token"].shape[1]]), prompt_token=req["prompt_token"],
        prompt_token_len=torch.tensor([req["prompt_token"].shape[1]]), prompt_feat=req["prompt_feat"],
        prompt_feat_len=torch.tensor([req["prompt_feat"].shape[1]]), embedding=req["embedding"],
        streaming=streaming, finalize=finalize)
    assert extra is None
    return mel


def pad_batch(reqs: list[dict]) -> dict:
    """Right-pads the requests with junk (-1 tokens, 7.0 mel) that must never leak into the results."""
    batch = len(reqs)
    tokens = torch.full((batch, max(r["token"].shape[1] for r in reqs)), -1)
    prompts = torch.full((batch, max(r["prompt_token"].shape[1] for r in reqs)), -1)
    feats = torch.full((batch, max(r["prompt_feat"].shape[1] for r in reqs), 80), 7.0)
    for i, r in enumerate(reqs):
        tokens[i, : r["token"].shape[1]] = r["token"][0]
        prompts[i, : r["prompt_token"].shape[1]] = r["prompt_token"][0]
        feats[i, : r["prompt_feat"].shape[1]] = r["prompt_feat"][0]
    return {
        "token": tokens, "token_len": torch.tensor([r["token"].shape[1] for r in reqs]),
        "prompt_token": prompts, "prompt_token_len": torch.tensor([r["prompt_token"].shape[1] for r in reqs]),
        "prompt_feat": feats, "prompt_feat_len": torch.tensor([r["prompt_feat"].shape[1] for r in reqs]),
        "embedding": torch.cat([r["embedding"] for r in reqs]),
    }


@pytest.fixture(scope="module")
def flow():
    torch.manual_seed(0)
    return tiny_flow()


def test_noise_is_upstreams_seed_zero_draw_and_not_in_state_dict(flow):
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        upstream_draw = torch.randn([1, 80, 50 * 300])
    finally:
        torch.random.set_rng_state(state)
    assert torch.equal(reference_noise(), upstream_draw)
    assert torch.equal(flow.decoder.rand_noise, upstream_draw)
    assert not any("rand_noise" in key for key in flow.state_dict())


def test_join_prompt_and_tokens_places_each_request_left_aligned():
    prompt = torch.tensor([[1, 2, 3], [4, -1, -1], [-1, -1, -1]])
    tokens = torch.tensor([[10, 11, -1], [12, 13, 14], [15, -1, -1]])
    joined, total = join_prompt_and_tokens(prompt, torch.tensor([3, 1, 0]), tokens, torch.tensor([2, 3, 1]))
    assert total.tolist() == [5, 4, 1]
    assert joined.tolist() == [[1, 2, 3, 10, 11], [4, 12, 13, 14, 0], [15, 0, 0, 0, 0]]


def test_streaming_attention_mask_follows_static_chunks_and_padding():
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    mask = attention_mask(valid, torch.tensor([True, False]), chunk_size=2)
    assert mask[0].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0],
                                      [1, 1, 1, 1, 1]]
    assert mask[1].int().tolist() == [[1, 1, 1, 0, 0]] * 5
    # Queries 3..4 of a 5-frame sequence: the rows of the full mask.
    assert torch.equal(attention_mask(valid, torch.tensor([True, False]), 2, query_start=3), mask[:, 3:])


@pytest.mark.parametrize("streaming,finalize", [(True, False), (True, True), (False, False), (False, True)])
def test_output_length_and_prompt_frames_dropped(flow, streaming, finalize):
    req = request(torch.Generator().manual_seed(1), prompt_len=5, token_len=9)
    mel = run_single(flow, req, streaming, finalize)
    assert mel.dtype == torch.float32
    assert mel.shape == (1, 80, 2 * (9 - (0 if finalize else 3)))
    assert torch.isfinite(mel).all()


def test_batch_equals_each_request_alone(flow):
    """Different prompt and token lengths, mixed streaming/finalize flags, junk in the padding."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(0, 10), (6, 17), (3, 7), (9, 12)]
    flags = [(True, False), (True, True), (False, False), (False, True)]
    reqs = [request(generator, p, t) for p, t in shapes]
    alone = [run_single(flow, r, s, f)[0] for r, (s, f) in zip(reqs, flags)]
    together = flow.inference_batch(**pad_batch(reqs), streaming=[s for s, _ in flags],
                                    finalize=[f for _, f in flags])
    assert len(together) == len(reqs)
    for single, batched in zip(alone, together):
        assert batched.shape == single.shape
        torch.testing.assert_close(batched, single, rtol=0, atol=ATOL)
    # The requests really differ (the comparison above is not between constant outputs).
    assert (alone[0][:, :8] - alone[2][:, :8]).abs().max() > 0.1


def test_streaming_frames_of_complete_chunks_do_not_change_when_tokens_arrive(flow):
    """With static chunk masks and causal convolutions, a frame depends on nothing after the end of its
    chunk (plus the 3 lookahead tokens): growing the prefix leaves complete chunks unchanged, while the
    non-streaming (full attention) output does change. This is what makes chunk caching exact."""
    req = request(torch.Generator().manual_seed(3), prompt_len=4, token_len=20)
    prompt = req["prompt_token"].shape[1]
    short = dict(req, token=req["token"][:, :11])  # 4 + 11 - 3 = 12 encoded tokens: 3 whole chunks
    for streaming in (True, False):
        before = run_single(flow, short, streaming, finalize=False)
        after = run_single(flow, req, streaming, finalize=False)
        stable_frames = 2 * (12 - prompt)
        difference = (after[:, :, :stable_frames] - before[:, :, :stable_frames]).abs().max()
        if streaming:
            assert difference < ATOL
        else:
            assert difference > 1e-3


def test_streaming_and_finalize_change_the_result(flow):
    req = request(torch.Generator().manual_seed(4), prompt_len=3, token_len=14)
    streamed = run_single(flow, req, streaming=True, finalize=True)
    full = run_single(flow, req, streaming=False, finalize=True)
    assert (streamed - full).abs().max() > 1e-3
    # Not finalized, the last 3 tokens are context only, yet they shape the frames before them.
    open_end = run_single(flow, req, streaming=True, finalize=False)
    assert open_end.shape[2] == streamed.shape[2] - 6
    assert (open_end - streamed[:, :, : open_end.shape[2]]).abs().max() > 1e-3


def test_upstream_style_encoder_call_with_context_matches_batched_encode(flow):
    encoder = flow.encoder
    generator = torch.Generator().manual_seed(5)
    xs = torch.randn(1, 10, 32, generator=generator)
    with torch.inference_mode():
        out, mask = encoder(xs[:, :7], torch.tensor([10]), context=xs[:, 7:], streaming=True)
        reference, lens = encoder.encode(xs, torch.tensor([10]), torch.tensor([7]), torch.tensor([True]))
    assert out.shape == (1, 14, 32) and mask.shape == (1, 1, 14) and bool(mask.all())
    torch.testing.assert_close(out, reference[:, :14], rtol=0, atol=ATOL)


def test_cfm_params_as_plain_dict_or_attribute_object():
    as_object = types.SimpleNamespace(**CFM_PARAMS)
    for params in (CFM_PARAMS, as_object):
        cfm = CausalConditionalCFM(in_channels=240, cfm_params=params, n_spks=1, spk_emb_dim=80)
        assert cfm.inference_cfg_rate == 0.7 and cfm.t_scheduler == "cosine"
    with pytest.raises(ValueError, match="solver"):
        CausalConditionalCFM(in_channels=240, cfm_params=dict(CFM_PARAMS, solver="midpoint"))


def test_unsupported_options_are_refused_clearly():
    base = dict(input_size=32, output_size=32, input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
                selfattention_layer_type="rel_selfattn", use_cnn_module=False)
    with pytest.raises(ValueError, match="use_cnn_module"):
        UpsampleConformerEncoder(**dict(base, use_cnn_module=True))
    with pytest.raises(ValueError, match="pos_enc_layer_type"):
        UpsampleConformerEncoder(**dict(base, pos_enc_layer_type="rel_pos"))
    with pytest.raises(ValueError, match="input_size == output_size"):
        UpsampleConformerEncoder(**dict(base, input_size=16))


def test_too_few_tokens_without_finalize_is_an_error(flow):
    req = request(torch.Generator().manual_seed(6), prompt_len=0, token_len=3)
    with pytest.raises(ValueError, match="no tokens to encode"):
        run_single(flow, req, streaming=True, finalize=False)


def run_incremental(flow, req: dict, token_count: int, finalize: bool, stream):
    return flow.inference_incremental(
        token=req["token"][:, :token_count], token_len=torch.tensor([token_count]), prompt_token=req["prompt_token"],
        prompt_token_len=torch.tensor([req["prompt_token"].shape[1]]), prompt_feat=req["prompt_feat"],
        prompt_feat_len=torch.tensor([req["prompt_feat"].shape[1]]), embedding=req["embedding"], finalize=finalize,
        stream=stream)


@pytest.mark.parametrize("prompt_len,prefixes", [
    (5, [10, 14, 22, 30]),  # 5 + n - 3 encoded tokens on chunk boundaries (as the engine's hops are)
    (0, [5, 9, 10, 17, 18]),  # boundaries missed: the partial chunk is recomputed by the next call
])
def test_incremental_streaming_equals_rerunning_the_whole_prefix(flow, prompt_len, prefixes):
    req = request(torch.Generator().manual_seed(7), prompt_len=prompt_len, token_len=40)
    stream = None
    for count in prefixes:
        mel, stream = run_incremental(flow, req, count, False, stream)
        rerun = run_single(flow, dict(req, token=req["token"][:, :count]), streaming=True, finalize=False)
        assert mel.shape == rerun.shape
        torch.testing.assert_close(mel, rerun, rtol=0, atol=ATOL)
        assert stream.encoder.done % flow.incremental_unit == 0
    mel, stream = run_incremental(flow, req, 40, True, stream)
    torch.testing.assert_close(mel, run_single(flow, req, streaming=True, finalize=True), rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="finalized"):
        run_incremental(flow, req, 40, True, stream)


def test_incremental_work_per_chunk_does_not_grow(flow):
    """Equal hops cost the same number of estimator frames however long the stream already is, while a
    re-run grows with the prefix."""
    frames_seen = []
    hook = flow.decoder.estimator.register_forward_pre_hook(lambda module, args: frames_seen.append(args[0].shape[2]))
    try:
        req = request(torch.Generator().manual_seed(8), prompt_len=4, token_len=40)
        stream = None
        per_call = []
        for count in (11, 15, 19, 23, 27):  # 4 + count - 3 = 12, 16, ... encoded tokens
            frames_seen.clear()
            _, stream = run_incremental(flow, req, count, False, stream)
            per_call.append(set(frames_seen))
        frames_seen.clear()
        run_single(flow, dict(req, token=req["token"][:, :27]), streaming=True, finalize=False)
        rerun = set(frames_seen)
    finally:
        hook.remove()
    assert per_call[0] == {24} and all(frames == {8} for frames in per_call[1:])  # 4 tokens = 8 mel frames
    assert rerun == {2 * (4 + 27 - 3)}


def test_incremental_refuses_what_it_cannot_do_exactly(flow):
    req = request(torch.Generator().manual_seed(9), prompt_len=2, token_len=20)
    _, stream = run_incremental(flow, req, 12, False, None)
    changed = dict(req, token=req["token"].flip(1))
    with pytest.raises(ValueError, match="do not extend"):
        run_incremental(flow, changed, 16, False, stream)
    full_attention = tiny_flow()
    full_attention.encoder.static_chunk_size = 0  # the encoder's default: full attention even when streaming
    assert not full_attention.supports_incremental()
    with pytest.raises(ValueError, match="static_chunk_size"):
        run_incremental(full_attention, req, 12, False, None)


class EagerEncoderReplay(_CapturedEncoder):
    """The graphed encoder's buffers and call, replayed eagerly (CUDA graphs need a GPU)."""

    def __init__(self, encoder, batch, tokens, width, shared, pool):
        self._bind(encoder, batch, tokens, width, shared)

    def replay(self):
        self.h, self.up_lens = self._run()


def test_padded_encoder_buckets_give_the_unpadded_batch_result(flow):
    """GraphedEncoder pads batch and length up to a bucket: the mels must not change."""
    generator = torch.Generator().manual_seed(5)
    reqs = [request(generator, p, t) for p, t in [(0, 10), (6, 17), (3, 7)]]
    flags = dict(streaming=[True, True, False], finalize=[False, True, False])
    plain = flow.inference_batch(**pad_batch(reqs), **flags)
    graphed = GraphedEncoder(flow.encoder, [1, 2, 4], [8, 16, 32, 64], torch.float32)
    graphed.capture_all([(b, t) for b in (1, 2, 4) for t in (8, 16, 32, 64)], flow.input_size,
                        captured=EagerEncoderReplay)
    inner, flow.encoder = flow.encoder, graphed
    try:
        padded = flow.inference_batch(**pad_batch(reqs), **flags)
    finally:
        flow.encoder = inner
    assert graphed.calls == {"graphed": 1, "eager": 0}
    for a, b in zip(plain, padded):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=0, atol=ATOL)
