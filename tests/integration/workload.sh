#!/bin/bash
# Real workloads whose normalized output must not depend on the filesystem they run on: run by
# test_checkpoints_workloads.py inside a sandbox (DeltaFS) and chrooted into a kernel overlayfs mount of the same
# image. Offline (no network), deterministic: fixed identities, dates and seeds; prints hashes of what it makes.
set -euo pipefail
export HOME=/root LC_ALL=C.UTF-8 TZ=UTC PYTHONHASHSEED=0 SOURCE_DATE_EPOCH=1735689600
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
export GIT_AUTHOR_NAME=Agent GIT_AUTHOR_EMAIL=agent@example.com GIT_COMMITTER_NAME=Agent
export GIT_COMMITTER_EMAIL=agent@example.com GIT_AUTHOR_DATE=2025-01-01T00:00:00Z GIT_COMMITTER_DATE=2025-01-01T00:00:00Z
W=/work/wl
rm -rf "$W" && mkdir -p "$W" && cd "$W"

# hashtree DIR: one hash over the names, types, modes, link targets and contents below DIR.
hashtree() {
    (cd "$1" && find . -printf '%p %y %m %l\n' | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) \
        | sha256sum | cut -c1-16
}

echo "== git"
git init -q -b main origin
(
    cd origin
    for i in $(seq 1 40); do printf 'line %s\n' "$i" > "file$i.txt"; done
    mkdir -p sub/dir && echo nested > sub/dir/nested.txt && ln -s file1.txt link
    git add -A && git commit -qm "first"
    for i in 1 2 3; do echo "change $i" >> "file$i.txt"; git commit -qam "change $i"; done
)
git clone -q origin clone                  # a local clone hard-links the objects
git clone -q --no-local origin clone2      # through git's pack protocol
cd clone
git log --format='%H %s'
git -C ../clone2 rev-parse HEAD
echo "hard-linked objects: $(find .git/objects -type f -links +1 | wc -l)"
echo change >> file3.txt && rm file5.txt && echo new > new.txt && git mv file7.txt moved.txt && chmod +x file9.txt
git status --porcelain
git diff --stat
git diff | sha256sum | cut -c1-16
git add -A && git commit -qm work && git rev-parse HEAD
git gc -q && git fsck --strict --no-progress && git count-objects -v | grep -E '^(count|in-pack|packs)'
cd "$W"

echo "== compileall"
mkdir pylib && cp -a /usr/lib/python3.11/json /usr/lib/python3.11/email /usr/lib/python3.11/asyncio pylib/
find pylib -name __pycache__ -prune -exec rm -rf {} +
# Timestamp pycs (SOURCE_DATE_EPOCH would make them hash-based): they record each source's mtime and size.
python3 -m compileall -q --invalidation-mode timestamp pylib
echo "pyc files: $(find pylib -name '*.pyc' | wc -l)"
find pylib -name '*.pyc' | sort | xargs sha256sum | sha256sum | cut -c1-16
find pylib -name '*.pyc' -newer pylib/json/__init__.py -printf '%T@\n' | sort | sha256sum > stamps
python3 -m compileall -q --invalidation-mode timestamp pylib     # nothing to do: no .pyc is rewritten
find pylib -name '*.pyc' -newer pylib/json/__init__.py -printf '%T@\n' | sort | sha256sum | cmp - stamps
PYTHONPATH=pylib python3 -c 'import json, email.message; print(json.__file__, json.dumps({"a": [1, 2]}))'

echo "== venv + wheel"
python3 -m venv venv                       # pip and setuptools from the wheels bundled with Python
mkdir -p pkg/deltademo dist
cat > pkg/deltademo/__init__.py <<'EOF'
def add(a, b):
    return a + b


def main():
    import sys
    print("deltademo", add(*map(int, sys.argv[1:3])))
