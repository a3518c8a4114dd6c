//! DeltaFS benchmarks (run as root: `bench/deltafs/run.sh`). Prints tables:
//! 1. checkpoint / rollback latency (p50, p99) vs filesystem size, change size and stack depth;
//!    garbage collection time and space when an agent keeps only its last checkpoints;
//! 2. baselines measured in the same run: `cp -a`, tar of an overlayfs upper dir, btrfs snapshot;
//! 3. real workloads on DeltaFS vs kernel overlayfs vs fuse-overlayfs, as ratios to overlayfs.
//!
//! Env: DELTAFS_BENCH_DIR (work directory, default /var/tmp), DELTAFS_BENCH_QUICK=1 (smaller
//! sizes and fewer repetitions, for a smoke run), DELTAFS_BENCH_REPS (workload repetitions).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deltafs::{mount, Mount, MountOptions, Quota, StackId, Store};

struct Bench {
    dir: PathBuf,
    quick: bool,
    store: Store,
    /// Mount options as the sandbox engine uses them: with the mount's processes listed (this
    /// process: the checkpoint sections write through it; no checkpoint runs during a workload).
    opts: MountOptions,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let p = |q: f64| ms(v[((v.len() as f64 - 1.0) * q).round() as usize]);
    (p(0.5), p(0.99))
}

fn row(name: &str, samples: Vec<Duration>) {
    let n = samples.len();
    let (p50, p99) = percentiles(samples);
    println!("| {name:<52} | {p50:>9.3} | {p99:>9.3} | {n:>4} |");
}

fn header(title: &str) {
    println!("\n### {title}\n");
    println!("| {:<52} | {:>9} | {:>9} | {:>4} |", "case", "p50 ms", "p99 ms", "n");
    println!("|{}|{}|{}|{}|", "-".repeat(54), "-".repeat(11), "-".repeat(11), "-".repeat(6));
}

fn sh(cwd: &Path, script: &str) {
    let st =
        Command::new("sh").arg("-c").arg(script).current_dir(cwd).stdout(Stdio::null()).status().expect("spawn sh");
    assert!(st.success(), "`{script}` failed in {}", cwd.display());
}

fn timed<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let r = f();
    (t.elapsed(), r)
}

/// `n` small files in directories of 100.
fn gen_tree(dir: &Path, n: usize) {
    for i in 0..n {
        let d = dir.join(format!("d{}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(d.join(format!("f{i}")), format!("file {i}\n").repeat(8)).unwrap();
    }
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn base_with(&self, files: usize) -> StackId {
        let layer = self.dir.join(format!("image-{files}"));
        if !layer.exists() {
            gen_tree(&layer, files);
        }
        self.store.base_stack(&[layer]).unwrap()
    }

    fn mount(&self, stack: StackId, name: &str) -> Mount {
        mount(&self.store, stack, &self.path(name), &self.opts).unwrap()
    }

    /// Checkpoint after a one-file change, rollback after a one-file change.
    fn cycle(&self, m: &Mount, iters: usize, tag: &str) -> (Vec<Duration>, Vec<Duration>) {
        let root = m.mountpoint();
        let (mut cps, mut rbs) = (Vec::new(), Vec::new());
        for i in 0..iters {
            std::fs::write(root.join(format!("{tag}-{i}")), b"change").unwrap();
            let (t, cp) = timed(|| m.checkpoint().unwrap());
            cps.push(t);
            std::fs::write(root.join("d0/f0"), format!("modified {i}")).unwrap();
            let (t, _) = timed(|| m.rollback(cp).unwrap());
            rbs.push(t);
        }
        (cps, rbs)
    }

    fn size_section(&self) {
        header("Checkpoint / rollback vs filesystem size (1-file change)");
        let sizes: &[usize] = if self.quick { &[1_000, 10_000] } else { &[10_000, 100_000] };
        for &files in sizes {
            let layer = self.dir.join(format!("image-{files}"));
            gen_tree(&layer, files);
            let (t_index, base) = timed(|| self.base_with(files));
            let (t_mount, m) = timed(|| self.mount(base, &format!("size-{files}")));
            println!(
                "| {:<52} | {:>9.3} | {:>9} | {:>4} |",
                format!("index {files} image files (first use)"),
                ms(t_index),
                "",
                1
            );
            println!("| {:<52} | {:>9.3} | {:>9} | {:>4} |", format!("mount {files}-file stack"), ms(t_mount), "", 1);
            let (cps, rbs) = self.cycle(&m, if self.quick { 20 } else { 100 }, "s");
            row(&format!("checkpoint, {files} files"), cps);
            row(&format!("rollback, {files} files"), rbs);
            m.unmount().unwrap();
        }
    }

    fn change_section(&self) {
        header("Checkpoint / rollback vs change size (10,000-file base)");
        let base = self.base_with(if self.quick { 1_000 } else { 10_000 });
        let m = self.mount(base, "change");
        let root = m.mountpoint().to_owned();
        let reps = if self.quick { 3 } else { 10 };
        let (mut cps, mut rbs) = (Vec::new(), Vec::new());
        for r in 0..reps {
            for i in 0..1000 {
                std::fs::write(root.join(format!("d{}/f{}", i % 10, i)), format!("rep {r}")).unwrap();
            }
            let (t, cp) = timed(|| m.checkpoint().unwrap());
            cps.push(t);
            for i in 0..1000 {
                std::fs::write(root.join(format!("d{}/new{}", i % 10, i)), b"x").unwrap();
            }
            let (t, _) = timed(|| m.rollback(cp).unwrap());
            rbs.push(t);
        }
        row("checkpoint after writing 1,000 files", cps);
        row("rollback undoing 1,000 new files", rbs);
        let gib: u64 = if self.quick { 64 << 20 } else { 1 << 30 };
        let label = if self.quick { "64 MiB" } else { "1 GiB" };
        let (mut cps, mut rewrites, mut rbs) = (Vec::new(), Vec::new(), Vec::new());
        let buf = vec![0x5au8; 1 << 20];
        for _ in 0..3 {
            let f = std::fs::File::create(root.join("big")).unwrap();
            for off in (0..gib).step_by(buf.len()) {
                f.write_all_at(&buf, off).unwrap();
            }
            drop(f);
            let (t, cp) = timed(|| m.checkpoint().unwrap());
            cps.push(t);
            // Every 4th MiB: each write copies up the chunks it touches from the frozen layer.
            let (t, ()) = timed(|| {
                let f = std::fs::OpenOptions::new().write(true).open(root.join("big")).unwrap();
                for off in (0..gib).step_by(buf.len() * 4) {
                    f.write_all_at(&buf, off).unwrap();
                }
            });
            rewrites.push(t);
            let (t, _) = timed(|| m.rollback(cp).unwrap());
            rbs.push(t);
            std::fs::remove_file(root.join("big")).unwrap();
        }
        row(&format!("checkpoint after writing a {label} file"), cps);
        row(&format!("rewriting 1/4 of a checkpointed {label} file"), rewrites);
        row(&format!("rollback undoing a {label} rewrite (1/4 of it)"), rbs);
        m.unmount().unwrap();
    }

    fn depth_section(&self) {
        header("Checkpoint / rollback vs stack depth (frozen layers beneath)");
        let base = self.base_with(if self.quick { 1_000 } else { 10_000 });
        let depths: &[usize] = if self.quick { &[1, 100] } else { &[1, 100, 1000] };
        for &depth in depths {
            let m = self.mount(base, &format!("depth-{depth}"));
            let root = m.mountpoint().to_owned();
            let mut last = base;
            let mut middle = base;
            for i in 0..depth {
                std::fs::write(root.join(format!("d{}/layer{i}", i % 10)), b"x").unwrap();
                last = m.checkpoint().unwrap();
                if i == depth / 2 {
                    middle = last;
                }
            }
            let (cps, rbs) = self.cycle(&m, if self.quick { 20 } else { 50 }, "depth");
            row(&format!("checkpoint, depth {depth}"), cps);
            row(&format!("rollback (1-file change), depth {depth}"), rbs);
            let mut far = Vec::new();
            for _ in 0..10 {
                far.push(timed(|| m.rollback(middle).unwrap()).0);
                far.push(timed(|| m.rollback(last).unwrap()).0);
            }
            row(&format!("rollback across {} layers, depth {depth}", depth - depth / 2), far);
            m.unmount().unwrap();
            // Background index writers of deep stacks may still run: give them a moment.
            std::thread::sleep(Duration::from_millis(200));
            let mut mounts = Vec::new();
            for _ in 0..5 {
                let (t, m) = timed(|| self.mount(last, &format!("depth-{depth}-again")));
                mounts.push(t);
                m.unmount().unwrap();
            }
            row(&format!("mount a depth-{depth} stack (load from disk)"), mounts);
        }
    }

    /// An agent that checkpoints every step and keeps only its last checkpoints: each step rewrites
    /// a 1 MiB file (so the deleted checkpoints' copies are shadowed) and adds small files (still
    /// read by the kept ones). Store of its own, so the collector sees only this sandbox.
    fn gc_section(&self) {
        header("Deleting checkpoints: garbage collection (sliding window of 10 kept checkpoints)");
        let store = Store::open(&self.dir.join("gc-store")).unwrap();
        let files = if self.quick { 1_000 } else { 10_000 };
        self.base_with(files);
        let base = store.base_stack(&[self.dir.join(format!("image-{files}"))]).unwrap();
        let m = mount(&store, base, &self.path("gc"), &self.opts).unwrap();
        let root = m.mountpoint().to_owned();
        let steps = if self.quick { 100 } else { 1_000 };
        let (mut window, mut gcs, mut idle) = (Vec::new(), Vec::new(), Vec::new());
        let mut reclaimed = 0;
        for i in 0..steps {
            std::fs::write(root.join("log"), vec![i as u8; 1 << 20]).unwrap();
            for j in 0..5 {
                std::fs::write(root.join(format!("d{}/step{i}-{j}", j % 10)), b"small").unwrap();
            }
            window.push(m.checkpoint().unwrap());
            if window.len() > 10 {
                window.remove(0);
            }
            let (t, stats) = timed(|| store.delete_unreferenced(&window).unwrap());
            reclaimed += stats.bytes_reclaimed;
            if i >= steps / 2 {
                gcs.push(t);
                idle.push(timed(|| store.delete_unreferenced(&window).unwrap()).0);
            }
        }
        row(&format!("GC after deleting the oldest kept checkpoint, {steps} steps"), gcs);
        row("GC again, nothing changed", idle);
        m.unmount().unwrap();
        let out = Command::new("du").args(["-s", "--block-size=1"]).arg(store.path().join("layers")).output().unwrap();
        let bytes: u64 = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().parse().unwrap();
        let layers = std::fs::read_dir(store.path().join("layers")).unwrap().count();
        println!(
            "\n{steps} steps wrote {steps} MiB of log; reclaimed {} MiB; the store holds {:.1} MiB ({layers} layers)",
            reclaimed >> 20,
            bytes as f64 / (1 << 20) as f64,
        );
    }

    fn baseline_section(&self) {
        header("Baselines (same 10,000-file tree, same run)");
        let files = if self.quick { 1_000 } else { 10_000 };
        self.base_with(files);
        let tree = self.dir.join(format!("image-{files}"));
        let mut cp = Vec::new();
        for i in 0..5 {
            let dst = self.dir.join(format!("copy-{i}"));
            cp.push(timed(|| sh(&self.dir, &format!("cp -a {} {}", tree.display(), dst.display()))).0);
            std::fs::remove_dir_all(&dst).unwrap();
        }
        row("cp -a of the tree (full copy checkpoint)", cp);
        // docker commit ≈ tar of the overlay upper dir holding the change.
        let (lower, upper, work, mnt) = (tree.clone(), self.path("ovl-upper"), self.path("ovl-work"), self.path("ovl"));
        sh(
            &self.dir,
            &format!(
                "mount -t overlay overlay -o lowerdir={},upperdir={},workdir={} {}",
                lower.display(),
                upper.display(),
                work.display(),
                mnt.display()
            ),
        );
        for i in 0..1000 {
            std::fs::write(mnt.join(format!("d{}/f{}", i % 10, i)), b"changed").unwrap();
        }
        let mut tars = Vec::new();
        for _ in 0..10 {
            tars.push(timed(|| sh(&upper, "tar cf - . | cat > /dev/null")).0);
        }
        row("tar of the overlayfs upper dir (1,000 changed files)", tars);
        sh(&self.dir, &format!("umount {}", mnt.display()));
        match self.btrfs(&tree) {
            Ok(()) => {}
            Err(e) => println!("| btrfs snapshot: not measured ({e}) | | | |"),
        }
    }

    fn btrfs(&self, tree: &Path) -> Result<(), String> {
        let img = self.dir.join("btrfs.img");
        let mnt = self.path("btrfs");
        let run = |cmd: &str| {
            Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| e.to_string())
                .and_then(|s| if s.success() { Ok(()) } else { Err(format!("`{cmd}` failed")) })
        };
        run(&format!(
            "truncate -s 4G {0} && mkfs.btrfs -q -f {0} && mount -o loop {0} {1}",
            img.display(),
            mnt.display()
        ))?;
        let result = (|| {
            run(&format!("btrfs -q subvolume create {0}/vol && cp -a {1}/. {0}/vol/", mnt.display(), tree.display()))?;
            let snaps = if self.quick { 20 } else { 100 };
            let mut times = Vec::new();
            for i in 0..snaps {
                std::fs::write(mnt.join("vol/d0/f0"), format!("{i}")).unwrap();
                let (t, r) =
                    timed(|| run(&format!("btrfs -q subvolume snapshot -r {0}/vol {0}/snap{i}", mnt.display())));
                r?;
                times.push(t);
            }
            let first: Vec<Duration> = times[..10].to_vec();
            let last: Vec<Duration> = times[times.len() - 10..].to_vec();
            row("btrfs snapshot (CLI), snapshots 1-10", first);
            row(&format!("btrfs snapshot (CLI), snapshots {}-{snaps}", snaps - 9), last);
            Ok(())
        })();
        let _ = run(&format!("umount {}", mnt.display()));
        let _ = std::fs::remove_file(&img);
        result
    }

    fn workload_section(&self) {
        println!("\n### Workloads: wall time in ms (median of {} runs) and ratio to kernel overlayfs\n", self.reps());
        let project = self.dir.join("project");
        if !project.exists() {
            make_project(&project, self.quick);
        }
        let tarball = self.dir.join("extract.tar");
        if !tarball.exists() {
            let src = self.dir.join("tar-src");
            gen_tree(&src, if self.quick { 500 } else { 3000 });
            sh(&self.dir, &format!("tar cf {} -C {} .", tarball.display(), src.display()));
        }
        let workloads: Vec<(&str, String)> = vec![
            ("tar xf (3,000 files)", format!("mkdir -p x && tar xf {} -C x", tarball.display())),
            ("read every file", "find . -type f -print0 | xargs -0 cat > /dev/null".into()),
            ("git status (first)", "git status --porcelain > /dev/null".into()),
            ("git status (warm)", "git status --porcelain > /dev/null".into()),
            ("git diff + commit", "echo /\\* change \\*/ >> src/m0.c && git diff > /dev/null && git -c user.name=b -c user.email=b@b commit -qam change".into()),
            ("python3 -m compileall", "python3 -m compileall -q pkg".into()),
            ("sqlite WAL 2,000 inserts", "python3 sqlite_bench.py".into()),
            ("make -j2 (gcc)", "make -s -j2".into()),
            ("rm -rf (3,000 files)", "rm -rf x".into()),
            // Into the space the removed files left (DeltaFS reuses their pack slots).
            ("tar xf again (after rm -rf)", format!("mkdir -p x && tar xf {} -C x", tarball.display())),
        ];
        // "deltafs-nopoll": DeltaFS as it served before busy polling (4 threads blocking on the
        // device), to show what polling changes in the same run. "deltafs-quota": with a quota
        // (never reached), to show what counting usage costs.
        let kinds = ["overlayfs", "deltafs", "deltafs-nopoll", "deltafs-quota", "fuse-overlayfs"];
        // Repetitions go round the file systems (not one file system's runs after another's), so
        // a change in the machine's load hits all of them alike.
        let mut runs: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); workloads.len()]; kinds.len()];
        let mut available = [true; 5];
        for rep in 0..self.reps() {
            for (k, kind) in kinds.iter().enumerate() {
                if !available[k] {
                    continue;
                }
                let Some((root, teardown)) = self.fs_env(kind, &project, rep) else {
                    println!("({kind} not available: skipped)");
                    available[k] = false;
                    continue;
                };
                for (i, (_, script)) in workloads.iter().enumerate() {
                    runs[k][i].push(ms(timed(|| sh(&root, script)).0));
                }
                teardown();
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
        };
        let results: Vec<Vec<f64>> =
            (0..workloads.len()).map(|i| runs.iter().map(|per_kind| median(&per_kind[i])).collect()).collect();
        print!("| {:<28} |", "workload");
        for kind in kinds {
            print!(" {kind:>19} |");
        }
        for kind in &kinds[1..] {
            print!(" {:>21} |", format!("{kind} ×"));
        }
        println!();
        print!("|{}|", "-".repeat(30));
        for _ in kinds {
            print!("{}|", "-".repeat(21));
        }
        for _ in &kinds[1..] {
            print!("{}|", "-".repeat(23));
        }
        println!();
        for (i, (name, _)) in workloads.iter().enumerate() {
            let r = &results[i];
            print!("| {name:<28} |");
            for v in r {
                print!(" {v:>19.1} |");
            }
            for v in &r[1..] {
                print!(" {:>21.2} |", v / r[0]);
            }
            println!();
        }
    }

    /// Workload repetitions per file system: DELTAFS_BENCH_REPS, else 1 (quick) or 5.
    fn reps(&self) -> usize {
        let default = if self.quick { 1 } else { 5 };
        std::env::var("DELTAFS_BENCH_REPS").ok().and_then(|r| r.parse().ok()).unwrap_or(default)
    }

    /// A fresh mount of kind `kind` over the project as its only lower layer.
    fn fs_env(&self, kind: &str, project: &Path, rep: usize) -> Option<(PathBuf, Box<dyn FnOnce()>)> {
        let tag = format!("{kind}-{rep}");
        let mnt = self.path(&format!("wl-{tag}"));
        let upper = self.path(&format!("wl-{tag}-upper"));
        let work = self.path(&format!("wl-{tag}-work"));
        // Drop the page cache so every file system starts cold, as after a fresh sandbox start.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
        match kind {
            "overlayfs" | "fuse-overlayfs" => {
                let opts =
                    format!("lowerdir={},upperdir={},workdir={}", project.display(), upper.display(), work.display());
                let cmd = if kind == "overlayfs" {
                    format!("mount -t overlay overlay -o {opts} {}", mnt.display())
                } else {
                    format!("fuse-overlayfs -o {opts} {}", mnt.display())
                };
                let ok = Command::new("sh").arg("-c").arg(&cmd).status().is_ok_and(|s| s.success());
                if !ok {
                    return None;
                }
                let m2 = mnt.clone();
                Some((
                    mnt,
                    Box::new(move || {
                        sh(
                            Path::new("/"),
                            &format!("umount {} && rm -rf {} {}", m2.display(), upper.display(), work.display()),
                        );
                    }),
                ))
            }
            _ => {
                let base = self.store.base_stack(&[project.to_owned()]).unwrap();
                let opts = match kind {
                    "deltafs-nopoll" => MountOptions { threads: 4, busy_poll: None, ..self.opts.clone() },
                    "deltafs-quota" => {
                        let quota = Quota { bytes: Some(64 << 30), inodes: Some(10_000_000) };
                        MountOptions { quota, ..self.opts.clone() }
                    }
                    _ => self.opts.clone(),
                };
                let m = mount(&self.store, base, &mnt, &opts).unwrap();
                Some((mnt, Box::new(move || m.unmount().unwrap())))
            }
        }
    }
}

