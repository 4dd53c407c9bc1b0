#!/usr/bin/env python3
"""The multi-GPU bench, step by step (bench/multi_gpu/run.sh prepares the environment and calls this):

1. model: build the random model once (`python -m cosyvoice_tts.tools.make_model`; `full` on GPUs, `tiny` in
   CPU mode) unless ``--model-dir`` already holds one;
2. workers: one `python -m cosyvoice_tts.server` per GPU (``CUDA_VISIBLE_DEVICES=i``, ``--gpu 0``, port
   base + i, worker id ``gpu<i>``), each under bench/multi_gpu/supervise.py (Restart=always, RestartSec);
   wait for /readyz on all;
3. nginx: render the nginx_lb role's configuration twice (one upstream = GPU 0 only; all GPUs) with
   bench/multi_gpu/render_nginx.py, `nginx -t` both;
4. single_sweep: `bench/run.py --sweep L` through nginx with the one-worker upstream;
5. multi_sweep: `bench/run.py --sweep N x L` through nginx with every worker (GPU utilisation sampled);
6. failure: a fixed-concurrency bench through the same nginx; once the victim is serving, `kill -9` its
   worker process; count the failed requests; time the supervisor's restart until /readyz answers 200;
7. summary.json + summary.md in ``--out`` (and copies plus a tarball of everything in ``--export``).

Every phase has a time estimate; a phase that does not fit in what is left of ``--budget`` (seconds since
``--t0``) is not run, and the summary says so. Written for one 10-minute call on a machine with no network.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.multi_gpu import analyze, render_nginx  # noqa: E402

PHASES = ("model", "workers", "nginx", "single_sweep", "multi_sweep", "failure")


try:  # bound now: a preexec_fn must not import (another thread may hold the import lock at fork time)
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _pdeathsig(sig: int):
    """preexec_fn: the child gets ``sig`` when this process dies (Linux), so nothing outlives a killed run."""
    def fn():
        if _PRCTL is not None:
            _PRCTL(1, int(sig))  # PR_SET_PDEATHSIG
    return fn


def http_get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return None, str(e)


def rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


class GpuSampler(threading.Thread):
    """nvidia-smi once a second: utilisation and memory per GPU, tagged with the current phase."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[dict] = []
        self.phase = "idle"
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
                t = time.monotonic()
                for line in r.stdout.strip().splitlines():
                    idx, util, mem = (x.strip() for x in line.split(","))
                    self.samples.append({"t": t, "phase": self.phase, "index": int(idx), "util": float(util),
                                         "mem_mib": float(mem)})
            except Exception:  # noqa: BLE001 - sampling is best effort
                pass
            self._stop_ev.wait(1.0)

    def stop(self):
        self._stop_ev.set()

    def summary(self, phase: str, gpus: list[int] | None = None) -> dict:
        xs = [x for x in self.samples if x["phase"] == phase and (gpus is None or x["index"] in gpus)]
        return analyze.gpu_util_summary(xs)


