//! Every checkpoint reported complete survives a SIGKILL of the serving process at any moment.
mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use deltafs::{mount, MountOptions, StackId, Store};

const DIR_ENV: &str = "DELTAFS_KILL_TEST_DIR";

/// Run by `checkpoints_survive_sigkill` in a child process: writes and checkpoints until killed,
/// reporting each completed checkpoint on stdout.
#[test]
#[ignore = "helper process of checkpoints_survive_sigkill"]
fn child_writes_and_checkpoints_until_killed() {
    let dir = std::path::PathBuf::from(std::env::var(DIR_ENV).expect("run by the parent test"));
    let store = Store::open(&dir.join("store")).unwrap();
    let base = store.base_stack(&[dir.join("base")]).unwrap();
    let mnt = dir.join("mnt");
    let m = mount(&store, base, &mnt, &MountOptions::default()).unwrap();
    let mut out = std::io::stdout();
    for i in 0u64.. {
        std::fs::write(mnt.join(format!("f{i}")), content(i)).unwrap();
        std::fs::create_dir_all(mnt.join(format!("d{}", i % 5))).unwrap();
        std::fs::write(mnt.join(format!("d{}/x", i % 5)), content(i)).unwrap();
        let cp = m.checkpoint().unwrap();
        writeln!(out, "CHECKPOINT {cp} {i}").unwrap();
        out.flush().unwrap();
        // Uncheckpointed work in flight when the kill lands.
        std::fs::write(mnt.join("scratch"), vec![i as u8; 100_000]).unwrap();
    }
}

fn content(i: u64) -> Vec<u8> {
    format!("generation {i}\n").repeat((i % 50 + 1) as usize).into_bytes()
}

fn verify(store: &Store, cp: StackId, last: u64, mnt: &Path) {
    let m = mount(store, cp, mnt, &MountOptions::default()).unwrap();
    for i in 0..=last {
        assert_eq!(std::fs::read(mnt.join(format!("f{i}"))).unwrap(), content(i), "f{i} in {cp}");
    }
    assert!(!mnt.join(format!("f{}", last + 1)).exists());
    let newest_for_d = (0..=last).rev().find(|j| j % 5 == last % 5).unwrap();
    assert_eq!(std::fs::read(mnt.join(format!("d{}/x", last % 5))).unwrap(), content(newest_for_d));
    m.unmount().unwrap();
}

#[test]
fn checkpoints_survive_sigkill() {
    if !fuse_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("base")).unwrap();
    std::fs::write(dir.path().join("base/img"), b"image").unwrap();
    std::fs::create_dir_all(dir.path().join("mnt")).unwrap();
    std::fs::create_dir_all(dir.path().join("check")).unwrap();
    let mut reported: Vec<(StackId, u64)> = Vec::new();
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_writes_and_checkpoints_until_killed", "--ignored", "--nocapture"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = Vec::new();
        while seen.len() < 5 + round as usize * 7 {
            let line = lines.next().expect("child output").unwrap();
            if let Some(rest) = line.strip_prefix("CHECKPOINT ") {
                let (id, i) = rest.split_once(' ').unwrap();
                seen.push((id.parse::<StackId>().unwrap(), i.parse::<u64>().unwrap()));
            }
        }
        std::thread::sleep(Duration::from_micros(round * 1500));
        // Another process using the mount when its server dies.
        let mut user = Command::new("sleep").arg("30").current_dir(dir.path().join("mnt")).spawn().unwrap();
        child.kill().unwrap();
        // The killed process's own thread may be blocked on a request a dead server thread had
        // read: only aborting the connection lets it finish exiting. First found through the
        // other process's view of the mounts, then detached from ours.
        deltafs::abort_stale_mount(Some(user.id()), &dir.path().join("mnt")).unwrap();
        child.wait().unwrap();
        user.kill().unwrap();
        user.wait().unwrap();
        deltafs::abort_stale_mount(None, &dir.path().join("mnt")).unwrap();
        // Lines written before the kill landed are complete checkpoints too.
        for line in lines.map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("CHECKPOINT ") {
                let (id, i) = rest.split_once(' ').unwrap();
                seen.push((id.parse().unwrap(), i.parse().unwrap()));
            }
        }
        reported.extend(seen);
        let store = Store::open(&dir.path().join("store")).unwrap();
        let keep: Vec<StackId> = reported.iter().map(|(id, _)| *id).collect();
        store.delete_unreferenced(&keep).unwrap();
        for (cp, last) in &reported {
            verify(&store, *cp, *last, &dir.path().join("check"));
        }
    }
}
