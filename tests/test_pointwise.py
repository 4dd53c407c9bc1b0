"""Compiled elementwise kernels (modules/pointwise.py): the same model outputs, and eager where unavailable."""
from __future__ import annotations

import pytest
import torch

from test_flow import tiny_flow
from test_hift import make_tiny_hift
from test_fused_weights import _flow_args
from test_llm import CONFIG, full_forward, random_body
from cosyvoice_tts.engine.modules import pointwise


@pytest.fixture
def eager_afterwards():
    yield
    pointwise.use_eager()


def test_a_failing_compiler_leaves_the_eager_kernels(monkeypatch, eager_afterwards):
    def broken(fn, **_kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    assert pointwise.use_compiled(torch.device("cpu")) is False
    assert not pointwise.compiled_enabled()
    assert pointwise.rms_norm is pointwise._EAGER["rms_norm"]


def test_a_compiled_kernel_that_disagrees_is_refused(monkeypatch, eager_afterwards):
    monkeypatch.setattr(torch, "compile", lambda fn, **_kwargs: (lambda *args: fn(*args) * 1.5))
    assert pointwise.use_compiled(torch.device("cpu")) is False
    assert not pointwise.compiled_enabled()


@torch.inference_mode()
def test_compiled_kernels_give_the_same_lm_and_flow_outputs(eager_afterwards):
    model = random_body(1)
    model.model.fuse_projections()
    embeds = torch.randn(1, 7, CONFIG.hidden_size)
    flow = tiny_flow(seed=2)
    flow.decoder.estimator.fuse_projections()  # the convolutions as matmuls over compiled column gathers
    args = _flow_args()
    hift, mel = make_tiny_hift(), torch.randn(2, 80, 7)
    lengths = torch.tensor([7, 4])  # a padded batch: the masked Snakes
    hidden, mels = full_forward(model, embeds), flow.inference_batch(**args)
    speech = hift.inference(mel, lengths=lengths, generator=torch.Generator().manual_seed(0))[0]
    if not pointwise.use_compiled(torch.device("cpu")):
        pytest.skip("torch.compile has no working compiler on this machine")
    assert pointwise.compiled_enabled()
    torch.testing.assert_close(full_forward(model, embeds), hidden, rtol=0, atol=1e-5)
    for got, want in zip(flow.inference_batch(**args), mels):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    got = hift.inference(mel, lengths=lengths, generator=torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(got, speech, rtol=0, atol=1e-5)


def test_a_compiled_kernel_that_fails_later_hands_over_to_eager(monkeypatch, eager_afterwards):
    calls = {"n": 0}

    def flaky(fn, **_kwargs):
        def run(*args):
            calls["n"] += 1
            if calls["n"] > 200:  # passes the start-up check, then breaks (a variant that will not compile)
                raise RuntimeError("recompile limit")
            return fn(*args)
        return run

    monkeypatch.setattr(torch, "compile", flaky)
    assert pointwise.use_compiled(torch.device("cpu")) is True
    calls["n"] = 1000
    x, w = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(pointwise.rms_norm(x, w, 1e-6), pointwise._EAGER["rms_norm"](x, w, 1e-6))
    assert pointwise.rms_norm is pointwise._EAGER["rms_norm"]
    assert pointwise.compiled_enabled()  # the others stay compiled


def test_window_columns_with_zero_history_are_the_causal_columns():
    """The incremental paths' convolution columns (two history frames, then the window) lay frames out as the
    whole-sequence ones do, so one matmul weight serves both."""
    generator = torch.Generator().manual_seed(3)
    x, mask = torch.randn(2, 6, 9, generator=generator), (torch.rand(2, 1, 9, generator=generator) > 0.3).float()
    joined = torch.cat([torch.zeros(2, 6, 2), x * mask], dim=2)
    assert torch.equal(pointwise.window_columns(joined, torch.float32),
                       pointwise.causal_columns(x, mask, torch.float32))


def test_hift_resblock_keeps_the_reference_order():
    """The residual block with its masks and adds folded into the Snakes computes what the reference writes out:
    for each dilation, x + mask * conv2(snake2(mask * conv1(snake1(x))))."""
    from cosyvoice_tts.engine.modules.hift_layers import ResBlock

    torch.manual_seed(4)
    block = ResBlock(6, 3, [1, 3, 5])
    with torch.no_grad():
        for act in [*block.activations1, *block.activations2]:
            act.alpha.uniform_(0.5, 1.5)
    x, mask = torch.randn(2, 6, 11), (torch.arange(11) < torch.tensor([[11], [6]])).float()[:, None, :]

    def snake(v, alpha):
        alpha = alpha[None, :, None]
        return v + (1.0 / (alpha + 1e-9)) * torch.sin(v * alpha).pow(2)

    want = x
    for act1, conv1, act2, conv2 in zip(block.activations1, block.convs1, block.activations2, block.convs2):
        branch = conv1(snake(want, act1.alpha)) * mask
        want = conv2(snake(branch, act2.alpha)) * mask + want
    with torch.no_grad():
        assert torch.equal(block(x, mask), want.detach())
