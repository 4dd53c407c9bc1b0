"""ansible-lint (production profile) over the roles, playbooks, molecule scenario and inventory."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = ROOT / ".venv-deploy" / "bin" / "ansible-lint"


def test_ansible_lint_production_profile_passes():
    if not LINT.exists():
        pytest.skip("ansible-lint is not installed: run `bash molecule/run.sh setup` (creates .venv-deploy)")
    result = subprocess.run([str(LINT), "--profile", "production", "ansible/", "molecule/", "inventory/"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Profile 'production' was required, and it passed" in output, output[-2000:]
