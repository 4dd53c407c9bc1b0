"""Load-test tool for CosyVoice2 TTS deployments: `python bench/run.py --help`."""
