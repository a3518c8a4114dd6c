//! DeltaCR benchmark: checkpoint (freeze to thaw) and restore latency vs resident memory and vs memory
//! dirtied since the parent checkpoint, and incremental image sizes. Prints tables with p50/p99.
//!
//! Run as root: `cargo bench -p deltacr --bench deltacr` (set DELTACR_BENCH_QUICK=1 for a short run).
//! The workload is a python process in a real pid namespace holding RSS MiB of written memory; before
//! each checkpoint it rewrites one byte in each page of the first DIRTY MiB.

#[path = "../../crates/deltacr/tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

use deltacr::image::ImageStore;
use deltacr::{Engine, MemoryRestore};

const WORKLOAD: &str = r#"
import sys
rss = int(sys.argv[1]) << 20
buf = bytearray(rss)
for k in range(0, rss, 4096):
    buf[k] = 1
cmd = open(sys.argv[2], "r")
ack = open(sys.argv[3], "w")
ack.write("ready\n"); ack.flush()
v = 1
for line in cmd:
    n = int(line) << 20
    v = (v + 1) % 251
    for k in range(0, n, 4096):
        buf[k] = v
    ack.write("ok\n"); ack.flush()
"#;

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Row {
    rss: u64,
    dirty: u64,
    freeze_to_thaw: Vec<f64>,
    restore_template: Vec<f64>,
    restore_image: Vec<f64>,
    restore_image_copy: Vec<f64>,
    image_kib: Vec<f64>,
    image_write: Vec<f64>,
    baseline_full: Vec<f64>,
    rollback: Rollbacks,
    /// Per checkpoint step: the times measured for it.
    phases: Vec<(&'static str, Vec<f64>)>,
}

/// Rollbacks (kill_processes + restore from templates) of one workload: cloning the templates
/// (baseline) and taking over spares; and the time prepare_spares took.
#[derive(Default)]
struct Rollbacks {
    clone: Vec<f64>,
    spare: Vec<f64>,
    prepare: Vec<f64>,
}

impl Rollbacks {
    /// Measures `n` rollbacks to `ckpt` cloning the templates, then `n` taking over spares (each made
    /// right before, as the shim would between two rollbacks): each kind in its steady state, where
    /// the tree it kills was restored the same way.
    fn measure(engine: &mut Engine, ckpt: &deltacr::Checkpoint, sb: &deltacr::Sandbox, n: usize) -> Rollbacks {
        let mut r = Rollbacks::default();
        for _ in 0..n + 1 {
            let t0 = Instant::now();
            engine.kill_processes(sb).unwrap();
            assert_eq!(engine.restore(ckpt, sb).unwrap().from_spares, 0);
            r.clone.push(ms(t0.elapsed()));
        }
        for _ in 0..n + 1 {
            let p0 = Instant::now();
            assert!(engine.prepare_spares(ckpt, sb).unwrap() > 0);
            r.prepare.push(ms(p0.elapsed()));
            let t1 = Instant::now();
            engine.kill_processes(sb).unwrap();
            assert!(engine.restore(ckpt, sb).unwrap().from_spares > 0);
            r.spare.push(ms(t1.elapsed()));
        }
        // The first of each kind killed a tree restored the other way.
        r.clone.remove(0);
        r.spare.remove(0);
        r.prepare.remove(0);
        r
    }

    fn print(&mut self, name: &str) {
        for v in [&mut self.clone, &mut self.spare, &mut self.prepare] {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        println!(
            "{:>22} | {} | {} | {:>11.2} | {}",
            name,
            pp(&self.clone),
            pp(&self.spare),
            pct(&self.spare, 0.5) / pct(&self.clone, 0.5),
            pp(&self.prepare)
        );
    }
}

fn pp(v: &[f64]) -> String {
    format!("{:>7.2} / {:>7.2}", pct(v, 0.5), pct(v, 0.99))
}

fn run(rss: u64, dirty: u64, iters: usize) -> Row {
    let mut ns = common::PidNs::with_watchdog(Duration::from_secs(3600));
    let cmd = ns.path("cmd");
    let ack = ns.path("ack");
    for f in [&cmd, &ack] {
        nix::unistd::mkfifo(f.as_path(), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    }
    let py = common::python();
    ns.spawn(&[&py, "-c", WORKLOAD, &rss.to_string(), cmd.to_str().unwrap(), ack.to_str().unwrap()], None, false);
    let mut cmd_w = std::fs::OpenOptions::new().write(true).open(&cmd).unwrap();
    let mut ack_r = BufReader::new(std::fs::File::open(&ack).unwrap());
    let mut line = String::new();
    ack_r.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    let store = ImageStore::new(&ns.path("images")).unwrap();
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut row = Row {
        rss,
        dirty,
        freeze_to_thaw: vec![],
        restore_template: vec![],
        restore_image: vec![],
        restore_image_copy: vec![],
        image_kib: vec![],
        image_write: vec![],
        baseline_full: vec![],
        rollback: Rollbacks::default(),
        phases: vec![],
    };
    let dirty_step = |cmd_w: &mut std::fs::File, ack_r: &mut BufReader<std::fs::File>| {
        writeln!(cmd_w, "{dirty}").unwrap();
        cmd_w.flush().unwrap();
        let mut l = String::new();
        ack_r.read_line(&mut l).unwrap();
    };
    let mut parent: Option<(deltacr::Checkpoint, deltacr::image::ImageId)> = None;
    for i in 0..iters + 1 {
        dirty_step(&mut cmd_w, &mut ack_r);
        let t0 = Instant::now();
        let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
        let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
        let frozen_ms = ms(t0.elapsed()) - ms(ckpt.stats.total) + ms(ckpt.stats.stopped);
        let w0 = Instant::now();
        let job = ckpt.image_job(parent.as_ref().map(|(c, id)| (c, *id))).unwrap();
        let info = job.write(&store).unwrap();
        let incremental = ms(w0.elapsed());
        // Baseline: a full (non-incremental) image of the same checkpoint.
        let f0 = Instant::now();
        let full = ckpt.image_job(None).unwrap().write(&store).unwrap();
        let baseline = ms(f0.elapsed());
        std::fs::remove_dir_all(store.path_of(full.id)).unwrap();
        // Restore from the image first, then from the template: the process that runs on is then a
        // copy-on-write clone of this checkpoint's template, as after a rollback.
        // From the image twice: copying memory whole (the baseline), then on demand.
        let mut from_image = [0.0; 2];
        for (k, mode) in
            [MemoryRestore::Copy, MemoryRestore::OnDemand { background_fill: true }].into_iter().enumerate()
        {
            engine.kill_processes(&sb).unwrap();
            engine.set_memory_restore(mode);
            let chain = store.open_chain(info.id).unwrap();
            let r1 = Instant::now();
            engine.restore_image(chain, &sb, None).unwrap();
            from_image[k] = ms(r1.elapsed());
        }
        engine.kill_processes(&sb).unwrap();
        let r0 = Instant::now();
        engine.restore(&ckpt, &sb).unwrap();
        let from_template = ms(r0.elapsed());
        if i > 0 {
            // The first checkpoint has no parent: its image is full.
            row.freeze_to_thaw.push(frozen_ms);
            row.image_kib.push(info.page_bytes as f64 / 1024.0);
            row.image_write.push(incremental);
            row.baseline_full.push(baseline);
            row.restore_image_copy.push(from_image[0]);
            row.restore_image.push(from_image[1]);
            row.restore_template.push(from_template);
            for (k, (name, d)) in ckpt.stats.phases.iter().enumerate() {
                if row.phases.len() <= k {
                    row.phases.push((name, Vec::new()));
                }
                row.phases[k].1.push(ms(*d));
            }
        }
        parent = Some((ckpt, info.id));
    }
    if let Some((ckpt, _)) = &parent {
        row.rollback = Rollbacks::measure(&mut engine, ckpt, &sb, iters);
    }
    drop(cmd_w);
    row
}

/// Rollbacks of an interactive bash on a pty with `jobs` background jobs (children of bash, rebuilt by
/// copying their memory; spares serve processes whose parent is init).
fn shell_rollbacks(jobs: usize, iters: usize) -> Rollbacks {
    let mut ns = common::PidNs::with_own_dev();
    let (master, index) = ns.open_pty();
    let py = common::python();
    ns.spawn(&[&py, "-c", common::BASH_ON_PTY, &format!("/dev/pts/{index}")], None, true);
    let mut t = common::Term::new(master);
    t.run(&format!("{} echo \"ok$((1+1))\"", "sleep 1000 & ".repeat(jobs)), "ok2");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert_eq!(ckpt.tree.processes.len(), 1 + jobs);
    let r = Rollbacks::measure(&mut engine, &ckpt, &sb, iters);
    t.run("echo \"alive$((2+2))\"", "alive4");
    r
}

fn main() {
    let quick = std::env::var_os("DELTACR_BENCH_QUICK").is_some();
    let (rss_list, iters): (&[u64], usize) = if quick { (&[10, 200], 5) } else { (&[10, 200, 2048], 20) };
    let dirty_list: &[u64] = &[0, 1, 100];
    let mut rows = Vec::new();
    for &rss in rss_list {
        for &dirty in dirty_list.iter().filter(|&&d| d <= rss) {
            let n = if rss >= 2048 { iters.min(8) } else { iters };
            eprintln!("rss {rss} MiB, dirty {dirty} MiB, {n} iterations ...");
            rows.push(run(rss, dirty, n));
        }
    }
    println!(
        "DeltaCR benchmark (ms unless noted; p50 / p99 over {iters} incremental checkpoints per row, 2 GiB rows: 8)"
    );
    println!("baseline: writing a full (non-incremental) image of the same checkpoint;");
    println!("restore from the image: memory on demand (userfaultfd) vs copied whole before the process runs");
    println!(
        "{:>7} {:>5} | {:>17} | {:>17} | {:>17} | {:>17} | {:>9} | {:>17} | {:>17} | {:>9}",
        "RSS MiB",
        "dirty",
        "freeze->thaw",
        "restore(template)",
        "image, on demand",
        "image, copied",
        "image KiB",
        "image write",
        "baseline full",
        "write/base"
    );
    for r in &mut rows {
        for v in [
            &mut r.freeze_to_thaw,
            &mut r.restore_template,
            &mut r.restore_image,
            &mut r.restore_image_copy,
            &mut r.image_kib,
            &mut r.image_write,
            &mut r.baseline_full,
        ] {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        }
        println!(
            "{:>7} {:>5} | {} | {} | {} | {} | {:>9.0} | {} | {} | {:>9.2}",
            r.rss,
            r.dirty,
            pp(&r.freeze_to_thaw),
            pp(&r.restore_template),
            pp(&r.restore_image),
            pp(&r.restore_image_copy),
            pct(&r.image_kib, 0.5),
            pp(&r.image_write),
            pp(&r.baseline_full),
            pct(&r.image_write, 0.5) / pct(&r.baseline_full, 0.5)
        );
    }
    println!();
    println!("rollback = kill_processes + restore from templates (ms, p50 / p99); baseline: cloning the templates;");
    println!("spare: taking over spares made by prepare_spares beforehand (its time in the last column)");
    println!(
        "{:>22} | {:>17} | {:>17} | {:>11} | {:>17}",
        "workload", "rollback (clone)", "rollback (spare)", "spare/clone", "prepare_spares"
    );
    for r in &mut rows {
        r.rollback.print(&format!("python {} MiB, {} dirty", r.rss, r.dirty));
    }
    let shell_iters = iters * 2;
    shell_rollbacks(0, shell_iters).print("bash on a pty");
    shell_rollbacks(2, shell_iters).print("bash + 2 jobs");
    println!();
    println!("checkpoint steps, p50 ms (freeze itself is the caller's and not included)");
    for r in &mut rows {
        let parts: Vec<String> = r
            .phases
            .iter_mut()
            .map(|(name, v)| {
                v.sort_by(|a, b| a.partial_cmp(b).unwrap());
                format!("{name} {:.2}", pct(v, 0.5))
            })
            .collect();
        println!("{:>5} MiB / {:>3} MiB dirty: {}", r.rss, r.dirty, parts.join(", "));
    }
}
