#!/usr/bin/env bash
# Quick start on the embedded default (a tiny random model on the CPU): set up, start one worker, synthesise
# one sentence with the client into demo.wav, stop the worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PORT=${PORT:-9000}
.venv/bin/python -m cosyvoice_tts.server --gpu 0 --port "$PORT" --backend native &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    if .venv/bin/python - "$PORT" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1)
PY
    sleep 1
done
.venv/bin/python -m cosyvoice_tts.client --url "ws://127.0.0.1:$PORT/ws" \
    --text "你好，欢迎使用语音合成服务。Hello, this is a streaming speech demo." --out demo.wav
echo "wrote demo.wav (random weights: it is noise with the length and timing of speech)"
