"""Shared fixtures: a tiny random model directory built once per session, an engine on it per module, the reference
interpreter, and torch on one thread for modules of tiny models."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """The models are tiny: extra threads only fight over the shared CPU. Modules use it as
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from cosyvoice_tts.tools.make_model import make_model

    return make_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    """A started engine on the tiny model, 4 sessions. Module-scoped: each test module gets one of its own, so a
    module that changes its settings (the vocoder placement tests do) leaves the others' alone."""
    from cosyvoice_tts.engine import Engine

    engine = Engine.load(tiny_model_dir, max_sessions=4)
    engine.start()
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def ref_python() -> str:
    """The interpreter of the upstream reference environment (REF_PYTHON), or skip."""
    python = os.environ.get("REF_PYTHON")
    if not python:
        pytest.skip("REF_PYTHON is not set: parity with the upstream CosyVoice2 code was not checked "
                    "(scripts/setup_reference_env.sh builds that environment)")
    if not shutil.which(python) and not Path(python).exists():
        pytest.skip(f"REF_PYTHON={python} does not exist")
    probe = subprocess.run([python, "-c", "import cosyvoice.llm.llm, hyperpyyaml"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"REF_PYTHON={python} cannot import the upstream cosyvoice package: {probe.stderr[-300:]}")
    return python

