"""CosyVoice2 streaming TTS serving stack."""
__version__ = "0.1.0"
