#!/usr/bin/env bash
# Counts the FUSE requests a command sends to one FUSE mount, per opcode (root; uses the kernel's
# fuse_request_send tracepoint in a private tracefs instance, so other tracing is not disturbed).
#   bench/deltafs/fuse_ops.sh MOUNTPOINT COMMAND [ARGS...]
# The command runs with MOUNTPOINT as its working directory; the table goes to stderr.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MOUNTPOINT COMMAND [ARGS...]" >&2; exit 2; }
mnt=$(realpath "$1"); shift
tracing=/sys/kernel/tracing
[ -d "$tracing/events" ] || mount -t tracefs nodev "$tracing"
[ -d "$tracing/events/fuse/fuse_request_send" ] || { echo "kernel has no fuse tracepoints" >&2; exit 1; }
# The tracepoint reports the connection as the kernel's dev_t (major << 20 | minor).
IFS=: read -r major minor < <(mountpoint -d "$mnt")
inst="$tracing/instances/fuse_ops.$$"
mkdir "$inst"
trap 'echo 0 > "$inst/events/fuse/fuse_request_send/enable"; rmdir "$inst"' EXIT
echo 65536 > "$inst/buffer_size_kb"
echo "connection == $(( (major << 20) | minor ))" > "$inst/events/fuse/fuse_request_send/filter"
echo 1 > "$inst/events/fuse/fuse_request_send/enable"
status=0
(cd "$mnt" && "$@") || status=$?
echo 0 > "$inst/events/fuse/fuse_request_send/enable"
grep -o 'opcode [0-9]* ([A-Z_0-9]*)' "$inst/trace" | awk '{print $3}' | tr -d '()' | sort | uniq -c | sort -rn |
    awk '{total += $1; printf "%8d %s\n", $1, $2} END {printf "%8d total\n", total}' >&2
grep -q 'LOST' "$inst/trace" && echo "warning: trace buffer overflowed, counts are low" >&2
exit $status
