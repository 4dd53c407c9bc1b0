#!/usr/bin/env bash
# Everything the project tests: unit and end-to-end tests (with upstream parity when the reference environment
# is built), then the Ansible roles on real systemd test hosts (molecule, needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
if [ "${SKIP_REFERENCE:-0}" != 1 ]; then
    bash scripts/setup_reference_env.sh
    export REF_PYTHON=$PWD/.venv-ref/bin/python
fi
if [ "${SKIP_VLLM:-0}" != 1 ]; then
    bash scripts/setup_vllm_env.sh  # vLLM's CPU build, for the vllm backend's end-to-end tests
    export VLLM_PYTHON=$PWD/.venv-vllm/bin/python
fi
if [ "${SKIP_MOLECULE:-0}" != 1 ]; then
    bash molecule/run.sh setup  # deploy tools first: the nginx template test renders with ansible-playbook
fi
.venv/bin/pytest -q -p no:cacheprovider "$@"
if [ "${SKIP_MOLECULE:-0}" != 1 ]; then
    bash molecule/run.sh
fi
