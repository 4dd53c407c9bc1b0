"""tools/onnx_models.py: the stand-ins keep the official interfaces and compute from their input."""
import numpy as np
import onnx
import onnxruntime
import pytest

from cosyvoice_tts.tools.onnx_models import write_campplus, write_speech_tokenizer


def session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def io_signature(sess):
    return ([(arg.name, arg.type, arg.shape) for arg in sess.get_inputs()],
            [(arg.name, arg.type, arg.shape) for arg in sess.get_outputs()])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("onnx_models")
    paths = {
        "campplus": write_campplus(tmp / "campplus.onnx", seed=0),
        "campplus_same_seed": write_campplus(tmp / "campplus_again.onnx", seed=0),
        "campplus_other_seed": write_campplus(tmp / "campplus_other.onnx", seed=1),
        "tokenizer": write_speech_tokenizer(tmp / "speech_tokenizer_v2.onnx", seed=0),
        "tokenizer_other_seed": write_speech_tokenizer(tmp / "speech_tokenizer_other.onnx", seed=1),
    }
    return paths


def fbank(frames: int, seed: int) -> np.ndarray:
    feat = np.random.default_rng(seed).standard_normal((1, frames, 80)).astype(np.float32)
    return feat - feat.mean(axis=1, keepdims=True)  # mean-normalised, as the frontend feeds it


def log_mel(frames: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1.5, (1, 128, frames)).astype(np.float32)


def tokens(sess, feats: np.ndarray, length: int | None = None) -> np.ndarray:
    length = feats.shape[2] if length is None else length
    return sess.run(None, {"feats": feats, "feats_length": np.array([length], dtype=np.int32)})[0]


def test_campplus_interface(models):
    sess = session(models["campplus"])
    assert io_signature(sess) == ([("input", "tensor(float)", ["batch", "frames", 80])],
                                  [("output", "tensor(float)", ["batch", 192])])
    embedding = sess.run(None, {"input": fbank(123, 0)})[0]
    assert embedding.shape == (1, 192) and embedding.dtype == np.float32 and np.all(np.isfinite(embedding))


def test_campplus_depends_on_the_input_and_the_seed_only(models):
    sess, again, other = (session(models[name]) for name in ("campplus", "campplus_same_seed", "campplus_other_seed"))
    feat_a, feat_b = fbank(200, 1), 2.0 * fbank(150, 2)
    out_a = sess.run(None, {"input": feat_a})[0]
    assert np.array_equal(out_a, again.run(None, {"input": feat_a})[0])  # deterministic for a seed
    assert not np.allclose(out_a, other.run(None, {"input": feat_a})[0])  # the seed matters
    # mean-normalised inputs still give different speakers: the std pooling carries them
    assert not np.allclose(out_a, sess.run(None, {"input": feat_b})[0])
    # a pooled statistic: frame order does not matter
    assert np.allclose(out_a, sess.run(None, {"input": feat_a[:, ::-1].copy()})[0], atol=1e-5)


def test_speech_tokenizer_interface(models):
    sess = session(models["tokenizer"])
    assert io_signature(sess) == (
        [("feats", "tensor(float)", ["batch", 128, "frames"]), ("feats_length", "tensor(int32)", ["batch"])],
        [("indices", "tensor(int64)", ["batch", "tokens"])])


@pytest.mark.parametrize("frames", [1, 4, 5, 8, 203])
def test_speech_tokenizer_emits_one_token_per_4_frames(models, frames):
    codes = tokens(session(models["tokenizer"]), log_mel(frames, frames))
    assert codes.shape == (1, -(-frames // 4)) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 6561


def test_speech_tokenizer_codes_follow_the_input(models):
    sess = session(models["tokenizer"])
    feats = log_mel(400, 0)
    codes = tokens(sess, feats)
    assert len(np.unique(codes)) > 20  # spread over the codebook, not a constant
    assert np.array_equal(codes, tokens(sess, feats.copy()))
    # each token sees only its own 4 frames
    changed = feats.copy()
    changed[:, :, 40:44] += 3.0
    differs = np.flatnonzero(tokens(sess, changed)[0] != codes[0])
    assert differs.tolist() == [10]
    assert not np.array_equal(codes, tokens(session(models["tokenizer_other_seed"]), feats))


def test_speech_tokenizer_output_length_follows_feats_length(models):
    sess = session(models["tokenizer"])
    feats = log_mel(100, 3)
    assert np.array_equal(tokens(sess, feats, length=41), tokens(sess, feats)[:, :11])


def test_models_are_valid_onnx_with_a_portable_opset(models):
    for name in ("campplus", "tokenizer"):
        model = onnx.load(str(models[name]))
        onnx.checker.check_model(model, full_check=True)
        assert model.ir_version <= 8 and model.opset_import[0].version <= 17
