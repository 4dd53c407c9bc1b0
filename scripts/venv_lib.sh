# Sourced by the setup scripts (not run on its own).

# Drops pip's notice for each missing optional path of an editable install: noise in CI logs.
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# fresh_venv DIR: when DIR holds a finished environment (DIR/.complete), the calling script is done and exits;
# otherwise DIR is made anew (a half-built one from an interrupted run is thrown away) with $PYTHON.
fresh_venv() {
    if [ -f "$1/.complete" ]; then
        exit 0
    fi
    rm -rf "$1"
    "${PYTHON:-python3}" -m venv "$1"
}
