#!/usr/bin/env bash
# Download Debian's nginx package files (nginx, nginx-common) and the libraries the nginx binary links
# (its direct lib* Depends, except libc6: the machine's own C library is used) with `apt-get download`,
# into DEST (default carry/nginx-debs, ignored by git: /carry/ in .gitignore). Nothing is installed:
# bench/multi_gpu/run.sh unpacks them with `dpkg -x` into a temporary folder and runs nginx from there,
# so a machine without nginx (and without a network) can run the multi-GPU bench when DEST is carried.
#
#   bench/multi_gpu/fetch_nginx.sh [DEST]
#
# Environment: MAX_KB (default 16384): fail if the .deb files take more (they travel with the device
# call, whose working tree is limited to 64 MiB). APT_UPDATE=1: run `apt-get update` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-carry/nginx-debs}
MAX_KB=${MAX_KB:-16384}
command -v apt-get >/dev/null || { echo "fetch_nginx: apt-get not found (Debian/Ubuntu only)" >&2; exit 3; }
if [ "${APT_UPDATE:-0}" = 1 ]; then apt-get update -qq >&2; fi

pkgs=(nginx nginx-common)
# direct dependencies of nginx that are libraries (libcrypt1 libpcre2-8-0 libssl3 zlib1g on bookworm)
while read -r dep; do
    case "$dep" in
        libc6|libc6:*) ;;
        lib*|zlib1g) pkgs+=("$dep") ;;
    esac
done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
            --no-enhances nginx 2>/dev/null | awk '$1 == "Depends:" && $2 !~ /^</ {print $2}' | sort -u)

mkdir -p "$DEST"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"  # apt's _apt user writes here
(cd "$tmp" && apt-get download "${pkgs[@]}" >&2)
rm -f "$DEST"/*.deb
mv "$tmp"/*.deb "$DEST"/
kb=$(du -sk "$DEST" | cut -f1)
ls -l "$DEST" >&2
echo "fetch_nginx: ${#pkgs[@]} packages (${pkgs[*]}), ${kb} KiB in $DEST" >&2
if [ "$kb" -gt "$MAX_KB" ]; then
    echo "fetch_nginx: $DEST is ${kb} KiB, over MAX_KB=$MAX_KB" >&2
    exit 4
fi
