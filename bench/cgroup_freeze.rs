//! Latency of a sandbox cgroup's operations on this host's layout: freeze and thaw (with one
//! busy process, and with 100 sleeping ones), and create + destroy. Baseline in the same run: the
//! cgroup v1 freezer driven directly (write FROZEN, read `freezer.state` until FROZEN), when this
//! host mounts it.
//!
//! `cargo bench -p sandbox --bench cgroup_freeze` (as root)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use sandbox::cgroup::{Cgroup, Limits};

const SAMPLES: usize = 200;
const V1_FREEZER: &str = "/sys/fs/cgroup/freezer";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, mut samples_ms: Vec<f64>) -> f64 {
    samples_ms.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples_ms, 0.5), percentile(&samples_ms, 0.99));
    println!("{what:<52} {p50:>8.3} {p99:>8.3}");
    p50
}

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// `count` copies of `script`, each moved into the cgroup by `add` before it starts running.
fn spawn(count: usize, script: &str, add: &dyn Fn(u32)) -> Vec<Child> {
    (0..count)
        .map(|_| {
            let mut child = Command::new("/bin/sh")
                .arg("-c")
                .arg(format!("read _ || exit 1\n{script}"))
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            add(child.id());
            child.stdin.take().unwrap().write_all(b"go\n").unwrap();
            child
        })
        .collect()
}

fn stop(children: Vec<Child>) {
    for mut child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

fn measure_api(name: &str, workload: &str, count: usize, script: &str) -> (f64, f64) {
    let cgroup = Cgroup::create(name, &Limits::default()).unwrap();
    let children = spawn(count, script, &|pid| cgroup.add_process(pid as i32).unwrap());
    let (mut freeze, mut thaw) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let start = Instant::now();
        cgroup.freeze().unwrap();
        freeze.push(ms_since(start));
        let start = Instant::now();
        cgroup.thaw().unwrap();
        thaw.push(ms_since(start));
    }
    let f = row(&format!("Cgroup::freeze, {workload}"), freeze);
    let t = row(&format!("Cgroup::thaw, {workload}"), thaw);
    cgroup.destroy().unwrap();
    stop(children);
    (f, t)
}

fn write(path: &Path, value: &str) {
    std::fs::write(path, value).unwrap();
}

fn measure_v1(dir: &Path, workload: &str, count: usize, script: &str) -> (f64, f64) {
    std::fs::create_dir_all(dir).unwrap();
    let state = dir.join("freezer.state");
    let children = spawn(count, script, &|pid| write(&dir.join("cgroup.procs"), &pid.to_string()));
    let wait_for = |want: &str| while std::fs::read_to_string(&state).unwrap().trim() != want {};
    let (mut freeze, mut thaw) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        let start = Instant::now();
        write(&state, "FROZEN");
        wait_for("FROZEN");
        freeze.push(ms_since(start));
        let start = Instant::now();
        write(&state, "THAWED");
        wait_for("THAWED");
        thaw.push(ms_since(start));
    }
    let f = row(&format!("baseline v1 freezer.state FROZEN, {workload}"), freeze);
    let t = row(&format!("baseline v1 freezer.state THAWED, {workload}"), thaw);
    stop(children);
    std::fs::remove_dir(dir).unwrap();
    (f, t)
}

fn main() {
    let parent = format!("deltabox-bench-{}", std::process::id());
    println!("{:<52} {:>8} {:>8}", "cgroup operation (ms)", "p50", "p99");
    let workloads: [(&str, usize, &str); 2] =
        [("1 busy process", 1, "while :; do :; done"), ("100 sleeping processes", 100, "exec sleep 1000")];
    for (i, (workload, count, script)) in workloads.into_iter().enumerate() {
        let (freeze, thaw) = measure_api(&format!("{parent}/api{i}"), workload, count, script);
        if Path::new(V1_FREEZER).is_dir() {
            let dir = PathBuf::from(V1_FREEZER).join(&parent).join(format!("v1-{i}"));
            let (v1_freeze, v1_thaw) = measure_v1(&dir, workload, count, script);
            println!(
                "{:<52} {:>8.2}x {:>7.2}x",
                "  ratio freeze, thaw (API / baseline)",
                freeze / v1_freeze,
                thaw / v1_thaw
            );
        }
    }
    let limits = Limits { memory_bytes: Some(1 << 30), pids: Some(512), cpus: Some(1.0) };
    let (mut create, mut destroy) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let name = format!("{parent}/lifecycle{i}");
        let start = Instant::now();
        let cgroup = Cgroup::create(&name, &limits).unwrap();
        create.push(ms_since(start));
        let start = Instant::now();
        cgroup.destroy().unwrap();
        destroy.push(ms_since(start));
    }
    row("Cgroup::create with memory, pids and cpu limits", create);
    row("Cgroup::destroy (empty)", destroy);
    Cgroup::remove(&parent).unwrap();
    if Path::new(V1_FREEZER).join(&parent).is_dir() {
        std::fs::remove_dir(PathBuf::from(V1_FREEZER).join(&parent)).unwrap();
    }
}
