#!/usr/bin/env python3
"""Keep one command running, like a systemd unit with ``Restart=always``: when it exits (for whatever
reason, a ``kill -9`` included) wait ``--restart-sec`` and start it again, for ever, until this
supervisor gets SIGTERM/SIGINT (then the child gets SIGTERM, and SIGKILL after ``--stop-timeout``).

    python bench/multi_gpu/supervise.py --name gpu0 --events ev.jsonl --pidfile gpu0.pid \
        --log worker-gpu0.log --restart-sec 5 -- python -m cosyvoice_tts.server ...

Every start and exit is one JSON line in ``--events`` (``t``: Unix time, ``mono``: CLOCK_MONOTONIC, which
is shared by all processes of the machine, so other processes can compare it with their own
``time.monotonic()``)::

    {"event": "start", "n": 1, "pid": 1234, "t": ..., "mono": ...}
    {"event": "exit", "n": 1, "pid": 1234, "returncode": -9, "signal": "SIGKILL", "t": ..., "mono": ...}
    {"event": "stop", ...}                      (the supervisor itself was asked to stop)

``--pidfile`` always holds the pid of the current child (the process to kill to simulate a crash). The
child's stdout and stderr are appended to ``--log``, with a marker line at each start. The child gets SIGKILL
if the supervisor itself is killed (PR_SET_PDEATHSIG), so a killed run leaves no worker behind. Mirrors the
worker unit of ansible/roles/tts_gpu (Restart=always, RestartSec=tts_gpu_restart_sec, default 5).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time


try:
    import ctypes
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _PRCTL = None


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if this supervisor dies without stopping it (PR_SET_PDEATHSIG)."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))


def _event(path: str, **fields) -> None:
    fields.setdefault("t", time.time())
    fields.setdefault("mono", time.monotonic())
    line = json.dumps(fields, sort_keys=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True)
    p.add_argument("--events", required=True, help="JSON-lines file of start/exit events (appended)")
    p.add_argument("--pidfile", required=True, help="holds the pid of the current child")
    p.add_argument("--log", required=True, help="the child's output (appended)")
    p.add_argument("--restart-sec", type=float, default=5.0, help="pause before a restart (systemd RestartSec)")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="SIGTERM -> SIGKILL grace on stop")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("no command given (put it after --)")

    stopping = threading.Event()
    child: dict = {"proc": None}

    def on_stop(signum, _frame):
        stopping.set()
        proc = child["proc"]
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)

    n = 0
    while not stopping.is_set():
        n += 1
        with open(args.log, "ab") as log:
            log.write(f"\n=== supervise {args.name}: start #{n} at {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_die_with_parent)
        child["proc"] = proc
        tmp = args.pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{proc.pid}\n")
        os.replace(tmp, args.pidfile)
        _event(args.events, event="start", name=args.name, n=n, pid=proc.pid)
        if stopping.is_set():  # a stop that raced the start
            on_stop(signal.SIGTERM, None)
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stopping.is_set():
                    deadline = deadline or time.monotonic() + args.stop_timeout
                    if time.monotonic() > deadline:
                        proc.kill()
        sig = None
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = str(-rc)
        _event(args.events, event="exit", name=args.name, n=n, pid=proc.pid, returncode=rc, signal=sig)
        if stopping.is_set():
            break
        print(f"supervise {args.name}: child {proc.pid} exited ({sig or rc}); restart in {args.restart_sec:g} s",
              file=sys.stderr, flush=True)
        stopping.wait(args.restart_sec)
    _event(args.events, event="stop", name=args.name, n=n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
