"""Tiny stand-ins for the release's two ONNX models, built with `onnx.helper` (random model directories).

They keep the official files' interface, so code that runs the real files runs these unchanged:

- `campplus.onnx` (CAM++ speaker embedding): input `input` float32 [batch, frames, 80] (mean-normalised
  kaldi fbank), output `output` float32 [batch, 192].
- `speech_tokenizer_v2.onnx` (prompt speech tokens at 25 Hz): inputs `feats` float32 [batch, 128, frames]
  (whisper log-mel, 100 frames/s) and `feats_length` int32 [batch], output `indices` int64
  [batch, ceil(frames / 4)] with values in 0..6560.

Upstream feeds both by position (`get_inputs()[i].name`) and reads output 0, so the names matter only to
tools that address them directly; they are the official ones all the same.

The graphs compute something real from their input, deterministically for a seed:
- campplus: a per-frame projection with ReLU, statistics pooling over time (mean and standard deviation,
  as CAM++ pools; the mean alone would carry little since the fbank arrives mean-normalised) and a final
  projection to 192;
- speech tokenizer: average pooling of 4 frames (the real encoder's 4x downsampling, 100 Hz -> 25 Hz),
  a projection to the 6,561 codes and argmax, cut to ceil(feats_length / 4) tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CAMPPLUS_INPUT = "input"
CAMPPLUS_OUTPUT = "output"
CAMPPLUS_FBANK_BINS = 80
CAMPPLUS_EMBEDDING_DIM = 192
_CAMPPLUS_HIDDEN = 64

SPEECH_TOKENIZER_FEATS = "feats"
SPEECH_TOKENIZER_FEATS_LENGTH = "feats_length"
SPEECH_TOKENIZER_OUTPUT = "indices"
SPEECH_TOKENIZER_MEL_BINS = 128
SPEECH_TOKENIZER_CODEBOOK = 6561  # 3^8 FSQ codes
SPEECH_TOKENIZER_DOWNSAMPLE = 4

# Opset 17 / IR 8 load in every onnxruntime from 1.14 on, not only in the newest.
_OPSET = 17
_IR_VERSION = 8


def _save(graph: onnx.GraphProto, path: str | Path, producer: str) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], producer_name=producer)
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def write_campplus(path: str | Path, seed: int = 0) -> Path:
    """Write a campplus stand-in: fbank [batch, frames, 80] -> embedding [batch, 192]."""
    rng = np.random.default_rng(seed)
    frame_weight = (rng.standard_normal((CAMPPLUS_FBANK_BINS, _CAMPPLUS_HIDDEN)) / np.sqrt(CAMPPLUS_FBANK_BINS))
    frame_bias = 0.1 * rng.standard_normal(_CAMPPLUS_HIDDEN)
    out_weight = rng.standard_normal((2 * _CAMPPLUS_HIDDEN, CAMPPLUS_EMBEDDING_DIM)) / np.sqrt(2 * _CAMPPLUS_HIDDEN)
    out_bias = 0.1 * rng.standard_normal(CAMPPLUS_EMBEDDING_DIM)
    initializers = [
        _init("frame_weight", frame_weight.astype(np.float32)),
        _init("frame_bias", frame_bias.astype(np.float32)),
        _init("out_weight", out_weight.astype(np.float32)),
        _init("out_bias", out_bias.astype(np.float32)),
        _init("variance_floor", np.array(1e-5, dtype=np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", [CAMPPLUS_INPUT, "frame_weight"], ["frame_linear"]),
        helper.make_node("Add", ["frame_linear", "frame_bias"], ["frame_pre"]),
        helper.make_node("Relu", ["frame_pre"], ["hidden"]),  # [B, T, H]
        # statistics pooling over time: mean and standard deviation
        helper.make_node("ReduceMean", ["hidden"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["hidden", "hidden"], ["hidden_sq"]),
        helper.make_node("ReduceMean", ["hidden_sq"], ["mean_sq"], axes=[1], keepdims=0),
        helper.make_node("Mul", ["mean", "mean"], ["sq_mean"]),
        helper.make_node("Sub", ["mean_sq", "sq_mean"], ["variance_raw"]),
        helper.make_node("Max", ["variance_raw", "variance_floor"], ["variance"]),
        helper.make_node("Sqrt", ["variance"], ["std"]),
        helper.make_node("Concat", ["mean", "std"], ["stats"], axis=1),  # [B, 2H]
        helper.make_node("MatMul", ["stats", "out_weight"], ["embedding_linear"]),
        helper.make_node("Add", ["embedding_linear", "out_bias"], [CAMPPLUS_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "campplus_standin",
        inputs=[helper.make_tensor_value_info(CAMPPLUS_INPUT, TensorProto.FLOAT,
                                              ["batch", "frames", CAMPPLUS_FBANK_BINS])],
        outputs=[helper.make_tensor_value_info(CAMPPLUS_OUTPUT, TensorProto.FLOAT,
                                               ["batch", CAMPPLUS_EMBEDDING_DIM])],
        initializer=initializers,
    )
    return _save(graph, path, "cosyvoice_tts.tools.onnx_models.campplus")


def write_speech_tokenizer(path: str | Path, seed: int = 0) -> Path:
    """Write a speech_tokenizer_v2 stand-in: log-mel [batch, 128, T] (+ lengths) -> int64 codes [batch, ceil(T/4)]."""
    rng = np.random.default_rng(seed)
    projection = rng.standard_normal((SPEECH_TOKENIZER_MEL_BINS, SPEECH_TOKENIZER_CODEBOOK)).astype(np.float32)
    initializers = [
        _init("projection", projection),
        _init("round_up", np.array(SPEECH_TOKENIZER_DOWNSAMPLE - 1, dtype=np.int64)),
        _init("downsample", np.array(SPEECH_TOKENIZER_DOWNSAMPLE, dtype=np.int64)),
        _init("token_axis", np.array([1], dtype=np.int64)),
        _init("zero", np.array([0], dtype=np.int64)),
    ]
    nodes = [
        # [B, 128, T] -> [B, 128, ceil(T/4)]; a partial last window averages only the frames it has
        helper.make_node("AveragePool", [SPEECH_TOKENIZER_FEATS], ["pooled"],
                         kernel_shape=[SPEECH_TOKENIZER_DOWNSAMPLE], strides=[SPEECH_TOKENIZER_DOWNSAMPLE],
                         ceil_mode=1, count_include_pad=0),
        helper.make_node("Transpose", ["pooled"], ["pooled_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["pooled_t", "projection"], ["scores"]),  # [B, T/4, 6561]
        helper.make_node("ArgMax", ["scores"], ["codes"], axis=2, keepdims=0),  # int64 [B, T/4]
        # keep the tokens that cover feats_length frames (the longest in the batch)
        helper.make_node("Cast", [SPEECH_TOKENIZER_FEATS_LENGTH], ["length64"], to=TensorProto.INT64),
        helper.make_node("Add", ["length64", "round_up"], ["length_up"]),
        helper.make_node("Div", ["length_up", "downsample"], ["token_lengths"]),
        helper.make_node("ReduceMax", ["token_lengths"], ["token_count"], keepdims=1),
        helper.make_node("Slice", ["codes", "zero", "token_count", "token_axis"], [SPEECH_TOKENIZER_OUTPUT]),
    ]
    graph = helper.make_graph(
        nodes, "speech_tokenizer_v2_standin",
        inputs=[
            helper.make_tensor_value_info(SPEECH_TOKENIZER_FEATS, TensorProto.FLOAT,
                                          ["batch", SPEECH_TOKENIZER_MEL_BINS, "frames"]),
            helper.make_tensor_value_info(SPEECH_TOKENIZER_FEATS_LENGTH, TensorProto.INT32, ["batch"]),
        ],
        outputs=[helper.make_tensor_value_info(SPEECH_TOKENIZER_OUTPUT, TensorProto.INT64, ["batch", "tokens"])],
        initializer=initializers,
    )
    return _save(graph, path, "cosyvoice_tts.tools.onnx_models.speech_tokenizer_v2")
