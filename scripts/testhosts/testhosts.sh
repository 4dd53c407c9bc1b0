#!/usr/bin/env bash
# Real Debian 12 systemd test hosts without Docker: a cached debootstrap base, one overlay per host,
# systemd-nspawn --boot inside its own network namespace, reachable over SSH from the controller.
#
#   testhosts.sh base                       build (once) the cached base rootfs
#   testhosts.sh up NAME IP [NAME IP ...]   create + boot hosts (IP in $TESTHOSTS_SUBNET.0/24)
#   testhosts.sh down NAME [NAME ...]       power off + remove hosts
#   testhosts.sh down-all                   remove every host of this tool, the bridge and the nft table
#   testhosts.sh list                       hosts that are up
#   testhosts.sh check-clean                non-zero if anything of ours is left behind
#   testhosts.sh key                        print the path of the SSH private key for the hosts
#
# Needs root, debootstrap, systemd-container (systemd-nspawn), nftables, iproute2, openssh-client.
# Environment:
#   TESTHOSTS_CACHE   cached base rootfs + SSH key   (default /var/cache/cosyvoice-testhosts)
#   TESTHOSTS_STATE   per-host overlay layers         (default /var/lib/cosyvoice-testhosts)
#   TESTHOSTS_SUBNET  first three octets of the /24   (default 10.213.77)
#   TESTHOSTS_MIRROR  Debian mirror                   (default http://deb.debian.org/debian)
set -euo pipefail

CACHE=${TESTHOSTS_CACHE:-/var/cache/cosyvoice-testhosts}
STATE=${TESTHOSTS_STATE:-/var/lib/cosyvoice-testhosts}
SUBNET=${TESTHOSTS_SUBNET:-10.213.77}
MIRROR=${TESTHOSTS_MIRROR:-http://deb.debian.org/debian}
BASE="$CACHE/base-bookworm"
BASE_STAMP="$BASE/.cosyvoice-testhosts-base-v1"
KEY="$CACHE/id_ed25519"
BRIDGE=cvtbr0
NFT_TABLE=cosyvoice_testhosts
CG_NAME=cosyvoice-testhosts
BOOT_TIMEOUT=${TESTHOSTS_BOOT_TIMEOUT:-60}

log() { printf '[testhosts] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() { [[ $(id -u) == 0 ]] || die "must run as root"; }

valid_name() { [[ $1 =~ ^[a-z0-9][a-z0-9-]{0,30}$ ]] || die "bad host name '$1'"; }

# ---------------------------------------------------------------------------------------------
cmd_base() {
  need_root
  if [[ -f $BASE_STAMP ]]; then log "base rootfs cached at $BASE"; return 0; fi
  command -v debootstrap >/dev/null || die "debootstrap missing (apt-get install debootstrap)"
  mkdir -p "$CACHE"
  local tmp="$CACHE/base-bookworm.tmp.$$"
  rm -rf "$tmp"
  log "debootstrap bookworm into $tmp (about a minute)"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,python3,iproute2,openssh-server,ca-certificates,procps \
    bookworm "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; rm -rf "$tmp"; die "debootstrap failed"; }
  # Controller CA certificates (TLS-intercepting egress) so HTTPS works from inside the hosts.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$tmp/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$tmp/usr/local/share/ca-certificates/"
    chroot "$tmp" update-ca-certificates >/dev/null 2>&1 || log "update-ca-certificates failed (ignored)"
  fi
  # What must be unique per host is created per host.
  rm -f "$tmp"/etc/ssh/ssh_host_*
  : >"$tmp/etc/machine-id"
  rm -f "$tmp/etc/hostname" "$tmp/var/lib/dbus/machine-id"
  # No background apt runs that would take the dpkg lock during a converge.
  for t in apt-daily.timer apt-daily-upgrade.timer; do
    ln -sf /dev/null "$tmp/etc/systemd/system/$t"
  done
  # Networking: host0 is configured by us from outside (ip netns); nothing inside must fight it.
  printf 'nameserver 1.1.1.1\n' >"$tmp/etc/resolv.conf"
  # Root logs in with the test key only.
  mkdir -p "$tmp/root/.ssh"; chmod 700 "$tmp/root/.ssh"
  printf 'PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n' \
    >"$tmp/etc/ssh/sshd_config.d/testhosts.conf"
  apt_clean_chroot "$tmp"
  touch "$tmp/.cosyvoice-testhosts-base-v1"
  rm -rf "$BASE"; mv "$tmp" "$BASE"
  log "base rootfs ready: $BASE ($(du -sh "$BASE" | cut -f1))"
}

apt_clean_chroot() { rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*_Packages 2>/dev/null || true; }

ensure_key() {
  mkdir -p "$CACHE"
  [[ -f $KEY ]] || ssh-keygen -q -t ed25519 -N '' -C cosyvoice-testhosts -f "$KEY"
}

# ---------------------------------------------------------------------------------------------
ensure_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  fi
  local fwd; fwd=$(cat /proc/sys/net/ipv4/ip_forward)
  if [[ ! -f $STATE/.ip_forward_before ]]; then echo "$fwd" >"$STATE/.ip_forward_before"; fi
  echo 1 >/proc/sys/net/ipv4/ip_forward
  if ! nft list table ip "$NFT_TABLE" >/dev/null 2>&1; then
    nft -f - <<EOF
table ip $NFT_TABLE {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr $SUBNET.0/24 ip daddr != $SUBNET.0/24 masquerade
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "$BRIDGE" accept
    oifname "$BRIDGE" ct state established,related accept
  }
}
EOF
  fi
}

