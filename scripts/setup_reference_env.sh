#!/usr/bin/env bash
# A separate environment with the upstream CosyVoice2 code, used only by the parity tests (REF_PYTHON).
# cosyvoice-minicpmo 0.1.0 carries upstream's llm/flow/hifigan/utils/tokenizer byte-identical to upstream
# commit 6385656; the versions below are the ones known to run it on the CPU (see ../shared/facts.md).
set -euo pipefail
cd "$(dirname "$0")/.."
REF_ENV=${REF_ENV:-.venv-ref}
. scripts/venv_lib.sh
fresh_venv "$REF_ENV"
"$REF_ENV/bin/pip" install -q "torch==2.13.0" "transformers==4.51.3" hyperpyyaml onnxruntime inflect omegaconf \
    einops conformer diffusers librosa soundfile tqdm regex hydra-core lightning rich gdown matplotlib wget numba \
    tiktoken more-itertools onnx 2>&1 | quiet
"$REF_ENV/bin/pip" install -q --no-deps "cosyvoice-minicpmo==0.1.0" openai-whisper "torchaudio==2.11.0" modelscope 2>&1 | quiet
# No torchaudio build matches torch 2.13; upstream only uses its pure-Python kaldi fbank and Resample.
find "$REF_ENV"/lib/python3*/site-packages/torchaudio -name "*.so" -delete
"$REF_ENV/bin/python" -c "import cosyvoice.llm.llm, cosyvoice.flow.flow, cosyvoice.hifigan.generator, hyperpyyaml"
touch "$REF_ENV/.complete"
