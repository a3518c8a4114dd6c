#!/usr/bin/env bash
# Runs the DeltaFS benchmarks (root needed). Sections: size change depth gc baselines workloads
# (all by default). DELTAFS_BENCH_QUICK=1 for a small smoke run. Needs: fuse-overlayfs, btrfs-progs,
# gcc, make, git, python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo bench -q -p deltafs --bench deltafs -- "$@"
