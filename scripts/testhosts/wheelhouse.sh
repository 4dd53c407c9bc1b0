#!/usr/bin/env bash
# Build the wheelhouse the test hosts install from (tts_gpu_install_source=wheelhouse):
# the app wheel built fresh from this checkout + every dependency (torch: the CPU wheel 2.13.0 the
# controller has in /opt/wheels). Dependency wheels are cached in $CACHE/wheels across runs.
#   wheelhouse.sh PROJECT_DIR OUT_DIR
set -euo pipefail
project=$(cd "$1" && pwd)
out=$2
CACHE=${TESTHOSTS_CACHE:-/var/cache/cosyvoice-testhosts}
PY=${TESTHOSTS_PYTHON:-python3.11}
TORCH_SPEC=${TESTHOSTS_TORCH:-torch==2.13.0}
mkdir -p "$CACHE/wheels" "$out"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip wheel -q --no-deps -w "$tmp/app" "$project" 2>&1 | grep -v "^WARNING: Location" >&2 || true
app=$(ls "$tmp"/app/*.whl) || { echo "app wheel build failed" >&2; exit 1; }
# the app's dependencies (+ the CPU torch wheel) into the cache; skipped while its requirements are unchanged
reqs=$("$PY" - "$app" "$TORCH_SPEC" <<'PY'
import sys, zipfile, hashlib
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
req = sorted(l for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:") and "extra ==" not in l)
print(hashlib.sha256(("\n".join(req) + sys.argv[2]).encode()).hexdigest())
PY
)
if [[ $(cat "$CACHE/wheels/.requires.sha256" 2>/dev/null) != "$reqs" ]]; then
  "$PY" -m pip wheel -q -w "$CACHE/wheels" --find-links "$CACHE/wheels" --find-links /opt/wheels \
    "$app" "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  check=1
else
  check=0
fi
# OUT = exactly: app wheel + cached dependency wheels (hard links, no copies)
find "$out" -maxdepth 1 -name '*.whl' -delete
appname=$(basename "$app" | cut -d- -f1)
for w in "$CACHE"/wheels/*.whl; do
  case $(basename "$w") in "$appname"-*) continue ;; esac
  ln -f "$w" "$out/" 2>/dev/null || cp -f "$w" "$out/"
done
cp -f "$app" "$out/"
# the target venv must resolve every requirement from OUT alone
[[ $check == 1 ]] && "$PY" -m pip install -q --dry-run --ignore-installed --no-index --find-links "$out" \
  "$(ls "$out/$appname"-*.whl)" >/dev/null 2>&1 \
  || { [[ $check == 1 ]] && { echo "wheelhouse $out is incomplete" >&2; exit 1; }; }
[[ $check == 1 ]] && echo "$reqs" >"$CACHE/wheels/.requires.sha256"
echo "$out: $(ls "$out" | wc -l) wheels, $(du -sh "$out" | cut -f1)" >&2
