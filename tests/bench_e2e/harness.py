"""Real processes for the bench's end-to-end test: worker processes and an nginx load balancer on loopback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
         if os.access(p, os.X_OK)), None)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(sample name, sorted label items): value}."""
    status, body = http_get(url)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}")
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-n:]
    except OSError:
        return "(no log)"


class Process:
    """A child process in its own process group, with its output in a log file; stopped on exit."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
        self.argv, self.log_path, self.env, self.cwd = argv, log, env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        return self

    def log(self) -> str:
        return _tail(self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


class WorkerProcess(Process):
    """`python -m cosyvoice_tts.server` on a loopback port (the embedded tiny model, CPU)."""

    def __init__(self, worker_id: str, log_dir: Path, extra: list[str] | None = None):
        self.port = free_port()
        self.worker_id = worker_id
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        super().__init__([sys.executable, "-m", "cosyvoice_tts.server", "--host", "127.0.0.1",
                          "--port", str(self.port), "--worker-id", worker_id] + (extra or []),
                         log_dir / f"worker-{worker_id}.log", env=env, cwd=REPO)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker {self.worker_id} exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if http_get(self.base + "/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"worker {self.worker_id} not ready in time:\n{self.log()}")


NGINX_CONF = """\
{user}worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
    upstream tts_workers {{
        least_conn;
        zone tts_workers 64k;
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location /ws {{
            proxy_pass http://tts_workers;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            proxy_buffering off;
        }}
    }}
}}
"""


class Nginx(Process):
    """A real nginx in the foreground with its own config and prefix in ``tmp``: least_conn over
    ``upstream_ports``, WebSocket upgrade on /ws."""

    def __init__(self, binary: str, tmp: Path, upstream_ports: list[int]):
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tmp = tmp
        servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=0;" for p in upstream_ports)
        user = "user root;\n" if os.geteuid() == 0 else ""  # workers keep access to the temp dir
        self.conf = tmp / "nginx.conf"
        self.conf.write_text(NGINX_CONF.format(user=user, tmp=tmp, servers=servers, port=self.port))
        super().__init__([binary, "-p", str(tmp), "-c", str(self.conf), "-e", str(tmp / "error.log")],
                         tmp / "nginx.out")
        self.binary = binary

    def check_config(self) -> None:
        r = subprocess.run([self.binary, "-t", "-p", str(self.tmp), "-c", str(self.conf), "-e",
                            str(self.tmp / "error.log")], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{r.stdout}{r.stderr}")

    def wait_listening(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"nginx exited:\n{self.log()}\n{_tail(self.tmp / 'error.log')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx is not listening:\n{_tail(self.tmp / 'error.log')}")

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 20.0) -> None:
        super().stop(sig, timeout)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"