teardown_network() {
  nft delete table ip "$NFT_TABLE" 2>/dev/null || true
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -f $STATE/.ip_forward_before ]]; then
    cat "$STATE/.ip_forward_before" >/proc/sys/net/ipv4/ip_forward || true
    rm -f "$STATE/.ip_forward_before"
  fi
}

host_dir() { echo "$STATE/hosts/$1"; }

cgroup_dirs() {
  # hybrid host: the named v1 "systemd" hierarchy and the v2 "unified" mount; pure v2: /sys/fs/cgroup
  if [[ -d /sys/fs/cgroup/systemd || -d /sys/fs/cgroup/unified ]]; then
    [[ -d /sys/fs/cgroup/systemd ]] && echo "/sys/fs/cgroup/systemd/$CG_NAME/$1"
    [[ -d /sys/fs/cgroup/unified ]] && echo "/sys/fs/cgroup/unified/$CG_NAME/$1"
  elif [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then
    echo "/sys/fs/cgroup/$CG_NAME/$1"
  fi
  return 0
}

up_one() {
  local name=$1 ip=$2 idx=$3
  valid_name "$name"
  [[ $ip =~ ^${SUBNET//./\\.}\.([0-9]+)$ ]] || die "$name: address $ip is not in $SUBNET.0/24"
  local dir; dir=$(host_dir "$name")
  if [[ -f $dir/pid ]] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    log "$name already up"; return 0
  fi
  local ns="cvt-$name" root="$dir/root"
  mkdir -p "$dir/upper" "$dir/work" "$root"
  mountpoint -q "$root" || mount -t overlay overlay \
    -o "lowerdir=$BASE,upperdir=$dir/upper,workdir=$dir/work" "$root"
  echo "$name" >"$root/etc/hostname"
  printf '127.0.0.1 localhost\n127.0.1.1 %s\n::1 localhost ip6-localhost ip6-loopback\n' "$name" >"$root/etc/hosts"
  [[ -s $root/etc/machine-id ]] || (tr -d '-' </proc/sys/kernel/random/uuid >"$root/etc/machine-id")
  ls "$root"/etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A -f "$root" >/dev/null
  install -d -m 700 "$root/root/.ssh"
  install -m 600 "$KEY.pub" "$root/root/.ssh/authorized_keys"

  # network namespace + veth: host0 inside, vh-<idx> on the bridge
  ip netns list | grep -qw "^$ns" || ip netns add "$ns"
  local veth="cvtv$idx"
  if ! ip link show "$veth" >/dev/null 2>&1; then
    ip link add "$veth" type veth peer name host0 netns "$ns"
  fi
  ip link set "$veth" master "$BRIDGE" up
  ip -n "$ns" link set lo up
  ip -n "$ns" addr replace "$ip/24" dev host0
  ip -n "$ns" link set host0 up
  ip -n "$ns" route replace default via "$SUBNET.1"
  echo "$ns" >"$dir/netns"; echo "$veth" >"$dir/veth"; echo "$ip" >"$dir/ip"

  # boot, in a cgroup of its own
  local cgs; cgs=$(cgroup_dirs "$name")
  local c; for c in $cgs; do mkdir -p "$c"; done
  echo "$cgs" >"$dir/cgroups"
  CGS="$cgs" setsid bash -c '
      for c in $CGS; do echo $$ > "$c/cgroup.procs"; done
      exec systemd-nspawn -D "$0" -M "$1" --boot --register=no --keep-unit \
        --network-namespace-path="/run/netns/$2" --resolv-conf=copy-host \
        --link-journal=no --console=read-only' \
    "$root" "$name" "$ns" >"$dir/console.log" 2>&1 </dev/null &
  echo $! >"$dir/pid"
}

wait_ssh() {
  local name=$1 ip=$2 t0=$SECONDS
  while (( SECONDS - t0 < BOOT_TIMEOUT )); do
    if ssh -q -i "$KEY" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o ConnectTimeout=2 "root@$ip" 'systemctl is-system-running --wait >/dev/null 2>&1; true' 2>/dev/null; then
      log "$name ($ip) up after $((SECONDS - t0)) s"; return 0
    fi
    local dir; dir=$(host_dir "$name")
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then tail -30 "$dir/console.log" >&2; die "$name: nspawn exited"; fi
    sleep 0.5
  done
  tail -30 "$(host_dir "$name")/console.log" >&2
  die "$name: no SSH after ${BOOT_TIMEOUT}s"
}

cmd_up() {
  need_root
  (( $# >= 2 && $# % 2 == 0 )) || die "usage: up NAME IP [NAME IP ...]"
  cmd_base; ensure_key
  mkdir -p "$STATE/hosts"
  ensure_network
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i += 2)); do
    local ip=${args[i+1]}
    up_one "${args[i]}" "$ip" "${ip##*.}"
  done
  for ((i = 0; i < ${#args[@]}; i += 2)); do wait_ssh "${args[i]}" "${args[i+1]}"; done
}

down_one() {
  local name=$1 dir; dir=$(host_dir "$name")
  [[ -d $dir ]] || return 0
  if [[ -f $dir/pid ]]; then
    local pid; pid=$(cat "$dir/pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true           # orderly poweroff of the container
      local t0=$SECONDS
      while kill -0 "$pid" 2>/dev/null && (( SECONDS - t0 < 30 )); do sleep 0.3; done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name: still running after 30 s, killing"
        kill -KILL "$pid" 2>/dev/null || true; sleep 1
      fi
    fi
  fi
  # anything left in the host's cgroups (should be nothing) is killed, then the cgroups removed
  local c
  for c in $(cat "$dir/cgroups" 2>/dev/null); do
    [[ -d $c ]] || continue
    local p; for p in $(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
  done
  sleep 0.2
  for c in $(cat "$dir/cgroups" 2>/dev/null); do
    [[ -d $c ]] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  # mounts below the root first (nspawn normally cleans its own), then the overlay
  local m
  for m in $(awk -v r="$dir/root" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
  [[ -f $dir/veth ]] && ip link del "$(cat "$dir/veth")" 2>/dev/null || true
  [[ -f $dir/netns ]] && ip netns del "$(cat "$dir/netns")" 2>/dev/null || true
  rm -rf "$dir"
  log "$name removed"
}

cmd_down() { need_root; local n; for n in "$@"; do down_one "$n"; done; maybe_teardown; }

maybe_teardown() {
  if [[ ! -d $STATE/hosts ]] || [[ -z $(ls -A "$STATE/hosts" 2>/dev/null) ]]; then
    teardown_network
    rmdir "$STATE/hosts" 2>/dev/null || true
    local c; for c in /sys/fs/cgroup/systemd/$CG_NAME /sys/fs/cgroup/unified/$CG_NAME /sys/fs/cgroup/$CG_NAME; do
      [[ -d $c ]] && rmdir "$c" 2>/dev/null || true
    done
  fi
}

cmd_down_all() {
  need_root
  local d
  if [[ -d $STATE/hosts ]]; then for d in "$STATE"/hosts/*/; do [[ -d $d ]] && down_one "$(basename "$d")"; done; fi
  maybe_teardown
}

cmd_list() { [[ -d $STATE/hosts ]] && ls "$STATE/hosts" || true; }

cmd_check_clean() {
  local bad=0
  if ip netns list 2>/dev/null | grep -q '^cvt-'; then log "netns left: $(ip netns list | grep '^cvt-' | tr '\n' ' ')"; bad=1; fi
  if ip -br link 2>/dev/null | grep -qE "^(cvtv[0-9]+|$BRIDGE)\b"; then log "links left"; bad=1; fi
  if nft list table ip "$NFT_TABLE" >/dev/null 2>&1; then log "nft table left"; bad=1; fi
  if grep -q " $STATE/" /proc/self/mounts; then log "mounts left"; bad=1; fi
  local c; for c in /sys/fs/cgroup/systemd/$CG_NAME /sys/fs/cgroup/unified/$CG_NAME /sys/fs/cgroup/$CG_NAME; do
    [[ -d $c ]] && { log "cgroup left: $c"; bad=1; }
  done
  if pgrep -f "systemd-nspawn .*$STATE/hosts/" >/dev/null; then log "nspawn processes left"; bad=1; fi
  (( bad == 0 )) && log "clean"
  return $bad
}

case ${1:-} in
  base) cmd_base ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  down-all) cmd_down_all ;;
  list) cmd_list ;;
  check-clean) cmd_check_clean ;;
  key) ensure_key; echo "$KEY" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
