#!/usr/bin/env bash
# Run the molecule scenario on a fresh Debian 12 machine, as root (CI entry point for the deployment):
#   bash molecule/run.sh                 # full `molecule test` (create, converge, idempotence, verify, destroy)
#   bash molecule/run.sh converge        # any other molecule subcommand
#   bash molecule/run.sh setup           # only the apt packages and .venv-deploy (e.g. before pytest, so
#                                        # tests/test_nginx_template.py finds ansible-playbook)
# Installs what it needs: Debian packages (debootstrap, systemd-nspawn, nftables, iproute2, ssh client,
# nginx for tests/test_nginx_template.py), the deploy venv (.venv-deploy, requirements-deploy.txt).
# The debootstrap base rootfs and the dependency wheels are cached in /var/cache/cosyvoice-testhosts.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[[ $(id -u) == 0 ]] || { echo "molecule/run.sh must run as root (network namespaces, nspawn)" >&2; exit 1; }
t0=$SECONDS

need=()
for pair in debootstrap:debootstrap systemd-nspawn:systemd-container nft:nftables ip:iproute2 ssh:openssh-client \
            ssh-keygen:openssh-client nginx:nginx; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  echo "[run.sh] apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # keep package scripts from starting services (nginx) on this machine
  policy_added=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy_added=1
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  ((policy_added)) && rm -f /usr/sbin/policy-rc.d
fi

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [[ ! -x .venv-deploy/bin/molecule ]] || ! cmp -s requirements-deploy.txt .venv-deploy/.requirements 2>/dev/null; then
  echo "[run.sh] deploy venv (.venv-deploy)" >&2
  "$PY" -m venv .venv-deploy
  .venv-deploy/bin/pip install -q --disable-pip-version-check -r requirements-deploy.txt 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv-deploy/bin/molecule --version >/dev/null 2>&1 || PATH=$ROOT/.venv-deploy/bin:$PATH .venv-deploy/bin/molecule --version >/dev/null
  cp requirements-deploy.txt .venv-deploy/.requirements
fi
export PATH=$ROOT/.venv-deploy/bin:$PATH   # molecule calls ansible-config & co. by name
export ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-0} PY_COLORS=${PY_COLORS:-0} NO_COLOR=${NO_COLOR:-1}

if [[ ${1:-} == setup ]]; then
  echo "[run.sh] setup done in $((SECONDS - t0)) s" >&2
  exit 0
fi

# whatever happens, leave no test host, netns, veth, nft table, mount or cgroup behind
cleanup() { scripts/testhosts/testhosts.sh down-all >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "[run.sh] setup took $((SECONDS - t0)) s" >&2
t1=$SECONDS
rc=0
if [[ $# -eq 0 ]]; then
  molecule test || rc=$?
else
  molecule "$@" || rc=$?
fi
echo "[run.sh] molecule ${1:-test}: rc=$rc in $((SECONDS - t1)) s" >&2
scripts/testhosts/testhosts.sh check-clean || rc=1
exit $rc
