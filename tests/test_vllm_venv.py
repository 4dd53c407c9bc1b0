"""Runs tests/test_vllm_e2e.py under VLLM_PYTHON: an interpreter whose environment has vLLM (the project's own
environment does not: vLLM's CPU build is installed separately, see docs/vllm.md)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from cosyvoice_tts.vllm_backend import vllm_unavailable_reason


def test_vllm_e2e_under_vllm_python():
    if vllm_unavailable_reason() is None:
        pytest.skip("vLLM is importable here: tests/test_vllm_e2e.py runs in this session directly")
    python = os.environ.get("VLLM_PYTHON")
    if not python:
        pytest.skip(f"VLLM_PYTHON is not set and {vllm_unavailable_reason()}: the vLLM end-to-end tests did not run")
    if not Path(python).exists():
        pytest.skip(f"VLLM_PYTHON={python} does not exist")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                             str(root / "tests" / "test_vllm_e2e.py")],
                            cwd=root, capture_output=True, text=True, timeout=1200)
    tail = (result.stdout + result.stderr)[-3000:]
    assert result.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail
