//! Real programs on a DeltaFS mount give the same results as on kernel overlayfs over the same
//! lower directory: git clone/status/diff/commit, compileall, sqlite WAL, tar extract of thousands
//! of files, make/gcc, venv + pip install of a local wheel.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const SCRIPT: &str = r#"
set -e
export GIT_AUTHOR_DATE=2020-01-01T00:00:00Z GIT_COMMITTER_DATE=2020-01-01T00:00:00Z
export GIT_AUTHOR_NAME=t GIT_AUTHOR_EMAIL=t@t GIT_COMMITTER_NAME=t GIT_COMMITTER_EMAIL=t@t
git clone -q repo clone
cd clone
echo change >> README
git status --porcelain
git diff
git commit -qam change
git rev-parse HEAD
git fsck --strict 2>&1
cd ..
python3 -m compileall -q pysrc
ls pysrc/__pycache__ | sort
cat pysrc/__pycache__/*.pyc | md5sum
python3 sqlite_wal.py
mkdir x
tar xf archive.tar -C x
find x | sort | md5sum
find x -type f | sort | xargs cat | md5sum
make -s -C csrc
./csrc/prog
cat csrc/*.o | md5sum
python3 -m venv venv
venv/bin/pip install -q --no-index --disable-pip-version-check wheels/demo-1.0-py3-none-any.whl
venv/bin/python -c 'import demo; print(demo.hello())'
rm -rf x
ls
"#;

const SQLITE_WAL: &str = r#"
import sqlite3, hashlib
db = sqlite3.connect('db.sqlite')
print(db.execute('pragma journal_mode=wal').fetchone()[0])
db.execute('create table t (k integer primary key, v text)')
for i in range(100):
    with db:
        db.executemany('insert into t(v) values (?)', [(str(i * j),) for j in range(20)])
r = sqlite3.connect('db.sqlite')
rows = r.execute('select k, v from t order by k').fetchall()
print(len(rows), hashlib.md5(repr(rows).encode()).hexdigest())
print(r.execute('pragma integrity_check').fetchone()[0])
"#;

fn make_base(d: &Path) {
    let sh = |cwd: &Path, s: &str| {
        let st = Command::new("sh").arg("-c").arg(s).current_dir(cwd).status().unwrap();
        assert!(st.success(), "{s}");
    };
    std::fs::create_dir_all(d.join("repo")).unwrap();
    for i in 0..50 {
        std::fs::write(d.join(format!("repo/file{i}.txt")), format!("line {i}\n").repeat(20)).unwrap();
    }
    std::fs::write(d.join("repo/README"), "readme\n").unwrap();
    sh(&d.join("repo"), "git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init");
    std::fs::create_dir_all(d.join("pysrc")).unwrap();
    for i in 0..20 {
        std::fs::write(d.join(format!("pysrc/m{i}.py")), format!("def f(x):\n    return x + {i}\n")).unwrap();
    }
    std::fs::write(d.join("sqlite_wal.py"), SQLITE_WAL).unwrap();
    let src = d.join("../tar-src");
    for i in 0..3000 {
        let dir = src.join(format!("d{}", i / 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i}")), format!("{i}\n").repeat(i % 50)).unwrap();
    }
    sh(d, &format!("tar cf archive.tar -C {} .", src.display()));
    std::fs::create_dir_all(d.join("csrc")).unwrap();
    for i in 0..8 {
        std::fs::write(d.join(format!("csrc/m{i}.c")), format!("int f{i}(int x) {{ return x * {i}; }}\n")).unwrap();
    }
    std::fs::write(
        d.join("csrc/main.c"),
        "#include <stdio.h>\nint f7(int);\nint main(void) { printf(\"%d\\n\", f7(6)); return 0; }\n",
    )
    .unwrap();
    let objs: Vec<String> = (0..8).map(|i| format!("m{i}.o")).chain(["main.o".into()]).collect();
    std::fs::write(
        d.join("csrc/Makefile"),
        format!("prog: {0}\n\tgcc -o $@ {0}\n%.o: %.c\n\tgcc -O1 -c -o $@ $<\n", objs.join(" ")),
    )
    .unwrap();
    std::fs::create_dir_all(d.join("wheels")).unwrap();
    std::fs::write(d.join("../make_wheel.py"), MAKE_WHEEL).unwrap();
    sh(d, "python3 ../make_wheel.py");
}

const MAKE_WHEEL: &str = r#"
import zipfile, hashlib, base64
files = {
    'demo/__init__.py': b'def hello():\n    return "hello from demo"\n',
    'demo-1.0.dist-info/METADATA': b'Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n',
    'demo-1.0.dist-info/WHEEL': b'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n',
}
def digest(c):
    return base64.urlsafe_b64encode(hashlib.sha256(c).digest()).rstrip(b'=').decode()
record = ''.join('%s,sha256=%s,%d\n' % (n, digest(c), len(c)) for n, c in files.items())
record += 'demo-1.0.dist-info/RECORD,,\n'
with zipfile.ZipFile('wheels/demo-1.0-py3-none-any.whl', 'w') as z:
    for n, c in files.items():
        z.writestr(n, c)
    z.writestr('demo-1.0.dist-info/RECORD', record)
"#;

fn run_script(root: &Path) -> String {
    let out = Command::new("sh").arg("-c").arg(SCRIPT).current_dir(root).output().unwrap();
    checked_stdout(root, out)
}

/// The workload's stdout, after checking that it succeeded.
fn checked_stdout(root: &Path, out: std::process::Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "workload failed in {}:\n{text}\n{}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn workloads_match_kernel_overlayfs() {
    if !fuse_available() {
        return;
    }
    for tool in ["git", "python3", "gcc", "make", "tar"] {
        if Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map_or(true, |o| !o.status.success())
        {
            testing::skip(format!("{tool} is not installed"));
            return;
        }
    }
    let fx = Fixture::new();
    let lower = fx.layer("base");
    make_base(&lower);
    let ovl = fx.mountpoint("ovl");
    let (upper, work) = (fx.mountpoint("upper"), fx.mountpoint("work"));
    let opts = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    nix::mount::mount(Some("overlay"), &ovl, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .unwrap();
    let expected = run_script(&ovl);
    nix::mount::umount(&ovl).unwrap();

    let base = fx.store.base_stack(&[lower]).unwrap();
    let m = fx.mount(base, "deltafs");
    let got = run_script(m.mountpoint());
    assert_eq!(got, expected);
    assert!(got.contains("hello from demo") && got.contains("42") && got.contains("wal"), "{got}");
    // The same workload's result survives a checkpoint and a rollback to it.
    let before = snapshot(m.mountpoint());
    let cp = m.checkpoint().unwrap();
    std::fs::remove_dir_all(m.mountpoint().join("venv")).unwrap();
    std::fs::remove_dir_all(m.mountpoint().join("clone")).unwrap();
    m.rollback(cp).unwrap();
    assert_eq!(snapshot(m.mountpoint()), before);
    m.unmount().unwrap();
}

/// The first layer of an OCI image layout, extracted as an overlayfs lower directory.
fn extract_first_layer(layout: &Path, into: &Path) {
    let blob = |digest: &str| layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let index = json(layout.join("index.json"));
    let manifest = json(blob(index["manifests"][0]["digest"].as_str().unwrap()));
    let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
    std::fs::create_dir_all(into).unwrap();
    let st = Command::new("tar")
        .args([
            "xzf",
            &layer.to_string_lossy(),
            "-C",
            &into.to_string_lossy(),
            "--numeric-owner",
            "--xattrs",
            "--xattrs-include=*",
        ])
        .status()
        .unwrap();
    assert!(st.success(), "extracting {}", layer.display());
}

/// Runs the workload inside `root` (a mount whose image is Debian) with chroot, in a private mount
/// namespace holding /dev and /proc for it.
fn run_in_chroot(root: &Path) -> String {
    let script = format!(
        "set -e; mount --bind /dev {r}/dev; mount -t proc proc {r}/proc; \
         exec chroot {r} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root sh -c 'cd /work && sh /work/script.sh'",
        r = root.display()
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    checked_stdout(root, out)
}

#[test]
fn workloads_in_a_debian_image_chroot_match_kernel_overlayfs() {
    let Some(images) = std::env::var_os("DELTABOX_TEST_IMAGES") else {
        testing::skip("DELTABOX_TEST_IMAGES is not set (no Debian test image)");
        return;
    };
    let layout = Path::new(&images).join("debian");
    if !layout.join("index.json").exists() {
        testing::skip(format!("no Debian image at {}", layout.display()));
        return;
    }
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let debian = fx.layer("debian");
    extract_first_layer(&layout, &debian);
    // A second image layer with the workload's inputs under /work.
    let data = fx.layer("data");
    make_base(&data.join("work"));
    std::fs::write(data.join("work/script.sh"), SCRIPT).unwrap();

    let ovl = fx.mountpoint("ovl");
    let (upper, work) = (fx.mountpoint("upper"), fx.mountpoint("work"));
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        data.display(),
        debian.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(Some("overlay"), &ovl, Some("overlay"), nix::mount::MsFlags::empty(), Some(opts.as_str()))
        .unwrap();
    let expected = run_in_chroot(&ovl);
    nix::mount::umount(&ovl).unwrap();

    let base = fx.store.base_stack(&[debian, data]).unwrap();
    let m = fx.mount(base, "deltafs");
    let got = run_in_chroot(m.mountpoint());
    assert_eq!(got, expected);
    assert!(got.contains("hello from demo"), "{got}");
    m.unmount().unwrap();
}
