#!/usr/bin/env bash
# The multi-GPU bench (docs/performance.md, "Multi-GPU"): one worker per GPU, each under a restart-always
# supervisor, behind nginx configured by the nginx_lb role; a one-worker sweep and an N-worker sweep through
# nginx (per-GPU balance, aggregate audio-s/s against N x one worker, p95 first chunk); then one worker is
# killed with SIGKILL mid-benchmark (failed requests, time until the supervisor has it back on /readyz).
# Sized for one 10-minute call on a machine with no network (--budget, default 540 s from the start of
# this script: a phase that does not fit is not run, and the summary says so).
#
#   bench/multi_gpu/run.sh [--out DIR] [--export DIR] [--gpus 0,1 | --cpu N] [--budget S] [orchestrate options]
#   bench/multi_gpu/run.sh --help        (every option: bench/multi_gpu/orchestrate.py)
#
# This script prepares what the orchestrator (bench/multi_gpu/orchestrate.py) needs:
# - Python: $PYTHON (default python3). Adds app/ to PYTHONPATH when cosyvoice_tts is not installed, and
#   unpacks carry/bench_site/site.tar.xz (the bench and worker packages the GPU image lacks: websockets,
#   wetext, soxr, ...) into a temporary folder when they are missing, if that file is there.
# - nginx: the Debian packages in $NGINX_DEBS (default carry/nginx-debs, from bench/multi_gpu/fetch_nginx.sh),
#   unpacked with `dpkg -x` into a temporary folder (never /); nginx runs from there with LD_LIBRARY_PATH
#   pointing at the unpacked libraries (for nginx only). Without .deb files it uses an installed nginx, if
#   any (the summary records which).
set -euo pipefail
T0=$(date +%s.%N)
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PYTHON:-python3}
NGINX_DEBS=${NGINX_DEBS:-carry/nginx-debs}
SITE_TAR=${SITE_TAR:-carry/bench_site/site.tar.xz}

for arg in "$@"; do
    if [ "$arg" = -h ] || [ "$arg" = --help ]; then exec "$PY" bench/multi_gpu/orchestrate.py --help; fi
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/multi_gpu.XXXXXX")
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

say() { echo "[run.sh] $*" >&2; }

# --- Python environment -----------------------------------------------------------------------------------
if ! "$PY" -c 'import cosyvoice_tts' 2>/dev/null; then
    export PYTHONPATH="$ROOT/app${PYTHONPATH:+:$PYTHONPATH}"
    say "cosyvoice_tts not installed: PYTHONPATH += app/"
fi
if ! "$PY" -c 'import websockets, wetext, soxr, prometheus_client' 2>/dev/null; then
    if [ -f "$SITE_TAR" ]; then
        mkdir -p "$WORK/site"
        tar -xJf "$SITE_TAR" -C "$WORK/site"
        export PYTHONPATH="$WORK/site:$PYTHONPATH"
        say "unpacked $SITE_TAR into $WORK/site (PYTHONPATH)"
    else
        say "warning: websockets/wetext/soxr/prometheus_client missing and no $SITE_TAR"
    fi
fi

# --- nginx from Debian's package files ---------------------------------------------------------------------
NGX_ARGS=()
shopt -s nullglob
debs=("$NGINX_DEBS"/*.deb)
if [ ${#debs[@]} -gt 0 ]; then
    NROOT="$WORK/nginx-root"
    mkdir -p "$NROOT"
    for d in "${debs[@]}"; do
        if command -v dpkg >/dev/null; then
            dpkg -x "$d" "$NROOT"
        else  # no dpkg: a .deb is an ar archive holding data.tar.*
            "$PY" - "$d" "$NROOT" <<'EOF'
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
assert data[:8] == b"!<arch>\n", "not a .deb"
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].decode().strip().rstrip("/"), int(data[pos + 48:pos + 58])
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
        tarfile.open(fileobj=io.BytesIO(body)).extractall(sys.argv[2], **kw)  # absolute symlinks inside
    pos += 60 + size + (size & 1)
EOF
        fi
    done
    NLIB="$NROOT/usr/lib/x86_64-linux-gnu:$NROOT/lib/x86_64-linux-gnu"
    NGX_ARGS=(--nginx-bin "$NROOT/usr/sbin/nginx" --nginx-lib "$NLIB" --nginx-etc "$NROOT/etc/nginx"
              --nginx-source "debs: $(cd "$NGINX_DEBS" && ls ./*.deb | sed 's#^\./##' | tr '\n' ' ')")
    say "nginx unpacked from ${#debs[@]} .deb files in $NGINX_DEBS into $NROOT"
    LD_LIBRARY_PATH="$NLIB" "$NROOT/usr/sbin/nginx" -v
elif command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then
    NBIN=$(command -v nginx || echo /usr/sbin/nginx)
    NGX_ARGS=(--nginx-bin "$NBIN" --nginx-etc /etc/nginx --nginx-source "installed: $NBIN")
    say "no .deb files in $NGINX_DEBS: using the installed $NBIN"
else
    say "no nginx: run bench/multi_gpu/fetch_nginx.sh (on a machine with apt) and carry $NGINX_DEBS"
    exit 3
fi

# --- the run -----------------------------------------------------------------------------------------------
export PYTHONUNBUFFERED=1
set +e
"$PY" bench/multi_gpu/orchestrate.py --t0 "$T0" --python "$(command -v "$PY")" "${NGX_ARGS[@]}" "$@"
rc=$?
set -e
exit $rc
