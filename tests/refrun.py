"""Run a script of tests/reference/ under the upstream reference interpreter (REF_PYTHON)."""
from __future__ import annotations

import subprocess
from pathlib import Path


def run_reference(ref_python: str, script: str, *args) -> None:
    path = Path(__file__).parent / "reference" / script
    result = subprocess.run([ref_python, str(path), *map(str, args)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"reference script {script} failed:\n{result.stderr[-3000:]}")
