"""Fewer kernels, same model: joined projections (one GEMM for q/k/v, gate/up) and the flow's half weights."""
from __future__ import annotations

import copy

import torch
from torch import nn

from test_flow import ATOL, tiny_flow
from test_llm import CONFIG, full_forward, random_body
from cosyvoice_tts.engine.modules.flow_estimator import CausalConv1d
from cosyvoice_tts.engine.modules.fused_linear import FusedLinears


def test_fused_linears_compute_each_linear_and_keep_the_checkpoint():
    torch.manual_seed(0)
    linears = [nn.Linear(16, n) for n in (8, 4, 4)]
    x = torch.randn(3, 5, 16)
    expected = [lin(x) for lin in linears]
    keys = {name: p.clone() for i, lin in enumerate(linears) for name, p in
            ((f"{i}.{k}", v) for k, v in lin.state_dict().items())}
    fused = FusedLinears(linears)
    for got, want in zip(fused(x), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for i, lin in enumerate(linears):
        for k, v in lin.state_dict().items():
            assert torch.equal(v, keys[f"{i}.{k}"])
    # The parameters are views of the joined weight: no second copy, and loading a checkpoint updates both.
    assert linears[1].weight.data_ptr() == fused.weight[8:12].data_ptr()
    with torch.no_grad():
        linears[2].weight.fill_(0.5)
    torch.testing.assert_close(fused(x)[2], linears[2](x), rtol=0, atol=1e-6)
    assert fused.state_dict() == {}


def test_fused_linears_refuse_mismatched_inputs():
    import pytest

    with pytest.raises(ValueError, match="same width"):
        FusedLinears([nn.Linear(4, 2), nn.Linear(5, 2)])
    with pytest.raises(ValueError, match="bias"):
        FusedLinears([nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])


@torch.inference_mode()
def test_qwen2_with_joined_projections_gives_the_same_hidden_states():
    model = random_body(3)
    embeds = torch.randn(1, 9, CONFIG.hidden_size)
    expected = full_forward(model, embeds)
    keys = set(model.state_dict())
    model.model.fuse_projections()
    torch.testing.assert_close(full_forward(model, embeds), expected, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == keys


@torch.inference_mode()
def test_estimator_with_joined_projections_and_matmul_convolutions_gives_the_same_mel():
    flow = tiny_flow(seed=4)
    args = _flow_args()
    expected = flow.inference_batch(**args)
    flow.decoder.estimator.fuse_projections()
    assert all(m.matmul_weight is not None for m in flow.modules() if isinstance(m, CausalConv1d))
    for got, want in zip(flow.inference_batch(**args), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@torch.inference_mode()
def test_half_weights_under_autocast_equal_upstreams_half_mode():
    """Upstream's fp16 switch converts every flow parameter (`flow.half()`) and runs under autocast. Stored
    half weights with norm parameters kept in fp32 (half-rounded) give the same mel: bit for bit."""
    dtype = torch.bfloat16  # CPU autocast's half type
    upstream = tiny_flow(seed=5)
    ours = copy.deepcopy(upstream)
    with torch.no_grad():
        for param in upstream.parameters():
            param.data = param.data.to(dtype)
    ours.store_weights_in(dtype)
    norms = [m for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert ours.decoder.estimator.final_proj.weight.dtype == dtype
    args = _flow_args()
    with torch.autocast("cpu", dtype=dtype):
        expected = upstream.inference_batch(**args)
        got = ours.inference_batch(**args)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    # And it is still the same model: close to fp32 within half precision.
    full = tiny_flow(seed=5).inference_batch(**args)
    for g, f in zip(got, full):
        assert (g - f).abs().max() < 0.25 * f.abs().max()


def _flow_args() -> dict:
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50, (2, 14), generator=generator)
    prompt = torch.randint(0, 50, (2, 4), generator=generator)
    return dict(token=tokens, token_len=torch.tensor([14, 11]), prompt_token=prompt, prompt_token_len=torch.tensor([4, 3]),
                prompt_feat=torch.randn(2, 8, 80, generator=generator), prompt_feat_len=torch.tensor([8, 6]),
                embedding=torch.randn(2, 192, generator=generator), streaming=[True, False], finalize=[False, True])
