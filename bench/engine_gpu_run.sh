#!/usr/bin/env bash
# One device call's engine benchmark (docs/performance.md, "Engine on one GPU"): the full random model, the
# batched engine at several concurrencies with vocoder stage timings and a batch-invariance check (one request
# alone vs among 31 others) and (RERUN_LEVELS=8,32) levels of the same engine with the flow re-running each prefix,
# then the per-request path at 8 streams (SKIP_UNBATCHED=1: not). LM_SMS=N: the engine's --lm-sms (SMs kept for
# the LM); FLOW_MEMORY_GIB: its --flow-memory-gib (0: no incremental flow pool, and none of its graphs to capture);
# SINGLE_PREFILL_LEVELS=32,48: those levels again with prefills one request at a time. Levels run with staggered
# arrivals (bench_engine's --arrivals; ARRIVALS=burst: all users at once); BURST_LEVELS=32: those levels again with
# all users starting at once; DEFAULT_SWITCH_LEVELS=32: again with Python's default GIL switch interval;
# SCHEDULING_LEVELS=32:none,32:fit: again with those vocoder policies (bench_engine --scheduling-levels).
# PAGED_FROM_FRAMES=0: streams keep their flow memory from the first chunk (--paged-from-frames);
# PAGED_GRAPH_PAST_PAGES=4: incremental flow graphs only up to that past (--paged-graph-past-pages: less capture);
# FLOW_LEVELS=32:paged,32:rerun: again with the flow paged or re-running every prefix, in that order.
# VOCODER=overlap: the engine's vocoder placement (--vocoder; engine/vocoder_worker.py); VOCODER_LEVELS=32:thread,
# 32:overlap: again with the vocoder on its own thread or launched from the LM loop, in that order; a level may set
# SchedulerConfig fields and replays_apart=0 (the loop launches the sampler's replays) or text_worker=0 (texts
# normalised by the submitting threads), e.g. 32:overlap:first_chunks_apart=0. PROFILE_LEVEL=32: that level again
# under torch.profiler, the loop's host time by span in the report (bench_engine --profile-level).
#   bench/engine_gpu_run.sh OUT_DIR [CONCURRENCY] [DURATION]
# Needs python3 with torch (CUDA); unpacks carry/bench_site/site.tar.xz for the packages such an image lacks.
set -euo pipefail
out=${1:?usage: bench/engine_gpu_run.sh OUT_DIR [CONCURRENCY] [DURATION]}
levels=${2:-1,8,32,48}
duration=${3:-12}
model=${MODEL_DIR:-/tmp/cosyvoice2-full-seed0}
mkdir -p "$out"
export PYTHONPATH="$PWD/app${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! python3 -c 'import wetext, soxr' 2>/dev/null && [ -f carry/bench_site/site.tar.xz ]; then
    mkdir -p /tmp/bench_site && tar -xJf carry/bench_site/site.tar.xz -C /tmp/bench_site
    export PYTHONPATH="$PYTHONPATH:/tmp/bench_site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
git rev-parse --short HEAD 2>/dev/null | tee "$out/commit.txt" || true
[ -f "$model/cosyvoice2.yaml" ] || python3 -m cosyvoice_tts.tools.make_model "$model" --size full --seed 0 >/dev/null
# The batch-invariance check runs one request alone and among INVARIANCE_OTHERS (31) others: room for all.
others=${INVARIANCE_OTHERS:-31}
sessions=$(printf '%s\n' ${levels//,/ } $((others + 1)) | sort -n | tail -1)
python3 -m cosyvoice_tts.tools.bench_engine --model-dir "$model" --dtype bf16 --concurrency "$levels" \
    --duration "$duration" --stage-times "${STAGE_TIMES:-1x28,1x78,16x28,16x253,16x253L}" \
    --max-sessions "$sessions" --check-batch-invariance "$others" --rerun-levels "${RERUN_LEVELS:-}" \
    ${LM_SMS:+--lm-sms "$LM_SMS"} ${FLOW_MEMORY_GIB:+--flow-memory-gib "$FLOW_MEMORY_GIB"} \
    ${SINGLE_PREFILL_LEVELS:+--single-prefill-levels "$SINGLE_PREFILL_LEVELS"} \
    ${ARRIVALS:+--arrivals "$ARRIVALS"} ${BURST_LEVELS:+--burst-levels "$BURST_LEVELS"} \
    ${DEFAULT_SWITCH_LEVELS:+--default-switch-levels "$DEFAULT_SWITCH_LEVELS"} \
    ${SCHEDULING_LEVELS:+--scheduling-levels "$SCHEDULING_LEVELS"} \
    ${PAGED_FROM_FRAMES:+--paged-from-frames "$PAGED_FROM_FRAMES"} \
    ${PAGED_GRAPH_PAST_PAGES:+--paged-graph-past-pages "$PAGED_GRAPH_PAST_PAGES"} \
    ${FLOW_LEVELS:+--flow-levels "$FLOW_LEVELS"} \
    ${VOCODER:+--vocoder "$VOCODER"} ${VOCODER_LEVELS:+--vocoder-levels "$VOCODER_LEVELS"} \
    ${PROFILE_LEVEL:+--profile-level "$PROFILE_LEVEL"} \
    --out "$out/batched.json" 2>&1 | grep -v -e Warning -e warn | tee "$out/batched.log"
if [ -z "${SKIP_UNBATCHED:-}" ]; then
    python3 -m cosyvoice_tts.tools.bench_engine --model-dir "$model" --dtype bf16 --concurrency 8 \
        --duration 10 --unbatched --out "$out/unbatched.json" 2>&1 | grep -v -e Warning -e warn | tee "$out/unbatched.log"
fi