EOF
# The wheel is built by hand (a wheel is a zip with a .dist-info): Debian's python ships no `wheel` package
# offline, which setuptools needs for bdist_wheel.
python3 - <<'EOF'
import base64, hashlib, zipfile
files = {
    "deltademo/__init__.py": open("pkg/deltademo/__init__.py", "rb").read(),
    "deltademo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: deltademo\nVersion: 1.0\n",
    "deltademo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    "deltademo-1.0.dist-info/entry_points.txt": b"[console_scripts]\ndeltademo = deltademo:main\n",
}
def digest(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
record = "".join(f"{name},{digest(data)},{len(data)}\n" for name, data in files.items())
files["deltademo-1.0.dist-info/RECORD"] = (record + "deltademo-1.0.dist-info/RECORD,,\n").encode()
with zipfile.ZipFile("dist/deltademo-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as whl:
    for name, data in files.items():
        whl.writestr(zipfile.ZipInfo(name, date_time=(2025, 1, 1, 0, 0, 0)), data)
EOF
sha256sum dist/deltademo-1.0-py3-none-any.whl | cut -c1-16
venv/bin/pip install -q dist/deltademo-1.0-py3-none-any.whl
venv/bin/deltademo 3 4
venv/bin/python -c 'import deltademo; print(deltademo.add(2, 3))'
venv/bin/pip list --format=freeze | sort
sort venv/lib/python3.11/site-packages/deltademo-1.0.dist-info/RECORD | sha256sum | cut -c1-16
venv/bin/pip uninstall -y -q deltademo
venv/bin/python -c 'import deltademo' 2>/dev/null || echo "uninstalled"

echo "== sqlite (WAL)"
sqlite3 db.sqlite 'PRAGMA journal_mode=WAL;'
sqlite3 db.sqlite "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
    WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000)
    INSERT INTO t SELECT x, printf('%08d', x * 7919 % 100003) FROM c;"
python3 - <<'EOF'
import sqlite3
writer = sqlite3.connect("db.sqlite", isolation_level=None)
reader = sqlite3.connect("db.sqlite", isolation_level=None)
reader.execute("BEGIN")
before = reader.execute("SELECT count(*), sum(id) FROM t").fetchone()
for batch in range(20):
    writer.execute("BEGIN")
    writer.executemany("INSERT INTO t(v) VALUES (?)", [(f"batch {batch} row {i}",) for i in range(500)])
    writer.execute("DELETE FROM t WHERE id % 97 = ?", (batch,))
    writer.execute("COMMIT")
# The reader's snapshot did not move while the writer committed to the WAL.
assert reader.execute("SELECT count(*), sum(id) FROM t").fetchone() == before
reader.execute("COMMIT")
print("wal checkpoint", writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
print(writer.execute("PRAGMA integrity_check").fetchone()[0])
print(writer.execute("SELECT count(*), sum(id), sum(length(v)) FROM t").fetchone())
EOF
ls db.sqlite*                              # the last connection removed the WAL
sqlite3 db.sqlite .dump | sha256sum | cut -c1-16

echo "== tar"
python3 - <<'EOF'
import os, random
rng = random.Random(7)
for i in range(3000):
    d = f"tsrc/d{i % 37:02}/e{i % 5}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:04}.txt", "wb") as f:
        f.write(rng.randbytes(rng.randrange(0, 3000)))
    os.chmod(f"{d}/f{i:04}.txt", rng.choice([0o644, 0o600, 0o755]))
    if i % 100 == 0:
        os.symlink(f"f{i:04}.txt", f"{d}/s{i:04}")
        os.link(f"{d}/f{i:04}.txt", f"{d}/h{i:04}")
EOF
tar --create --file=t.tar --directory=tsrc --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner .
sha256sum t.tar | cut -c1-16
mkdir tdst && tar --extract --file=t.tar --directory=tdst
tar --diff --file=t.tar --directory=tdst
echo "entries: $(find tdst | wc -l), hard links: $(find tdst -type f -links 2 | wc -l)"
hashtree tdst

echo "== make + gcc"
mkdir -p build && cd build
for i in $(seq 1 8); do
    printf '#include "lib.h"\nint f%s(int x) { return x * %s + %s; }\n' "$i" "$i" "$((i * i))" > "f$i.c"
    printf 'int f%s(int x);\n' "$i" >> lib.h
done
printf '#include <stdio.h>\n#include "lib.h"\nint main(void) { int s = 0;\n' > main.c
for i in $(seq 1 8); do printf '  s += f%s(%s);\n' "$i" "$i" >> main.c; done
printf '  printf("sum %%d\\n", s); return 0; }\n' >> main.c
cat > Makefile <<'EOF'
CFLAGS = -O2 -g0 -Wall -Werror
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard *.c)))
app: $(OBJS)
	$(CC) -o $@ $^
%.o: %.c lib.h
	$(CC) $(CFLAGS) -c -o $@ $<
EOF
make -s -j2
./app
sha256sum ./*.o app | sha256sum | cut -c1-16
touch f3.c
make                                       # only f3.o and the link
make
