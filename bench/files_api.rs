//! Latency of the files API on a directory tree on this host's disk standing in for a sandbox's
//! root. Baselines in the same run: plain `std::fs` calls on the same files (no in-root resolution,
//! no atomic replace) and GNU tar for archives.
//!
//! `cargo bench -p sandbox --bench files_api` (as root)

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use sandbox::files::{SandboxRoot, WriteOptions};
use sandbox::userns::IdMap;

const SAMPLES: usize = 1000;
const TREE_ROUNDS: usize = 7;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, mut samples: Vec<f64>, unit: &str) -> f64 {
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    println!("{what:<48} {p50:>10.1} {p99:>10.1} {unit}");
    p50
}

fn us(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e6
}

fn gnu_tar(args: &[&str], dir: &Path) {
    let status = Command::new("tar").arg("-C").arg(dir).args(args).status().unwrap();
    assert!(status.success());
}

fn main() {
    let dir = tempfile::Builder::new().prefix("deltabox-files-bench-").tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("tmp")).unwrap();
    let files = SandboxRoot::open(&root, IdMap { host_base: 3_000_000, count: 65536 }).unwrap();
    let data = vec![b'x'; 4096];
    println!("{:<48} {:>10} {:>10}", "operation", "p50", "p99");

    let (mut write, mut replace, mut baseline, mut stat, mut read) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..SAMPLES {
        let path = format!("/tmp/new{i}");
        let t = Instant::now();
        files.write(&path, &mut &data[..], &WriteOptions::default()).unwrap();
        write.push(us(t));
        let t = Instant::now();
        files.write(&path, &mut &data[..], &WriteOptions::default()).unwrap();
        replace.push(us(t));
        let t = Instant::now();
        fs::write(root.join(format!("tmp/new{i}")), &data).unwrap();
        baseline.push(us(t));
        let t = Instant::now();
        files.stat(&path).unwrap();
        stat.push(us(t));
        let t = Instant::now();
        let (mut file, _) = files.open_read(&path).unwrap();
        file.read_to_end(&mut Vec::with_capacity(4096)).unwrap();
        read.push(us(t));
    }
    row("write 4 KiB, new file", write, "us");
    let ours = row("write 4 KiB over an existing file", replace, "us");
    let base = row("  baseline: std::fs::write of the same file", baseline, "us");
    println!("  ratio {:.2}x", ours / base);
    row("stat", stat, "us");
    row("open_read + read 4 KiB", read, "us");
    let mut list = vec![];
    for _ in 0..SAMPLES / 10 {
        let t = Instant::now();
        files.list("/tmp").unwrap();
        list.push(us(t));
    }
    row(&format!("list a directory of {SAMPLES} files"), list, "us");

    // 50 directories of 100 files of 1 KiB.
    let src = root.join("src");
    for d in 0..50 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            fs::write(src.join(format!("d{d}/f{f}")), &data[..1024]).unwrap();
        }
    }
    let gnu_archive = dir.path().join("gnu.tar");
    let mut archive = Vec::new();
    let (mut ours_c, mut gnu_c, mut ours_x, mut gnu_x) = (vec![], vec![], vec![], vec![]);
    for round in 0..TREE_ROUNDS {
        archive.clear();
        let t = Instant::now();
        files.write_tar("/src", &mut archive).unwrap();
        ours_c.push(us(t) / 1e3);
        let t = Instant::now();
        gnu_tar(&["-cf", gnu_archive.to_str().unwrap(), "."], &src);
        gnu_c.push(us(t) / 1e3);
        let t = Instant::now();
        files.extract_tar(&format!("/x{round}"), &mut &archive[..]).unwrap();
        ours_x.push(us(t) / 1e3);
        let out = dir.path().join(format!("gnu{round}"));
        fs::create_dir(&out).unwrap();
        let t = Instant::now();
        gnu_tar(&["-xf", gnu_archive.to_str().unwrap()], &out);
        gnu_x.push(us(t) / 1e3);
    }
    let ours = row("write_tar of 5,000 files in 50 dirs", ours_c, "ms");
    let base = row("  baseline: GNU tar -c", gnu_c, "ms");
    println!("  ratio {:.2}x", ours / base);
    let ours = row("extract_tar of the same", ours_x, "ms");
    let base = row("  baseline: GNU tar -x", gnu_x, "ms");
    println!("  ratio {:.2}x", ours / base);
}
