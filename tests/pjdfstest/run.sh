#!/usr/bin/env bash
# POSIX conformance of DeltaFS: runs pjdfstest (Rust port) on kernel overlayfs and on a DeltaFS mount
# (two modes) in the same run. Needs root, /dev/fuse, overlayfs; exits non-zero, saying why, when
# it cannot run (nothing is skipped) or when:
# - a run does not report exactly the tests of expected-tests.txt (each as run, i.e. ok or FAILED,
#   or as skipped by the configuration): a missing test means the suite crashed, hung (killed after
#   PJDFSTEST_TIMEOUT) or lost it; an unexpected one means expected-tests.txt is out of date;
# - the suite crashed, was killed, or its summary does not count the results read;
# - DeltaFS fails a test that overlayfs passes, or fails a test that is not listed (with its reason)
#   in known-failures.txt;
# - a known failure passed (a stale entry), unless its reason starts with "flaky" (then noted only).
# Env: PJDFSTEST (binary, must be version $pj_version; default: installed with `cargo install
#      pjdfstest` into the target dir), CARGO_TARGET_DIR, PJDFSTEST_TIMEOUT (seconds per run, default
#      600), PJDFSTEST_KEEP (keep the logs), PJDFSTEST_FILTER (space-separated name patterns, as
#      pjdfstest takes them: a test runs if its name contains one; the expected set is restricted
#      the same way, so a partial run is still checked for missing tests).
set -euo pipefail
export LC_ALL=C # sort, join and comm must agree on one order
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
pj_version=0.2.2
modes=(overlayfs deltafs deltafs-tracking)

