"""Audio framing for the wire: float32 chunks -> 16-bit little-endian PCM, streaming resampling, WAV header."""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["PcmEncoder", "wav_header", "STREAMING_WAV_SIZE"]

# Size fields of a WAV header whose length is not known when streaming starts (as ffmpeg/sox write).
STREAMING_WAV_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, num_samples: int | None = None, channels: int = 1) -> bytes:
    """A 44-byte PCM s16le WAV header. ``num_samples=None``: unknown length (streaming)."""
    block = 2 * channels
    if num_samples is None:
        data_size = STREAMING_WAV_SIZE
        riff_size = STREAMING_WAV_SIZE
    else:
        data_size = num_samples * block
        riff_size = 36 + data_size
    return (
        b"RIFF"
        + struct.pack("<I", riff_size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, 16)
        + b"data"
        + struct.pack("<I", data_size)
    )


def float_to_pcm16(x: np.ndarray) -> bytes:
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return (np.clip(x, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class PcmEncoder:
    """Turns the engine's float32 chunks into wire frames for one request.

    Resamples from ``in_rate`` to ``out_rate`` with a streaming soxr resampler (no clicks at chunk edges),
    converts to s16le and, for ``fmt == "wav"``, puts a streaming WAV header before the first bytes.
    """

    def __init__(self, in_rate: int, out_rate: int, fmt: str = "pcm") -> None:
        if fmt not in ("pcm", "wav"):
            raise ValueError(f"unsupported format {fmt!r}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.fmt = fmt
        self.samples_out = 0
        self._header_sent = False
        self._rs = None
        if in_rate != out_rate:
            import soxr

            self._rs = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def _frame(self, pcm: bytes) -> bytes:
        if self.fmt == "wav" and not self._header_sent and pcm:
            self._header_sent = True
            return wav_header(self.out_rate) + pcm
        return pcm

    def encode(self, chunk: np.ndarray) -> bytes:
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self._rs is not None:
            x = self._rs.resample_chunk(x, last=False)
        self.samples_out += len(x)
        return self._frame(float_to_pcm16(x))

    def finish(self) -> bytes:
        """Bytes still held by the resampler (send them before ``finished``)."""
        if self._rs is None:
            return b""
        x = self._rs.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self.samples_out += len(x)
        return self._frame(float_to_pcm16(x))

    @property
    def audio_seconds(self) -> float:
        return self.samples_out / float(self.out_rate)