class Orchestrator:
    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.t0 = a.t0 if a.t0 else time.time()
        self.mono0 = time.monotonic() - (time.time() - self.t0)
        self.out = Path(a.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.py = a.python or sys.executable
        self.procs: list[subprocess.Popen] = []
        self.supervisors: list[dict] = []
        self.nginx: subprocess.Popen | None = None
        self.sampler: GpuSampler | None = None
        self.docs: dict[str, dict | None] = {}
        self.s: dict = {
            "version": 1,
            "started_utc": _dt.datetime.fromtimestamp(self.t0, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": socket.gethostname(),
            "mode": "cpu" if a.cpu else "gpu",
            "phases": [],
            "commands": [],
            "notes": [],
        }

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.time() - self.t0

    def remaining(self) -> float:
        return self.a.budget - self.elapsed()

    def log(self, msg: str) -> None:
        print(f"[multi_gpu {self.elapsed():6.1f}s] {msg}", flush=True)

    def phase_done(self, name: str, status: str, reason: str | None = None, seconds: float | None = None, **kw):
        ph = {"name": name, "status": status}
        if reason:
            ph["reason"] = reason
        if seconds is not None:
            ph["seconds"] = round(seconds, 1)
        ph.update(kw)
        self.s["phases"] = [p for p in self.s["phases"] if p["name"] != name] + [ph]
        self.log(f"phase {name}: {status}" + (f" ({reason})" if reason else ""))
        self.write_summary()

    def fits(self, name: str, est: float) -> bool:
        left = self.remaining() - self.a.reserve
        if name in self.a.skip:
            self.phase_done(name, "skipped", "--skip")
            return False
        if est > left:
            self.phase_done(name, "not run", f"budget: needs ~{est:.0f} s, {max(left, 0):.0f} s left "
                                             f"of --budget {self.a.budget:.0f} s (minus --reserve {self.a.reserve:.0f} s)")
            return False
        self.log(f"phase {name}: start (estimate {est:.0f} s, {left:.0f} s left)")
        return True

    def command(self, argv: list[str], env: dict | None = None) -> str:
        pre = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
        c = (pre + " " if pre else "") + shlex.join(rel(x) if str(x).startswith(str(ROOT)) else str(x) for x in argv)
        self.s["commands"].append(c)
        return c

    def write_summary(self) -> None:
        self.s["elapsed_s"] = round(self.elapsed(), 1)
        text = json.dumps(self.s, indent=1, ensure_ascii=False, default=str)
        (self.out / "summary.json").write_text(text)
        md = analyze.markdown(self.s)
        (self.out / "summary.md").write_text(md)
        if self.a.export:
            ex = Path(self.a.export)
            ex.mkdir(parents=True, exist_ok=True)
            (ex / "summary.json").write_text(text)
            (ex / "summary.md").write_text(md)

    def export_bundle(self) -> None:
        if not self.a.export:
            return
        ex = Path(self.a.export)
        dest = ex / "multi_gpu_out.tar.gz"
        try:
            with tarfile.open(dest, "w:gz") as tf:
                tf.add(self.out, arcname="multi_gpu_out",
                       filter=lambda ti: None if ti.name.endswith((".pid", ".sock")) else ti)
            self.log(f"exported {dest} ({dest.stat().st_size / 1e6:.1f} MB)")
        except OSError as e:
            self.log(f"export of the bundle failed: {e}")

    def popen(self, argv: list[str], log: Path, env: dict | None = None, deathsig=signal.SIGTERM) -> subprocess.Popen:
        f = open(log, "ab")
        p = subprocess.Popen(argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True, preexec_fn=_pdeathsig(deathsig))
        f.close()
        self.procs.append(p)
        return p

    @staticmethod
    def stop_proc(p: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 20.0) -> None:
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)

    # ---- steps --------------------------------------------------------------------------------------------
    def detect(self) -> None:
        a = self.a
        if a.cpu:
            self.gpus = list(range(a.cpu))
            self.s["gpus"] = []
        else:
            try:
                r = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                                    "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
                rows = [[x.strip() for x in ln.split(",")] for ln in r.stdout.strip().splitlines() if ln.strip()]
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SystemExit(f"nvidia-smi failed ({e}); for a CPU test use --cpu N")
            info = [{"index": int(x[0]), "name": x[1], "memory_total_mib": int(float(x[2])), "driver": x[3]}
                    for x in rows]
            if not info:
                raise SystemExit("nvidia-smi lists no GPU; for a CPU test use --cpu N")
            want = [int(x) for x in a.gpus.split(",")] if a.gpus else [g["index"] for g in info]
            missing = set(want) - {g["index"] for g in info}
            if missing:
                raise SystemExit(f"--gpus {a.gpus}: no GPU {sorted(missing)} (nvidia-smi lists {[g['index'] for g in info]})")
            self.gpus = want
            self.s["gpus"] = [g for g in info if g["index"] in want]
        self.n = len(self.gpus)
        self.s["n_workers"] = self.n
        gpu = not a.cpu
        self.model_dir = Path(a.model_dir or ("/tmp/cosyvoice2-full-seed0" if gpu else "/tmp/cosyvoice2-tiny-seed0"))
        self.model_size = a.model_size or ("full" if gpu else "tiny")
        self.dtype = a.dtype or ("bf16" if gpu else "fp32")
        self.levels = [int(x) for x in (a.sweep or ("1,8,32" if gpu else "1,2")).split(",") if x.strip()]
        self.tail = a.level_tail if a.level_tail is not None else (10.0 if gpu else 4.0)
        self.s["config"] = {
            "budget_s": a.budget, "reserve_s": a.reserve, "model_dir": str(self.model_dir), "model_size": self.model_size,
            "dtype": self.dtype, "max_sessions": a.max_sessions, "base_port": a.base_port, "lb_port": a.lb_port,
            "restart_sec": a.restart_sec, "single_levels": self.levels, "multi_levels": [c * self.n for c in self.levels],
            "duration_s": a.duration, "warmup": a.warmup, "request_timeout_s": a.request_timeout, "slo_ms": a.slo_ms,
            "level_tail_s": self.tail, "bench_extra": a.bench_extra, "worker_args": a.worker_args,
            "gpus": self.gpus, "python": self.py,
        }
        self.s["environment"] = {"python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                                 "git_commit": self._git("rev-parse", "HEAD"),
                                 "git_dirty_files": len((self._git("status", "--porcelain") or "").splitlines())}

    @staticmethod
    def _git(*args) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    def build_model(self) -> bool:
        t = time.monotonic()
        if (self.model_dir / "cosyvoice2.yaml").exists():
            self.phase_done("model", "ran", f"reused {self.model_dir}", 0.0)
            return True
        est = 90.0 if self.model_size == "full" else 20.0
        if not self.fits("model", est):
            return False
        argv = [self.py, "-m", "cosyvoice_tts.tools.make_model", str(self.model_dir), "--size", self.model_size,
                "--seed", "0"]
        self.command(argv)
        r = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        (self.out / "make_model.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            self.phase_done("model", "failed", f"make_model exited {r.returncode}: {r.stderr[-500:]}",
                            time.monotonic() - t)
            return False
        self.phase_done("model", "ran", f"built {self.model_size} into {self.model_dir}", time.monotonic() - t)
        return True

    def start_workers(self) -> bool:
        a = self.a
        if not self.fits("workers", 30 if a.cpu else 60):
            return False
        t = time.monotonic()
        wdir = self.out / "workers"
        wdir.mkdir(exist_ok=True)
        self.s["workers"] = []
        threads = a.cpu_threads or max(1, (os.cpu_count() or 2) // max(self.n, 1))
        for i, g in enumerate(self.gpus):
            name = f"gpu{g}" if not a.cpu else f"cpu{g}"
            port = a.base_port + g
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            shown = {}
            if a.cpu:
                shown = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
            else:
                shown = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(g)}
            env.update(shown)
            worker = [self.py, "-m", "cosyvoice_tts.server", "--model-dir", str(self.model_dir), "--gpu", "0",
                      "--dtype", self.dtype, "--host", "127.0.0.1", "--port", str(port),
                      "--max-sessions", str(a.max_sessions), "--worker-id", name] + shlex.split(a.worker_args or "")
            ev, pidf = wdir / f"{name}.events.jsonl", wdir / f"{name}.pid"
            for f in (ev, pidf):
                f.unlink(missing_ok=True)
            sup = [self.py, str(HERE / "supervise.py"), "--name", name, "--events", str(ev), "--pidfile", str(pidf),
                   "--log", str(wdir / f"worker-{name}.log"), "--restart-sec", str(a.restart_sec),
                   "--stop-timeout", "20", "--"] + worker
            if i == 0:
                self.command(sup, shown)
            p = self.popen(sup, wdir / f"supervise-{name}.log", env=env)
            self.supervisors.append({"name": name, "gpu": g, "port": port, "proc": p, "events": ev, "pidfile": pidf,
                                     "url": f"http://127.0.0.1:{port}"})
            self.s["workers"].append({"name": name, "gpu": g, "port": port})
        deadline = time.monotonic() + min(a.ready_timeout, max(self.remaining() - a.reserve, 10))
        pending = {w["name"]: w for w in self.supervisors}
        while pending and time.monotonic() < deadline:
            for name, w in list(pending.items()):
                if w["proc"].poll() is not None:
                    self.phase_done("workers", "failed", f"supervisor of {name} exited", time.monotonic() - t)
                    return False
                st, _ = http_get(w["url"] + "/readyz", timeout=2)
                if st == 200:
                    starts = self.events(w)
                    w["first_ready_s"] = time.monotonic() - (starts[0]["mono"] if starts else t)
                    w["restarts_before_ready"] = sum(1 for e in starts if e["event"] == "start") - 1
                    pending.pop(name)
                    self.log(f"{name} ready on :{w['port']} after {w['first_ready_s']:.1f} s")
            time.sleep(0.5)
        for rec, w in zip(self.s["workers"], self.supervisors):
            rec["first_start_to_ready_s"] = round(w["first_ready_s"], 2) if "first_ready_s" in w else None
            rec["restarts_before_ready"] = w.get("restarts_before_ready")
        if pending:
            tails = {n: self._tail(self.out / "workers" / f"worker-{n}.log") for n in pending}
            self.s["notes"].append("workers not ready: " + json.dumps(tails, ensure_ascii=False)[-3000:])
            self.phase_done("workers", "failed", f"not ready in time: {sorted(pending)}", time.monotonic() - t)
            return False
        self.phase_done("workers", "ran", None, time.monotonic() - t)
        return True

    @staticmethod
    def _tail(p: Path, n: int = 1500) -> str:
        try:
            return p.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    @staticmethod
    def events(w: dict) -> list[dict]:
        try:
            return [json.loads(ln) for ln in Path(w["events"]).read_text().splitlines() if ln.strip()]
        except OSError:
            return []

    def render_nginx(self) -> bool:
        a = self.a
        t = time.monotonic()
        if not self.fits("nginx", 30 if render_nginx.find_ansible_playbook() else 5):
            return False
        self.nginx_env = dict(os.environ)
        if a.nginx_lib:
            self.nginx_env["LD_LIBRARY_PATH"] = a.nginx_lib
        r = subprocess.run([a.nginx_bin, "-v"], capture_output=True, text=True, env=self.nginx_env)
        info = {"binary": a.nginx_bin, "source": a.nginx_source, "version": (r.stderr or r.stdout).strip(),
                "ld_library_path": a.nginx_lib or None}
        etc = Path(a.nginx_etc)
        try:
            single = render_nginx.render(self.out / "nginx-single", self.gpus[:1], a.base_port, a.lb_port, etc,
                                         a.renderer, compare=a.compare_renderers)
            multi = render_nginx.render(self.out / "nginx-multi", self.gpus, a.base_port, a.lb_port, etc,
                                        a.renderer, compare=a.compare_renderers)
        except Exception as e:  # noqa: BLE001
            self.s["nginx"] = info
            self.phase_done("nginx", "failed", f"render: {e}", time.monotonic() - t)
            return False
        info.update({"renderer": multi["renderer"], "renders_equal":
                     None if multi["renders_equal"] is None else bool(multi["renders_equal"] and single["renders_equal"]),
                     "local_edits": multi["local_edits"], "files": multi.get("files"),
                     "single_upstream": single["upstream_servers"], "multi_upstream": multi["upstream_servers"]})
        self.s["nginx"] = info
        for prefix in ("nginx-single", "nginx-multi"):
            argv = self.nginx_argv(self.out / prefix) + ["-t"]
            r = subprocess.run(argv, capture_output=True, text=True, env=self.nginx_env)
            info[f"{prefix}_test"] = (r.stdout + r.stderr).strip()[-1000:]
            if r.returncode != 0:
                self.phase_done("nginx", "failed", f"nginx -t ({prefix}): {r.stderr[-500:]}", time.monotonic() - t)
                return False
        if info["renders_equal"] is False:
            self.s["notes"].append("ansible and jinja2 renders of nginx_lb differ (see nginx-*/render*)")
        self.phase_done("nginx", "ran", f"rendered with {info['renderer']}", time.monotonic() - t)
        return True

    def nginx_argv(self, prefix: Path) -> list[str]:
        return [self.a.nginx_bin, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e",
                str(prefix / "error.log"), "-g", "daemon off;"]

    def start_nginx(self, prefix: Path) -> bool:
        self.stop_nginx()
        argv = self.nginx_argv(prefix)
        self.command(argv, {"LD_LIBRARY_PATH": self.a.nginx_lib} if self.a.nginx_lib else None)
        self.nginx = self.popen(argv, prefix / "nginx.out", env=self.nginx_env)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.nginx.poll() is not None:
                self.s["notes"].append(f"nginx exited: {self._tail(prefix / 'error.log')}")
                return False
            st, _ = http_get(f"http://127.0.0.1:{self.a.lb_port}/lb-healthz", timeout=1)
            if st == 200:
                return True
            time.sleep(0.1)
        return False

    def stop_nginx(self) -> None:
        self.stop_proc(self.nginx, signal.SIGTERM, 10)  # fast shutdown: QUIT would wait for open WebSockets
        self.nginx = None

    def scrape_all(self) -> dict[str, dict]:
        out = {}
        for w in self.supervisors:
            st, body = http_get(w["url"] + "/metrics", timeout=5)
            out[w["name"]] = analyze.worker_counters(analyze.parse_metrics(body)) if st == 200 else {}
        return out

    def bench_argv(self, name: str, load: list[str]) -> list[str]:
        a = self.a
        return ([self.py, str(ROOT / "bench" / "run.py"), "--url", f"ws://127.0.0.1:{a.lb_port}/ws", *load,
                 "--request-timeout", str(a.request_timeout), "--quiet", "--out", str(self.out / name)]
                + (["--no-plots"] if a.no_plots else []) + shlex.split(a.bench_extra or ""))

    def sweep_estimate(self, levels: list[int]) -> float:
        return len(levels) * (self.a.duration + self.tail) + self.a.warmup * (3.0 if not self.a.cpu else 1.5) + 15

    def run_sweep(self, name: str, levels: list[int], prefix: str) -> dict | None:
        a = self.a
        est = self.sweep_estimate(levels)
        if not self.fits(name, est):
            return None
        t = time.monotonic()
        if not self.start_nginx(self.out / prefix):
            self.phase_done(name, "failed", "nginx did not start", time.monotonic() - t)
            return None
        if self.sampler:
            self.sampler.phase = name
        before = self.scrape_all()
        argv = self.bench_argv(name, ["--sweep", ",".join(map(str, levels)), "--duration", str(a.duration),
                                      "--warmup", str(a.warmup), "--slo-ms", str(a.slo_ms)])
        self.command(argv)
        p = self.popen(argv, self.out / f"{name}.bench.log")
        limit = max(est * 1.5 + a.request_timeout, 30)
        after, doc = self._end_bench(p, name, min(limit, max(self.remaining() - 10, 5)),
                                     f"{name}: bench stopped at its time limit (SIGINT)")
        self.s.setdefault("metrics", {})[name] = {"before": before, "after": after,
                                                  "delta": analyze.counter_deltas(before, after)}
        if doc is None:
            self.phase_done(name, "failed", f"no results (bench exit {p.returncode}): "
                            f"{self._tail(self.out / f'{name}.bench.log', 800)}", time.monotonic() - t)
            return None
        self.phase_done(name, "ran", None, time.monotonic() - t, bench_exit=p.returncode)
        return doc

    def _end_bench(self, p, name: str, timeout: float, note: str):
        """Wait for a bench run (SIGINT at `timeout`), then scrape the workers and read its results.json."""
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.s["notes"].append(note)
            self.stop_proc(p, signal.SIGINT, 30)
        after = self.scrape_all()
        if self.sampler:
            self.sampler.phase = "idle"
        doc = self._load(self.out / name / "results.json")
        self.docs[name] = doc
        return after, doc

    @staticmethod
    def _load(p: Path) -> dict | None:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def failure_run(self) -> None:
        a = self.a
        name = "failure"
        v = self.supervisors[a.victim if a.victim is not None else -1]
        first = max((w.get("first_ready_s") or 0.0) for w in self.supervisors)
        window = a.recovery_window if a.recovery_window is not None else first + a.restart_sec + 15.0
        conc = a.fail_concurrency or self.n * (8 if not a.cpu else 2)
        duration = a.kill_after + window
        room = self.remaining() - a.reserve - self.tail - 20
        f = {"victim": v["name"], "concurrency": conc, "reconnect": not a.fail_keep_connections,
             "kill_after_s": a.kill_after, "first_start_to_ready_s": round(first, 2)}
        self.s["failure"] = f
        if name in a.skip:
            f.update(status="skipped", reason="--skip")
            self.phase_done(name, "skipped", "--skip")
            return
        min_dur = a.kill_after + a.restart_sec + 5
        if room < min_dur:
            f.update(status="not run", reason=f"budget: {max(room, 0):.0f} s left for a >= {min_dur:.0f} s bench")
            self.phase_done(name, "not run", f["reason"])
            return
        if duration > room:
            self.s["notes"].append(f"failure run shortened to {room:.0f} s (wanted {duration:.0f} s): the worker "
                                   "may come back after the bench ended; its readiness is still timed")
            duration = room
        self.log(f"phase failure: start ({duration:.0f} s bench, kill {v['name']} after {a.kill_after:g} s)")
        t = time.monotonic()
        if not (self.nginx and self.nginx.poll() is None):
            if not self.start_nginx(self.out / "nginx-multi"):
                f.update(status="failed", reason="nginx did not start")
                self.phase_done(name, "failed", f["reason"])
                return
        if self.sampler:
            self.sampler.phase = name
        before = self.scrape_all()
        load = ["--parallel", str(conc), "--duration", f"{duration:.0f}", "--warmup", "0"]
        if not a.fail_keep_connections:
            load.append("--reconnect")
        argv = self.bench_argv(name, load)
        self.command(argv)
        t_launch = time.monotonic()
        p = self.popen(argv, self.out / f"{name}.bench.log")
        active = 0.0
        while True:
            now = time.monotonic()
            if p.poll() is not None:
                f.update(status="failed", reason=f"the bench ended (exit {p.returncode}) before the kill")
                self.phase_done(name, "failed", f["reason"], now - t)
                return
            st, body = http_get(v["url"] + "/metrics", timeout=2)
            if st == 200:
                active = analyze.worker_counters(analyze.parse_metrics(body))["sessions_active"]
            if now - t_launch >= a.kill_after and (active > 0 or now - t_launch >= a.kill_after + 20):
                break
            time.sleep(0.25)
        pid = int(Path(v["pidfile"]).read_text().strip())
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        self.command(["kill", "-9", str(pid)])
        f.update(victim_pid=pid, kill_after_launch_s=round(t_kill - t_launch, 2),
                 victim_sessions_active_before_kill=active, kill_utc=_dt.datetime.now(_dt.timezone.utc).isoformat())
        self.log(f"killed {v['name']} (pid {pid}) with {active:g} request(s) in flight on it")
        # the restarted process (new pid) answering /readyz 200
        ready_at = None
        deadline = t_kill + max(self.remaining() - a.reserve, 5)
        while time.monotonic() < deadline:
            try:
                cur = int(Path(v["pidfile"]).read_text().strip())
            except (OSError, ValueError):
                cur = pid
            if cur != pid:
                st, _ = http_get(v["url"] + "/readyz", timeout=1)
                if st == 200:
                    ready_at = time.monotonic()
                    break
            time.sleep(0.2)
        if ready_at is not None:
            self.log(f"{v['name']} ready again {ready_at - t_kill:.1f} s after the kill")
        after, doc = self._end_bench(p, name, max(self.remaining() - a.reserve / 2, 5),
                                     "failure: bench stopped at the budget (SIGINT)")
        tl = analyze.supervisor_timeline(self.events(v), t_kill)
        f.update({
            "status": "ran" if doc is not None else "failed",
            "bench_duration_s": duration, "bench_exit": p.returncode,
            "requests": analyze.failed_requests(doc, v["name"]) if doc else None,
            "supervisor": tl,
            "recovery_s": round(ready_at - t_kill, 2) if ready_at else None,
            "start_to_ready_s": round(ready_at - tl["restart"]["mono"], 2) if (ready_at and tl.get("restart")) else None,
            "served_after_restart": int((after.get(v["name"]) or {}).get("finished", 0)) if ready_at else 0,
            "metrics_delta": analyze.counter_deltas(before, after),
        })
        if ready_at is None:
            f["reason"] = "the restarted worker was not ready within the budget"
        self.phase_done(name, f["status"], f.get("reason") if doc is not None else "no bench results",
                        time.monotonic() - t)

    def analyse(self) -> None:
        names = [w["name"] for w in self.supervisors]
        single = analyze.level_rows(self.docs.get("single_sweep"))
        multi = analyze.level_rows(self.docs.get("multi_sweep"))
        self.s["single"] = {"levels": single}
        self.s["multi"] = {"levels": multi}
        if multi:
            gu = self.sampler.summary("multi_sweep") if self.sampler else None
            md = (self.s.get("metrics", {}).get("multi_sweep") or {}).get("delta")
            self.s["balance"] = analyze.balance(multi, names, self.docs.get("multi_sweep"), md, gu)
        if single and multi:
            self.s["scaling"] = analyze.scaling(single, multi, self.n)
        self.s["p95_first_chunk_ms"] = {"single": {r["concurrency"]: r["first_chunk_p95_ms"] for r in single},
                                        "multi": {r["concurrency"]: r["first_chunk_p95_ms"] for r in multi}}
        if self.sampler:
            self.s["gpu_util"] = {ph: self.sampler.summary(ph) for ph in ("single_sweep", "multi_sweep", "failure")}
            with open(self.out / "gpu_util.jsonl", "w") as fh:
                for x in self.sampler.samples:
                    fh.write(json.dumps(x) + "\n")
        ran = {p["name"] for p in self.s["phases"]}
        for ph in PHASES:
            if ph not in ran:
                self.s["phases"].append({"name": ph, "status": "not run", "reason": "an earlier phase failed"})

    def run(self) -> int:
        self.detect()
        self.log(f"{self.s['mode']} mode, {self.n} worker(s) {self.gpus}, budget {self.a.budget:.0f} s "
                 f"({self.remaining():.0f} s left), out {self.out}")
        self.write_summary()
        if not self.build_model() or not self.start_workers() or not self.render_nginx():
            return 1
        if not self.a.cpu and shutil.which("nvidia-smi"):
            self.sampler = GpuSampler()
            self.sampler.start()
        self.run_sweep("single_sweep", self.levels, "nginx-single")
        self.run_sweep("multi_sweep", [c * self.n for c in self.levels], "nginx-multi")
        self.failure_run()
        return 0 if self.docs.get("multi_sweep") else 1

    def cleanup(self) -> None:
        if self.sampler:
            self.sampler.stop()
        self.stop_nginx()
        for w in self.supervisors:
            try:
                os.killpg(w["proc"].pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for w in self.supervisors:
            self.stop_proc(w["proc"], signal.SIGTERM, 25)
        for p in self.procs:
            self.stop_proc(p, signal.SIGKILL, 5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default bench_results/multi_gpu-<UTC time>)")
    p.add_argument("--export", default=None, help="also copy summary.json, summary.md and a tarball of --out here")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--gpus", default=None, help="GPU indices to use (default: every GPU nvidia-smi lists)")
    g.add_argument("--cpu", type=int, default=None, metavar="N", help="CPU test mode: N workers, tiny model")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for everything, counted from --t0")
    p.add_argument("--t0", type=float, default=None, help="Unix time the budget counts from (default: now)")
    p.add_argument("--reserve", type=float, default=20.0, help="seconds kept for teardown and the report")
    p.add_argument("--python", default=None, help="Python for the workers and the bench (default: this one)")
    p.add_argument("--model-dir", default=None, help="default /tmp/cosyvoice2-{full,tiny}-seed0 (built if missing)")
    p.add_argument("--model-size", choices=("full", "tiny"), default=None, help="default full (GPU) / tiny (CPU)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default bf16 (GPU) / fp32 (CPU)")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--worker-args", default="", help="more worker arguments (one string)")
    p.add_argument("--cpu-threads", type=int, default=None, help="CPU mode: OMP_NUM_THREADS per worker")
    p.add_argument("--base-port", type=int, default=9000, help="worker of GPU i listens on base + i")
    p.add_argument("--lb-port", type=int, default=8080)
    p.add_argument("--restart-sec", type=float, default=5.0, help="supervisor pause before a restart "
                   "(tts_gpu_restart_sec of the tts_gpu role)")
    p.add_argument("--ready-timeout", type=float, default=420.0)
    p.add_argument("--sweep", default=None, help="one-worker levels (default 1,8,32 GPU / 1,2 CPU); the N-worker "
                   "sweep uses N x each")
    p.add_argument("--duration", type=float, default=15.0, help="seconds of arrivals per sweep level")
    p.add_argument("--warmup", type=int, default=2, help="warm-up requests before each sweep")
    p.add_argument("--slo-ms", type=float, default=300.0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--level-tail", type=float, default=None, help="estimated seconds a level runs past --duration "
                   "(default 10 GPU / 4 CPU), for the budget")
    p.add_argument("--fail-concurrency", type=int, default=None, help="failure run sessions (default 8 per GPU, 2 CPU)")
    p.add_argument("--fail-keep-connections", action="store_true", help="failure run without --reconnect")
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds into the failure run before the kill")
    p.add_argument("--recovery-window", type=float, default=None, help="seconds the failure bench goes on after "
                   "the kill (default: first start-to-ready time + --restart-sec + 15)")
    p.add_argument("--victim", type=int, default=None, help="index into the workers (default: the last)")
    p.add_argument("--skip", default="", help="comma-separated phases not to run: single_sweep,multi_sweep,failure")
    p.add_argument("--nginx-bin", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--nginx-lib", default=None, help="LD_LIBRARY_PATH for nginx only (unpacked libraries)")
    p.add_argument("--nginx-etc", default="/etc/nginx", help="folder with mime.types and modules-enabled/")
    p.add_argument("--nginx-source", default="system", help="where nginx came from (for the report)")
    p.add_argument("--renderer", choices=("auto", "ansible", "jinja2"), default="auto")
    p.add_argument("--compare-renderers", action="store_true", help="render with both when Ansible exists; "
                   "record whether they are identical")
    p.add_argument("--bench-extra", default="", help="more bench/run.py arguments for every bench (one string; "
                   "write --bench-extra='--mode stream' with '=')")
    p.add_argument("--no-plots", action="store_true", help="bench/run.py --no-plots")
    a = p.parse_args(argv)
    a.skip = {x.strip() for x in a.skip.split(",") if x.strip()}
    if a.out is None:
        a.out = str(ROOT / "bench_results" / ("multi_gpu-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    orch = Orchestrator(a)

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    rc = 1
    try:
        rc = orch.run()
    except SystemExit as e:
        if isinstance(e.code, str):
            orch.s["notes"].append(e.code)
            print(e.code, file=sys.stderr)
        else:
            orch.s["notes"].append(f"stopped by signal/exit {e.code}")
        rc = e.code if isinstance(e.code, int) else 2
    except Exception as e:  # noqa: BLE001 - keep the report
        import traceback
        orch.s["notes"].append(f"error: {type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        orch.cleanup()
        if getattr(orch, "supervisors", None) is not None and hasattr(orch, "n"):
            orch.analyse()
        orch.write_summary()
        orch.export_bundle()
        md = (orch.out / "summary.md").read_text()
        print("\n" + md, flush=True)
        ran = [p["name"] for p in orch.s["phases"] if p["status"] == "ran"]
        nr = [f"{p['name']} ({p['status']}: {p.get('reason', '')})" for p in orch.s["phases"] if p["status"] != "ran"]
        print(f"RAN: {', '.join(ran) or 'nothing'}")
        print(f"NOT RUN: {'; '.join(nr) or 'nothing'}")
        print(f"output: {orch.out}/summary.json, summary.md" + (f"; exported to {a.export}" if a.export else ""))
    return rc


if __name__ == "__main__":
    sys.exit(main())