fn make_project(dir: &Path, quick: bool) {
    let py = if quick { 100 } else { 500 };
    let c = if quick { 10 } else { 40 };
    for i in 0..py {
        let d = dir.join(format!("pkg/sub{}", i / 50));
        std::fs::create_dir_all(&d).unwrap();
        if i % 50 == 0 {
            std::fs::write(d.join("__init__.py"), "").unwrap();
        }
        let body: String =
            (0..30).map(|j| format!("def f{j}(x):\n    return [x * {j} for _ in range({j})]\n\n")).collect();
        std::fs::write(d.join(format!("m{i}.py")), body).unwrap();
    }
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let mut objs = Vec::new();
    for i in 0..c {
        let body: String = (0..40).map(|j| format!("int f{i}_{j}(int x) {{ return x * {j} + {i}; }}\n")).collect();
        std::fs::write(dir.join(format!("src/m{i}.c")), body).unwrap();
        objs.push(format!("src/m{i}.o"));
    }
    std::fs::write(dir.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    objs.push("src/main.o".into());
    std::fs::write(
        dir.join("Makefile"),
        format!("prog: {0}\n\tgcc -o $@ {0}\n%.o: %.c\n\tgcc -O1 -c -o $@ $<\n", objs.join(" ")),
    )
    .unwrap();
    std::fs::write(
        dir.join("sqlite_bench.py"),
        "import sqlite3\ndb = sqlite3.connect('bench.db')\ndb.execute('pragma journal_mode=wal')\n\
         db.execute('create table if not exists t (k integer primary key, v text)')\n\
         for i in range(200):\n    with db:\n        db.executemany('insert into t(v) values (?)', [('x' * 100,)] * 10)\n\
         assert db.execute('select count(*) from t').fetchone()[0] >= 2000\n",
    )
    .unwrap();
    sh(dir, "git init -q && git add -A && git -c user.name=b -c user.email=b@b commit -qm init");
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("deltafs bench needs root (mounts)");
        std::process::exit(1);
    }
    let quick = std::env::var_os("DELTAFS_BENCH_QUICK").is_some();
    let root = std::env::var_os("DELTAFS_BENCH_DIR").map_or_else(|| "/var/tmp".into(), PathBuf::from);
    let dir = tempfile::Builder::new().prefix("deltafs-bench").tempdir_in(root).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let procs = dir.path().join("procs");
    std::fs::write(&procs, format!("{}\n", std::process::id())).unwrap();
    let opts = MountOptions { processes: Some(procs), ..MountOptions::default() };
    let bench = Bench { dir: dir.path().to_owned(), quick, store, opts };
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    println!("# DeltaFS benchmark ({})", if quick { "quick" } else { "full" });
    if want("size") {
        bench.size_section();
    }
    if want("change") {
        bench.change_section();
    }
    if want("depth") {
        bench.depth_section();
    }
    if want("gc") {
        bench.gc_section();
    }
    if want("baselines") {
        bench.baseline_section();
    }
    if want("workloads") {
        bench.workload_section();
    }
}
