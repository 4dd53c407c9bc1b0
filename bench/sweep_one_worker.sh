#!/usr/bin/env bash
# A concurrency sweep of one worker on this machine (docs/performance.md, "Bench"): builds the `full`
# random model if missing, starts `python -m cosyvoice_tts.server` on GPU 0, waits until it is ready, runs
# bench/run.py --sweep against it, saves the worker's log and /metrics beside the results, stops the worker.
#
#   bench/sweep_one_worker.sh OUT_DIR [more bench/run.py arguments]
#
# Environment (defaults): PYTHON (python3), MODEL_DIR (/tmp/cosyvoice2-full-seed0), DTYPE (bf16), PORT (8081),
# MAX_SESSIONS (64), SWEEP (1,2,4,8,16,32), DURATION (20, seconds per level), SLO_MS (300), WARMUP (3),
# READY_TIMEOUT (900 s), WORKER_ARGS (more worker arguments).
set -euo pipefail
OUT=${1:?usage: bench/sweep_one_worker.sh OUT_DIR [bench args]}
shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL_DIR=${MODEL_DIR:-/tmp/cosyvoice2-full-seed0}
PORT=${PORT:-8081}
mkdir -p "$OUT"

if [ ! -f "$MODEL_DIR/cosyvoice2.yaml" ]; then
    echo "building the full random model into $MODEL_DIR" >&2
    "$PY" -m cosyvoice_tts.tools.make_model "$MODEL_DIR" --size full --seed 0 >&2
fi

# shellcheck disable=SC2086  # WORKER_ARGS is a list of words
"$PY" -m cosyvoice_tts.server --model-dir "$MODEL_DIR" --gpu 0 --dtype "${DTYPE:-bf16}" --port "$PORT" \
    --max-sessions "${MAX_SESSIONS:-64}" --worker-id "gpu0" ${WORKER_ARGS:-} >"$OUT/worker.log" 2>&1 &
WORKER=$!
trap 'kill "$WORKER" 2>/dev/null || true; wait "$WORKER" 2>/dev/null || true' EXIT

"$PY" - "$PORT" "${READY_TIMEOUT:-900}" "$WORKER" <<'EOF'
import os, sys, time, urllib.request
port, timeout, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the worker exited before it was ready (see worker.log)")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(1)
sys.exit(f"the worker was not ready within {timeout:g} s (see worker.log)")
EOF

status=0
"$PY" bench/run.py --url "ws://127.0.0.1:$PORT/ws" --sweep "${SWEEP:-1,2,4,8,16,32}" \
    --duration "${DURATION:-20}" --slo-ms "${SLO_MS:-300}" --warmup "${WARMUP:-3}" --out "$OUT" "$@" || status=$?
"$PY" -c "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())" \
    "http://127.0.0.1:$PORT/metrics" >"$OUT/metrics.txt" || true
exit "$status"
