"""End-to-end fixtures: real worker processes (`python -m cosyvoice_tts.server`) with the real engine on the
embedded default tiny model, driven over real sockets and by the real client CLI.

The tiny model is built once per test session by the first worker itself (no --model-dir, with
COSYVOICE_TTS_CACHE pointing at a temporary directory): that is the embedded-default path of the worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = float(os.environ.get("COSYVOICE_TTS_E2E_READY_TIMEOUT", "300"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cosyvoice_cache")


class Worker:
    """A worker process; its stderr is collected in ``lines``."""

    def __init__(self, cache: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = ["--port", "0", "--gpu", "0", *args]
        e = dict(os.environ)
        e.pop("COSYVOICE_TTS_AUTH_TOKEN", None)
        e["COSYVOICE_TTS_CACHE"] = str(cache)
        e["PYTHONUNBUFFERED"] = "1"
        e.setdefault("OMP_NUM_THREADS", "1")
        e.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cosyvoice_tts.server", *self.args],
            cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8",
        )  # fmt: skip
        self.lines: list[str] = []
        self.port: int | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"listening on [^ ]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if "cosyvoice_tts.server: ready:" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> "Worker":
        if not self._ready.wait(timeout) or self.port is None or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("worker did not become ready:\n" + self.log)
        return self

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        _, body = self.http("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def run_client(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str, str]:
    e = dict(os.environ)
    e.pop("COSYVOICE_TTS_AUTH_TOKEN", None)
    e.update(env or {})
    p = subprocess.run(
        [sys.executable, "-m", "cosyvoice_tts.client", *args], cwd=ROOT, env=e, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def client_json(*args: str, **kw) -> tuple[int, dict, str]:
    rc, out, err = run_client(*args, "--json", **kw)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else {}), out + err


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class _Tools:
    """What the e2e tests use, handed over as a fixture (conftest modules are not imported by tests)."""

    Worker = Worker
    run_client = staticmethod(run_client)
    client_json = staticmethod(client_json)
    wait_for = staticmethod(wait_for)


@pytest.fixture(scope="session")
def e2e() -> type[_Tools]:
    return _Tools
