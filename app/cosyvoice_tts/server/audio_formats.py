"""Encoded audio for the drop-in protocols (DashScope-style WebSocket, OpenAI-style HTTP): pcm, wav and mp3,
each produced incrementally as the engine's chunks arrive, with an optional volume gain.

mp3 uses ``lameenc`` (LAME bindings from PyPI) when it is installed; without it mp3 requests fail with a clear
message (``mp3_unavailable_reason``), never with another format.
"""

from __future__ import annotations

import numpy as np

from .audio import PcmEncoder

__all__ = ["AudioEncoder", "make_encoder", "mp3_unavailable_reason", "CONTENT_TYPES", "MP3_SAMPLE_RATES"]

# Content-Type of a whole response body of each format (what OpenAI's API and its clients use).
CONTENT_TYPES = {
    "pcm": "audio/pcm",
    "wav": "audio/wav",
    "mp3": "audio/mpeg",
}

# Sample rates an MPEG-1/2/2.5 layer III stream can carry.
MP3_SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


def mp3_unavailable_reason() -> str | None:
    """None when mp3 can be encoded here; else why not (for the error message)."""
    try:
        import lameenc  # noqa: F401
    except ImportError:
        return "mp3 output needs the 'lameenc' package on the worker (pip install lameenc); use pcm or wav"
    return None


def _mp3_bitrate(sample_rate: int) -> int:
    """Constant bit rate in kbit/s: 128 for MPEG-1 rates, 64 for MPEG-2, 32 for MPEG-2.5 (mono speech)."""
    if sample_rate >= 32000:
        return 128
    if sample_rate >= 16000:
        return 64
    return 32


class AudioEncoder:
    """float32 engine chunks at ``in_rate`` -> bytes of ``fmt`` at ``out_rate``, incrementally.

    Same interface as ``audio.PcmEncoder`` (``encode``, ``finish``, ``audio_seconds``), so a session can use
    either. ``gain`` multiplies the samples before conversion (clipped to full scale).
    """

    def __init__(self, in_rate: int, out_rate: int, fmt: str = "pcm", gain: float = 1.0) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"unsupported format {fmt!r}")
        if gain < 0:
            raise ValueError("gain must be >= 0")
        self.fmt = fmt
        self.out_rate = out_rate
        self.gain = float(gain)
        self._pcm = PcmEncoder(in_rate, out_rate, "wav" if fmt == "wav" else "pcm")
        self._mp3 = None
        if fmt == "mp3":
            reason = mp3_unavailable_reason()
            if reason is not None:
                raise RuntimeError(reason)
            if out_rate not in MP3_SAMPLE_RATES:
                raise ValueError(f"mp3 cannot carry {out_rate} Hz")
            import lameenc

            enc = lameenc.Encoder()
            enc.set_bit_rate(_mp3_bitrate(out_rate))
            enc.set_in_sample_rate(out_rate)
            enc.set_channels(1)
            enc.set_quality(5)  # 2 = best, 7 = fastest; 5 is LAME's default trade-off
            self._mp3 = enc

    def encode(self, chunk: np.ndarray) -> bytes:
        x = np.asarray(chunk, dtype=np.float32).reshape(-1)
        if self.gain != 1.0:
            x = x * np.float32(self.gain)
        data = self._pcm.encode(x)
        if self._mp3 is not None:
            return bytes(self._mp3.encode(data)) if data else b""
        return data

    def finish(self) -> bytes:
        """Everything still held (resampler tail, the encoder's last frames)."""
        data = self._pcm.finish()
        if self._mp3 is None:
            return data
        out = bytes(self._mp3.encode(data)) if data else b""
        return out + bytes(self._mp3.flush())

    @property
    def audio_seconds(self) -> float:
        return self._pcm.audio_seconds


def make_encoder(in_rate: int, out_rate: int, fmt: str, gain: float = 1.0) -> AudioEncoder:
    return AudioEncoder(in_rate, out_rate, fmt, gain)