die() { echo "pjdfstest: FAIL: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (mounts overlayfs and FUSE, switches users)"
[ -c /dev/fuse ] || die "/dev/fuse missing"

pjdfstest=${PJDFSTEST:-$target/pjdfstest/bin/pjdfstest}
if [ ! -x "$pjdfstest" ]; then
  [ -z "${PJDFSTEST:-}" ] || die "PJDFSTEST=$PJDFSTEST is not executable"
  cargo install --quiet pjdfstest --version "$pj_version" --locked --root "$target/pjdfstest" \
    || die "cannot install pjdfstest $pj_version"
fi
version=$("$pjdfstest" --version) || die "$pjdfstest does not run"
[ "$version" = "pjdfstest $pj_version" ] || die "$pjdfstest is '$version', expected-tests.txt is for $pj_version"
cargo build --quiet --release -p deltafs --bin deltafs || die "cannot build deltafs"
deltafs=$target/release/deltafs

read -ra patterns <<<"${PJDFSTEST_FILTER:-}"
expected=$(awk -v pats="${PJDFSTEST_FILTER:-}" '
  BEGIN { n = split(pats, p, " ") }
  /^#/ || !NF { next }
  n == 0 { print; next }
  { for (i = 1; i <= n; i++) if (index($1, p[i])) { print; next } }' "$here/expected-tests.txt" | sort -k1,1)
[ -n "$expected" ] || die "PJDFSTEST_FILTER='${PJDFSTEST_FILTER:-}' matches no test of expected-tests.txt"

known_lines=$(grep -v '^#' "$here/known-failures.txt" | awk NF || true)
while read -r name mode reason; do
  [ -n "$name" ] || continue
  [ -n "$reason" ] || die "known-failures.txt: $name has no reason"
  [ "$mode" = deltafs ] || [ "$mode" = deltafs-tracking ] || die "known-failures.txt: $name: unknown mode '$mode'"
  grep -q "^$name run$" "$here/expected-tests.txt" || die "known-failures.txt: $name is not a test that runs (expected-tests.txt)"
done <<<"$known_lines"

# pjdfstest switches to these users (see pjdfstest.toml).
id tests >/dev/null 2>&1 || { groupadd -f tests; useradd -g tests -M -s /usr/sbin/nologin tests; }

work=$(mktemp -d /tmp/deltafs-pjdfstest.XXXXXX)
chmod 755 "$work" # the suite switches to unprivileged users
echo "$expected" >"$work/expected"
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

status=0
fail() { echo "FAIL: $*"; status=1; }

# Writes <mode>.results (name and ok/FAILED/skipped) and <mode>.tests (name and run/skipped, the
# form of expected-tests.txt).
run_suite() { # mode dir
  local rc=0 summary total results=$work/$1.results
  (cd "$2" && timeout -k 10 "${PJDFSTEST_TIMEOUT:-600}" \
    "$pjdfstest" -c "$here/pjdfstest.toml" -p "$2" "${patterns[@]}" >"$work/$1.log" 2>&1) || rc=$?
  awk '/^[a-z_:0-9]+ +(ok|FAILED|skipped)$/ {print $1, $2}' "$work/$1.log" | sort -k1,1 >"$results"
  awk '{print $1, ($2 == "skipped" ? "skipped" : "run")}' "$results" >"$work/$1.tests"
  count() { grep -c " $1\$" "$results" || true; }
  echo "$1: $(count ok) passed, $(count FAILED) failed, $(count skipped) skipped"
  # pjdfstest exits 1 when tests failed; anything else is a crash or the timeout's kill.
  summary=$(grep '^Summary: ' "$work/$1.log" || true)
  total=$(sed -n 's/^Summary: .* \([0-9][0-9]*\) total$/\1/p' <<<"$summary")
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    fail "pjdfstest on $1 killed after ${PJDFSTEST_TIMEOUT:-600} s (hung?); end of its log:"
    tail -n 20 "$work/$1.log" | sed 's/^/    /'
  elif [ "$rc" != 0 ] && [ "$rc" != 1 ]; then
    fail "pjdfstest on $1 crashed (exit status $rc); end of its log:"
    tail -n 20 "$work/$1.log" | sed 's/^/    /'
  elif [ -z "$total" ]; then
    fail "pjdfstest on $1 printed no summary (it did not finish)"
  elif [ "$total" != "$(wc -l <"$results")" ]; then
    fail "pjdfstest on $1: '$summary' but $(wc -l <"$results") results read (unknown result lines?)"
  fi
}

# Every expected test reported, in the expected way, and nothing else.
check_tests() { # mode
  local missing unexpected changed
  missing=$(join -v1 "$work/expected" "$work/$1.tests" | cut -d' ' -f1)
  unexpected=$(join -v2 "$work/expected" "$work/$1.tests")
  changed=$(join "$work/expected" "$work/$1.tests" | awk '$2 != $3 {print $1 ": expected " $2 ", got " $3}')
  if [ -n "$missing" ]; then
    fail "$(wc -l <<<"$missing") expected tests missing from the $1 run:"; sed 's/^/    /' <<<"$missing"
  fi
  if [ -n "$unexpected" ]; then
    fail "tests of the $1 run not in expected-tests.txt (update it, see its header):"; sed 's/^/    /' <<<"$unexpected"
  fi
  if [ -n "$changed" ]; then
    fail "tests of the $1 run that changed between run and skipped:"; sed 's/^/    /' <<<"$changed"
  fi
}

mount -t overlay overlay -o "lowerdir=$work/lower,upperdir=$work/upper,workdir=$work/ovlwork" "$work/ovl" \
  || die "cannot mount overlayfs on $work/ovl"
start=$(date +%s)
run_suite overlayfs "$work/ovl"
echo "overlayfs run: $(($(date +%s) - start)) s"

# Both ways DeltaFS can see opens: with the processes listed (as sandboxes mount it: opens need no
# FUSE request) and tracking every open.
echo $$ >"$work/procs"
for mode in deltafs deltafs-tracking; do
  opts=(); [ $mode = deltafs ] && opts=(--processes "$work/procs")
  rm -rf "$work/store"
  "$deltafs" --store "$work/store" mount "${opts[@]}" --layer "$work/base" "$work/dfs" >"$work/$mode-mount.log" 2>&1 &
  dfs_pid=$!
  for _ in $(seq 100); do findmnt "$work/dfs" >/dev/null && break; sleep 0.1; done
  if ! findmnt "$work/dfs" >/dev/null; then
    sed 's/^/    /' "$work/$mode-mount.log"
    die "DeltaFS ($mode) did not mount on $work/dfs within 10 s (its log is above)"
  fi
  start=$(date +%s)
  run_suite $mode "$work/dfs"
  echo "$mode run: $(($(date +%s) - start)) s"
  kill "$dfs_pid"; wait "$dfs_pid" 2>/dev/null || true; dfs_pid=
  umount -l "$work/dfs" 2>/dev/null || true
done

for mode in "${modes[@]}"; do check_tests $mode; done

for mode in deltafs deltafs-tracking; do
  known=$(awk -v mode=$mode '$2 == mode {print $1}' <<<"$known_lines" | sort)
  failed=$(awk '$2 == "FAILED" {print $1}' "$work/$mode.results")
  for t in $known; do grep -qx "$t" <<<"$failed" && echo "known failure ($mode): $t"; done
  regressions=$(join <(awk '$2 == "ok" {print $1}' "$work/overlayfs.results") <(echo "$failed") \
                  | comm -23 - <(echo "$known"))
  [ -z "$regressions" ] || { fail "tests overlayfs passes but DeltaFS ($mode) fails:"; echo "$regressions"; }
  unexpected=$(comm -23 <(echo "$failed") <(echo "$known") | awk NF)
  [ -z "$unexpected" ] || { fail "DeltaFS ($mode) failures not in known-failures.txt:"; echo "$unexpected"; }
  for t in $failed; do
    grep -A3 "^$t " "$work/$mode.log" | sed 's/^/    /'
  done
  # A known failure that passed: the entry is stale (remove it), unless the failure is flaky.
  while read -r t _ reason; do
    grep -qx "$t ok" "$work/$mode.results" || continue
    case $reason in
      flaky*) echo "known flaky failure passed this time ($mode): $t" ;;
      *) fail "known failure passed, remove it from known-failures.txt ($mode): $t" ;;
    esac
  done < <(awk -v mode=$mode '$2 == mode' <<<"$known_lines")
  echo "pjdfstest on DeltaFS ($mode): $(grep -c ' ok$' "$work/$mode.results" || true) passed," \
    "$(grep -c ' FAILED$' "$work/$mode.results" || true) failed"
done
if [ $status != 0 ]; then echo "pjdfstest: FAIL (see above)"; else echo "pjdfstest: PASS"; fi
exit $status
