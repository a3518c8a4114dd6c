//! Cost of the default seccomp profile: compiling it, installing it, and the extra time it adds
//! to a syscall the kernel can answer from its per-filter cache (`getppid`: allowed whatever the
//! arguments) and to one whose arguments the filter must inspect (`personality(0xffffffff)`),
//! against the same syscalls without a filter, measured in the same run.
//!
//! `cargo bench -p sandbox --bench seccomp_filter`

use std::time::Instant;

use sandbox::seccomp;

const SAMPLES: usize = 300;
const CALLS_PER_SAMPLE: u32 = 2_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, unit: &str, mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("{what:<44} {p50:>10.1} {p99:>10.1}  {unit}");
    p50
}

/// ns per call of `syscall`, one sample per batch.
fn per_call(syscall: impl Fn()) -> Vec<f64> {
    (0..SAMPLES)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS_PER_SAMPLE {
                syscall();
            }
            start.elapsed().as_nanos() as f64 / f64::from(CALLS_PER_SAMPLE)
        })
        .collect()
}

fn getppid() {
    std::hint::black_box(rustix::process::getppid());
}

fn personality_query() {
    // SAFETY: 0xffffffff only queries the persona; no memory is involved.
    std::hint::black_box(unsafe { libc::personality(0xffff_ffff) });
}

/// Runs `f` on a fresh thread, with the profile installed first when `filtered` (seccomp filters
/// belong to a thread, so the rest of the process stays unfiltered).
fn on_thread<T: Send + 'static>(filtered: bool, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        if filtered {
            seccomp::default_filter().unwrap().install().unwrap();
        }
        f()
    })
    .join()
    .unwrap()
}

/// Per-call time of `syscall` without and with the profile, and their ratio.
fn compare(name: &str, filtered_note: &str, syscall: fn()) {
    let base = row(&format!("{name}, no filter"), "ns", on_thread(false, move || per_call(syscall)));
    let with = row(&format!("{name}, filtered ({filtered_note})"), "ns", on_thread(true, move || per_call(syscall)));
    println!("{:<44} {:>10.2}x", "  ratio", with / base);
}

fn main() {
    println!("{:<44} {:>10} {:>10}", "seccomp profile", "p50", "p99");
    let compile: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(seccomp::default_filter().unwrap());
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    row("default_filter() (compile)", "µs", compile);
    let filter = seccomp::default_filter().unwrap();
    let install: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let filter = filter.clone();
            on_thread(false, move || {
                let start = Instant::now();
                filter.install().unwrap();
                start.elapsed().as_secs_f64() * 1e6
            })
        })
        .collect();
    row("install() (two seccomp(2) calls)", "µs", install);

    compare("getppid", "cached allow", getppid);
    compare("personality(query)", "BPF runs", personality_query);
}
