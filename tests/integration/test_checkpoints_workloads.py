"""Real workloads inside a sandbox (on DeltaFS) give the same results as on kernel overlayfs of the same image,
and what they made survives a checkpoint and rollback intact.

workload.sh runs git (clone, status, diff, commit, gc, fsck), python3 -m compileall, python3 -m venv + pip install
of a wheel built offline, sqlite3 with WAL (two connections), tar of a few thousand files and a make/gcc build,
and prints normalized results (hashes of what they produced, the tools' own output). The comparison run mounts an
overlay of the image's extracted layers (from the daemon's data directory) in a private mount namespace on the
host and runs the script chrooted into it.
"""

import difflib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from support import new_sandbox

SCRIPT = (Path(__file__).parent / "workload.sh").read_text()
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Runs argv[4] with bash chrooted into an overlay of the lower dirs argv[1] (top first), in a mount and pid
# namespace of its own: every mount disappears with it.
CHROOT_ON_OVERLAY = """
set -e
scratch=$2 script=$3
mkdir -p "$scratch/upper" "$scratch/work" "$scratch/merged"
mount -t overlay overlay -o "lowerdir=$1,upperdir=$scratch/upper,workdir=$scratch/work" "$scratch/merged"
mount -t proc proc "$scratch/merged/proc"
mount --rbind /dev "$scratch/merged/dev"
exec chroot "$scratch/merged" /usr/bin/env -i PATH="$PATH_IN" bash -c "$script"
"""


def image_layer_dirs(client, daemon, image):
    """The image's extracted layer directories in the daemon's data directory, bottom first."""
    layers = [daemon.data_dir / "images" / "layers" / digest.split(":", 1)[1]
              for digest in client.images.get(image).layers]
    assert all(d.is_dir() for d in layers), layers
    return layers


def run_on_overlay(lower_dirs, script):
    if "overlay" not in Path("/proc/filesystems").read_text():
        pytest.skip("the kernel has no overlayfs to compare with")
    with tempfile.TemporaryDirectory(prefix="deltabox-overlay-") as scratch:
        lowerdir = ":".join(str(d) for d in reversed(lower_dirs))
        run = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
             "bash", "-c", CHROOT_ON_OVERLAY, "chroot-on-overlay", lowerdir, scratch, script],
            capture_output=True, text=True, timeout=600, env=dict(os.environ, PATH_IN=PATH),
        )
    assert run.returncode == 0, f"the workload failed on overlayfs:\n{run.stdout}\n{run.stderr[-4000:]}"
    return run.stdout


def test_workloads_match_overlayfs_and_survive_rollback(client, daemon):
    with new_sandbox(client, "debian") as sb:
        on_deltafs = sb.exec(["bash", "-c", SCRIPT], timeout=600)
        assert on_deltafs.ok, f"the workload failed on DeltaFS:\n{on_deltafs.stdout}\n{on_deltafs.stderr[-4000:]}"
        on_overlay = run_on_overlay(image_layer_dirs(client, daemon, "debian"), SCRIPT)
        diff = "\n".join(difflib.unified_diff(on_overlay.splitlines(), on_deltafs.stdout.splitlines(),
                                              "overlayfs", "deltafs", lineterm=""))
        assert on_deltafs.stdout == on_overlay, f"DeltaFS and overlayfs results differ:\n{diff}"
        # Known answers, so both cannot be wrong the same way.
        for expected in ("hard-linked objects: 55", "deltademo 7", "uninstalled", "sum 408", "entries: 3283, hard links: 60",
                         "cc -O2 -g0 -Wall -Werror -c -o f3.o f3.c", "make: 'app' is up to date."):
            assert expected in on_deltafs.stdout.splitlines(), expected

        # What the workloads made, checkpointed, destroyed and rolled back, is intact and usable.
        ck = sb.checkpoint(fs_only=True)
        sb.exec(["sh", "-c", "cd /work/wl && rm -rf clone/.git/objects build/*.o && echo junk > db.sqlite"]).check()
        sb.rollback(ck)
        check = """
            set -e
            cd /work/wl/clone && git fsck --strict --no-progress && git status --porcelain && git log --format=%s -1
            cd /work/wl && sqlite3 db.sqlite 'PRAGMA integrity_check; SELECT count(*) FROM t;'
            cd /work/wl/build && make && ./app
            /work/wl/venv/bin/python -c 'import sys; print(sys.prefix)'
        """
        result = sb.exec(["bash", "-c", check], timeout=120)
        assert result.ok, result.stderr
        assert result.stdout == "work\nok\n24787\nmake: 'app' is up to date.\nsum 408\n/work/wl/venv\n"
