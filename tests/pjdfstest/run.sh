#!/usr/bin/env bash
# POSIX conformance of DeltaFS: runs pjdfstest (Rust port) on kernel overlayfs and on a DeltaFS mount
# in the same run and fails if DeltaFS fails a test that overlayfs passes, or fails a test that is
# not listed (with its reason) in known-failures.txt. Needs root, /dev/fuse, overlayfs.
# Env: PJDFSTEST (binary; default: installed with `cargo install pjdfstest` into target dir),
#      CARGO_TARGET_DIR, PJDFSTEST_FILTER (test name patterns, default all).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
pj_version=0.2.2

if [ "$(id -u)" != 0 ]; then echo "pjdfstest: SKIP (needs root)"; exit 0; fi
if [ ! -e /dev/fuse ]; then echo "pjdfstest: SKIP (/dev/fuse missing)"; exit 0; fi

pjdfstest=${PJDFSTEST:-$target/pjdfstest/bin/pjdfstest}
if [ ! -x "$pjdfstest" ]; then
  cargo install --quiet pjdfstest --version "$pj_version" --locked --root "$target/pjdfstest"
fi
cargo build --quiet --release -p deltafs --bin deltafs
deltafs=$target/release/deltafs

# pjdfstest switches to these users (see pjdfstest.toml).
id tests >/dev/null 2>&1 || { groupadd -f tests; useradd -g tests -M -s /usr/sbin/nologin tests; }

work=$(mktemp -d /tmp/deltafs-pjdfstest.XXXXXX)
chmod 755 "$work" # the suite switches to unprivileged users
dfs_pid=
cleanup() {
  cd /
  umount "$work/ovl" 2>/dev/null || true
  if [ -n "$dfs_pid" ]; then kill "$dfs_pid" 2>/dev/null || true; wait "$dfs_pid" 2>/dev/null || true; fi
  umount -l "$work/dfs" 2>/dev/null || true
  if [ -n "${PJDFSTEST_KEEP:-}" ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
mkdir -p "$work"/{lower,upper,ovlwork,ovl,store,dfs,base}

run_suite() { # name dir
  (cd "$2" && "$pjdfstest" -c "$here/pjdfstest.toml" -p "$2" ${PJDFSTEST_FILTER:-} >"$work/$1.log" 2>&1) || true
  grep -E '^[a-z_:0-9]+ +(ok|FAILED)$' "$work/$1.log" | awk '{print $1, $2}' | sort >"$work/$1.results"
  echo "$1: $(grep -c ' ok$' "$work/$1.results") passed, $(grep -c ' FAILED$' "$work/$1.results") failed"
}

mount -t overlay overlay -o "lowerdir=$work/lower,upperdir=$work/upper,workdir=$work/ovlwork" "$work/ovl"
start=$(date +%s)
run_suite overlayfs "$work/ovl"
echo "overlayfs run: $(( $(date +%s) - start )) s"

# Both ways DeltaFS can see opens: with the processes listed (as sandboxes mount it: opens need no
# FUSE request) and tracking every open.
echo $$ >"$work/procs"
for mode in deltafs deltafs-tracking; do
  opts=(); [ $mode = deltafs ] && opts=(--processes "$work/procs")
  rm -rf "$work/store"
  "$deltafs" --store "$work/store" mount "${opts[@]}" --layer "$work/base" "$work/dfs" >"$work/$mode-mount.log" 2>&1 &
  dfs_pid=$!
  for _ in $(seq 100); do findmnt "$work/dfs" >/dev/null && break; sleep 0.1; done
  findmnt "$work/dfs" >/dev/null || { cat "$work/$mode-mount.log"; exit 1; }
  start=$(date +%s)
  run_suite $mode "$work/dfs"
  echo "$mode run: $(( $(date +%s) - start )) s"
  kill "$dfs_pid"; wait "$dfs_pid" 2>/dev/null || true; dfs_pid=
  umount -l "$work/dfs" 2>/dev/null || true
done

status=0
for mode in deltafs deltafs-tracking; do
  known=$(awk -v mode=$mode '!/^#/ && NF && $2 == mode {print $1}' "$here/known-failures.txt" | sort)
  for t in $known; do grep -q "^$t FAILED$" "$work/$mode.results" && echo "known failure ($mode): $t"; done
  regressions=$(join <(grep ' ok$' "$work/overlayfs.results" | cut -d' ' -f1) \
                     <(grep ' FAILED$' "$work/$mode.results" | cut -d' ' -f1) | comm -23 - <(echo "$known") || true)
  if [ -n "$regressions" ]; then
    echo "FAIL: tests overlayfs passes but DeltaFS ($mode) fails:"; echo "$regressions"; status=1
  fi
  unexpected=$(comm -23 <(grep ' FAILED$' "$work/$mode.results" | cut -d' ' -f1) <(echo "$known") || true)
  if [ -n "$unexpected" ]; then
    echo "FAIL: DeltaFS ($mode) failures not in known-failures.txt:"; echo "$unexpected"; status=1
  fi
  for t in $(grep ' FAILED$' "$work/$mode.results" | cut -d' ' -f1); do
    grep -A3 "^$t " "$work/$mode.log" | sed 's/^/    /'
  done
  ok=$(grep -c ' ok$' "$work/$mode.results" || true)
  failed=$(grep -c ' FAILED$' "$work/$mode.results" || true)
  echo "pjdfstest on DeltaFS ($mode): $ok passed, $failed failed"
done
exit $status
