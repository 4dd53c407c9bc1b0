"""HiFT vocoder (engine/modules/hift*.py) on tiny random weights: shapes, noise control, streaming cache,
padded batches, STFT helpers, checkpoint key normalisation. Upstream parity is in test_hift_parity.py."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from cosyvoice_tts.engine.modules.hift import ConvRNNF0Predictor, HiFTGenerator, normalize_hift_state_dict
from cosyvoice_tts.engine.modules.hift_stft import istft_items, periodic_hann, reflect_pad_items

# The release yaml's HiFT with narrow channels; rates and iSTFT hop keep 8 * 5 * 3 * 4 = 480 samples per frame.
TINY_F0 = dict(num_class=1, in_channels=80, cond_channels=32)
TINY_HIFT = dict(
    in_channels=80, base_channels=32, nb_harmonics=8, sampling_rate=24000, nsf_alpha=0.1, nsf_sigma=0.003,
    nsf_voiced_threshold=10, upsample_rates=[8, 5, 3], upsample_kernel_sizes=[16, 11, 7],
    istft_params={"n_fft": 16, "hop_len": 4}, resblock_kernel_sizes=[3, 7, 11],
    resblock_dilation_sizes=[[1, 3, 5]] * 3, source_resblock_kernel_sizes=[7, 7, 11],
    source_resblock_dilation_sizes=[[1, 3, 5]] * 3, lrelu_slope=0.1, audio_limit=0.99,
)
SAMPLES_PER_FRAME = 480


def make_tiny_hift(seed: int = 0) -> HiFTGenerator:
    """Random tiny HiFT whose weights exercise every path: Snake alphas and weight-norm magnitudes away from
    their init values, and an F0 head giving tens of Hz, so frames fall on both sides of the 10 Hz voicing
    threshold (sines and noise-only excitation both occur)."""
    torch.manual_seed(seed)
    model = HiFTGenerator(**TINY_HIFT, f0_predictor=ConvRNNF0Predictor(**TINY_F0)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("alpha"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("original0"):
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
        model.f0_predictor.classifier.weight.mul_(800)
        model.f0_predictor.classifier.bias.fill_(20.0)
    return model


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def hift() -> HiFTGenerator:
    return make_tiny_hift()


def test_shapes_and_voicing_mix(hift):
    mel = torch.randn(2, 80, 9)
    f0 = hift.f0_predictor(mel)
    voiced = (f0 > TINY_HIFT["nsf_voiced_threshold"]).float().mean().item()
    assert 0.2 < voiced < 0.95, f"tiny weights should give voiced and unvoiced frames, voiced share {voiced}"
    speech, source = hift.inference(mel, generator=seeded(0))
    assert hift.samples_per_frame == SAMPLES_PER_FRAME
    assert speech.shape == (2, 9 * SAMPLES_PER_FRAME) and speech.dtype == torch.float32
    assert source.shape == (2, 1, 9 * SAMPLES_PER_FRAME)
    assert speech.abs().max() <= TINY_HIFT["audio_limit"]
    assert speech.std() > 1e-3 and source.std() > 1e-3


def test_noise_is_reproducible_per_call(hift):
    mel = torch.randn(1, 80, 6)
    first = hift.inference(mel, generator=seeded(5))
    again = hift.inference(mel, generator=seeded(5))
    other = hift.inference(mel, generator=seeded(6))
    torch.manual_seed(5)  # the global RNG in the same draw order as a fresh generator with that seed
    global_rng = hift.inference(mel)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    for a, b in zip(first, global_rng):
        assert torch.equal(a, b)
    assert (first[0] - other[0]).abs().max() > 1e-3, "the seed should reach the audio through the source noise"


def test_cache_source_replaces_start_of_source(hift):
    mel = torch.randn(1, 80, 12)
    cache = torch.randn(1, 1, 8 * SAMPLES_PER_FRAME) * 0.1
    plain_speech, plain_source = hift.inference(mel, generator=seeded(1))
    speech, source = hift.inference(mel, cache, generator=seeded(1))
    cached = cache.shape[2]
    assert torch.equal(source[:, :, :cached], cache)
    assert torch.equal(source[:, :, cached:], plain_source[:, :, cached:])
    assert (speech - plain_speech).abs().max() > 1e-4
    empty_speech, _ = hift.inference(mel, torch.zeros(1, 1, 0), generator=seeded(1))
    assert torch.equal(empty_speech, plain_speech)


def test_cache_longer_than_source_is_rejected(hift):
    with pytest.raises(ValueError, match="longer"):
        hift.inference(torch.randn(1, 80, 2), torch.zeros(1, 1, 3 * SAMPLES_PER_FRAME))


def test_batch_of_different_lengths_matches_per_item_calls(hift):
    mels = [torch.randn(1, 80, n) for n in (10, 5, 7)]
    caches = [torch.randn(1, 1, 8 * SAMPLES_PER_FRAME) * 0.1, None, torch.randn(1, 1, 960) * 0.1]
    batched = hift.inference_batch(mels, caches, [seeded(10 + i) for i in range(3)])
    for i, (mel, cache) in enumerate(zip(mels, caches)):
        speech, source = hift.inference(mel, cache, generator=seeded(10 + i))
        assert batched[i][0].shape == speech.shape and batched[i][1].shape == source.shape
        torch.testing.assert_close(batched[i][1], source, rtol=0, atol=1e-5)
        torch.testing.assert_close(batched[i][0], speech, rtol=0, atol=1e-5)


def test_same_length_batch_with_generator_per_item(hift):
    mel = torch.randn(3, 80, 5)
    speech, source = hift.inference(mel, generator=[seeded(20 + i) for i in range(3)])
    for i in range(3):
        item_speech, item_source = hift.inference(mel[i:i + 1], generator=seeded(20 + i))
        torch.testing.assert_close(source[i:i + 1], item_source, rtol=0, atol=1e-5)
        torch.testing.assert_close(speech[i:i + 1], item_speech, rtol=0, atol=1e-5)


def test_padding_content_does_not_leak_into_items(hift):
    mel = torch.randn(2, 80, 10)
    lengths = torch.tensor([10, 6])
    garbage = mel.clone()
    garbage[1, :, 6:] = 5.0  # whatever a caller leaves in the padding must not matter
    generators = [seeded(3), seeded(4)]
    speech, source = hift.inference(garbage, generator=generators, lengths=lengths)
    alone_speech, alone_source = hift.inference(mel[1:, :, :6], generator=seeded(4))
    n = 6 * SAMPLES_PER_FRAME
    torch.testing.assert_close(speech[1:, :n], alone_speech, rtol=0, atol=1e-5)
    torch.testing.assert_close(source[1:, :, :n], alone_source, rtol=0, atol=1e-5)
    assert speech[1, n:].abs().max() == 0 and source[1, :, n:].abs().max() == 0


def test_invalid_lengths_and_generator_count_are_rejected(hift):
    mel = torch.randn(2, 80, 4)
    with pytest.raises(ValueError, match="lengths"):
        hift.inference(mel, lengths=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="generators"):
        hift.inference(mel, generator=[seeded(0)])


def test_fold_weight_norm_keeps_output():
    model = make_tiny_hift(seed=3)
    mel = torch.randn(1, 80, 5)
    before = model.inference(mel, generator=seeded(0))
    model.fold_weight_norm()
    assert not any("parametrizations" in key for key in model.state_dict())
    after = model.inference(mel, generator=seeded(0))
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=1e-5)


def test_half_precision_network_keeps_float32_signal_path():
    model = make_tiny_hift(seed=4)
    mel = torch.randn(1, 80, 6)
    reference, _ = model.inference(mel, generator=seeded(0))
    speech, source = model.to(torch.bfloat16).inference(mel, generator=seeded(0))
    assert speech.dtype == torch.float32 and source.dtype == torch.float32
    # bf16 F0 shifts the accumulated phase, so only the waveform's broad shape is comparable.
    correlation = torch.corrcoef(torch.stack([speech[0], reference[0]]))[0, 1]
    assert correlation > 0.5, f"bf16 output unrelated to float32 output (correlation {correlation:.3f})"


def test_legacy_weight_norm_checkpoint_loads():
    """A checkpoint written with torch.nn.utils.weight_norm (weight_g / weight_v) under a `generator.` prefix."""
    model = make_tiny_hift(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy API is deprecated, which is the point
        legacy_conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(4, 18, 7, padding=3))
    with torch.no_grad():
        legacy_conv.weight_g.uniform_(0.5, 2.0)
    legacy = {f"generator.{k}": v for k, v in model.state_dict().items() if not k.startswith("conv_post.")}
    legacy.update({f"generator.conv_post.{k}": v for k, v in legacy_conv.state_dict().items()})
    assert "generator.conv_post.weight_g" in legacy

    fresh = HiFTGenerator(**TINY_HIFT, f0_predictor=ConvRNNF0Predictor(**TINY_F0))
    fresh.load_state_dict(normalize_hift_state_dict(legacy), strict=True)
    x = torch.randn(1, 4, 11)
    with torch.no_grad():
        torch.testing.assert_close(fresh.conv_post(x), legacy_conv(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(fresh.conv_pre.weight, model.conv_pre.weight, rtol=0, atol=0)


def test_normalize_keeps_current_keys_and_rejects_mixed_naming():
    state = make_tiny_hift().state_dict()
    assert normalize_hift_state_dict(state).keys() == state.keys()
    mixed = {"conv_pre.weight_g": torch.ones(1), "conv_pre.parametrizations.weight.original0": torch.ones(1)}
    with pytest.raises(ValueError, match="collides"):
        normalize_hift_state_dict(mixed)


def test_refuses_the_cosyvoice1_source_variant():
    with pytest.raises(ValueError, match="22050"):
        HiFTGenerator(**{**TINY_HIFT, "sampling_rate": 22050}, f0_predictor=ConvRNNF0Predictor(**TINY_F0))


def test_reflect_pad_items_matches_reflect_padding_of_each_item():
    signal = torch.randn(2, 40)
    lengths = torch.tensor([40, 25])
    padded = reflect_pad_items(signal, lengths, 8)
    torch.testing.assert_close(padded[0], F.pad(signal[:1], (8, 8), mode="reflect")[0], rtol=0, atol=0)
    torch.testing.assert_close(padded[1, :25 + 16], F.pad(signal[1:, :25], (8, 8), mode="reflect")[0],
                               rtol=0, atol=0)
    assert padded[1, 25 + 16:].abs().max() == 0


def test_istft_items_matches_torch_istft():
    n_fft, hop = 16, 4
    window = periodic_hann(n_fft)
    spec = torch.randn(2, n_fft // 2 + 1, 31, dtype=torch.complex64)
    frame_counts = torch.tensor([31, 20])
    ours = istft_items(spec, frame_counts, n_fft, hop, window)
    for item, count in enumerate(frame_counts.tolist()):
        expected = torch.istft(spec[item, :, :count], n_fft, hop, n_fft, window=window)
        torch.testing.assert_close(ours[item, :expected.shape[0]], expected, rtol=0, atol=1e-6)
        assert not ours[item, expected.shape[0]:].any()
