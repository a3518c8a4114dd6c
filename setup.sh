#!/usr/bin/env bash
# Installs what DeltaBox needs on a Debian 12 machine (run as root), builds it, installs `deltabox` to
# /usr/local/bin, builds the test images, and starts the daemon (unless --no-start).
# Needs a Rust toolchain (cargo >= 1.89) already on the machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

start=1
for arg in "$@"; do
    case "$arg" in
        --no-start) start=0 ;;
        *) echo "usage: ./setup.sh [--no-start]" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (DeltaBox creates namespaces, cgroups and mounts)" >&2
    exit 1
fi
if ! command -v cargo >/dev/null; then
    echo "setup.sh: cargo not found: install a Rust toolchain (>= 1.89) first" >&2
    exit 1
fi

# Debian packages: image building (mmdebstrap, busybox-static), the Python SDK and its tests (python3,
# venv, pip), the nat network's rules (nftables), tools the tests run on the host (util-linux, iproute2,
# procps, git, gcc, make, sqlite3, passwd for pjdfstest's users), and the baselines of the filesystem
# benchmarks (fuse-overlayfs, btrfs-progs).
packages=(mmdebstrap busybox-static python3 python3-venv python3-pip util-linux iproute2 procps curl
          ca-certificates git gcc make sqlite3 passwd fuse-overlayfs btrfs-progs nftables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

echo "==> building deltabox (release)"
cargo build --release -p deltabox
install -m 0755 target/release/deltabox /usr/local/bin/deltabox

echo "==> building the test images"
bash images/build.sh /var/cache/deltabox/images

if [ "$start" = 1 ]; then
    socket=${DELTABOX_SOCKET:-/run/deltabox/deltabox.sock}
    if curl -sf --unix-socket "$socket" http://deltabox/v1/health >/dev/null 2>&1; then
        echo "==> a deltabox daemon already serves $socket (restart it to use the new build)"
    else
        echo "==> starting the daemon (log: /var/log/deltabox.log)"
        nohup /usr/local/bin/deltabox serve >>/var/log/deltabox.log 2>&1 &
        for _ in $(seq 100); do
            [ -S "$socket" ] && break
            sleep 0.1
        done
        [ -S "$socket" ] || { echo "setup.sh: the daemon did not start; see /var/log/deltabox.log" >&2; exit 1; }
    fi
    echo "==> ready: try 'deltabox demo'"
fi
