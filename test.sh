#!/usr/bin/env bash
# Runs every DeltaBox test (as root): installs and builds what the tests need, then the Rust tests of all
# crates, the Python SDK's unit tests and the integration suite against a real daemon.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
repo=$(pwd)

./setup.sh --no-start
export DELTABOX_TEST_IMAGES=/var/cache/deltabox/images
export DELTABOX_BIN="$repo/target/release/deltabox"

status=0
echo "==> Rust tests"
cargo test --release --workspace || status=1

echo "==> POSIX conformance: pjdfstest on DeltaFS and on kernel overlayfs"
bash tests/pjdfstest/run.sh || status=1

if [ -d python ] && [ -f python/pyproject.toml ]; then
    echo "==> Python SDK and integration tests"
    venv=${DELTABOX_TEST_VENV:-/var/cache/deltabox/test-venv}
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q pytest
    "$venv/bin/pip" install -q --force-reinstall --no-deps ./python
    "$venv/bin/python" -m pytest -q --rootdir . python/tests tests/integration || status=1
fi
exit $status
