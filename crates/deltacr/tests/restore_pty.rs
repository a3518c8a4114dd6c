//! Processes on a pty whose master (the shim's) is closed, or restored into another sandbox: the restore
//! makes a pty with the same number and hands its master over; when that is impossible (or the number
//! belongs to another terminal now), their fds on it become /dev/null, they lose it as controlling
//! terminal, and the restore says so.

mod common;

use std::path::Path;

use std::os::unix::fs::OpenOptionsExt;

use common::{python, read_until, wait_for, PidNs, Term, BASH_ON_PTY};
use deltacr::image::ImageStore;
use deltacr::state::FileKind;
use deltacr::{Degraded, Engine, PtyLoss};

/// A session leader that takes the terminal argv[2] as its controlling terminal and stdio, ignores
/// SIGHUP (as `nohup` does), says "up" on it and then counts into the file argv[1].
const ON_PTY: &str = r#"
import os, signal, sys, time
signal.signal(signal.SIGHUP, signal.SIG_IGN)
fd = os.open(sys.argv[2], os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(fd, i)
os.close(fd)
os.write(1, b"up\n")
out = open(sys.argv[1], "a")
i = 0
while True:
    i += 1
    out.write("%d\n" % i)
    out.flush()
    time.sleep(0.005)
"#;

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().count()
}

/// The fd targets of a process, as the host sees them.
fn fd_link(host: nix::unistd::Pid, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{host}/fd/{fd}")).unwrap().to_string_lossy().into_owned()
}

/// The controlling terminal of a process (tty_nr of /proc/PID/stat; 0 = none).
fn tty_nr(host: nix::unistd::Pid) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{host}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    after_comm.split(' ').nth(4).unwrap().parse().unwrap()
}

/// Starts ON_PTY on a new pty of `ns`; returns the master, the program's pid and its output file.
fn start_on_pty(ns: &mut PidNs) -> (std::fs::File, i32, std::path::PathBuf) {
    let (mut master, index) = ns.open_pty();
    let out = ns.path("out");
    let py = python();
    let (pid, host) = ns.spawn(&[&py, "-c", ON_PTY, out.to_str().unwrap(), &format!("/dev/pts/{index}")], None, true);
    read_until(&mut master, "up");
    assert_ne!(tty_nr(host), 0, "the program has its controlling terminal");
    (master, pid, out)
}

/// Kills the tree, restores `ckpt`, checks the program counts on with /dev/null as stdio and no
/// controlling terminal, and returns what the restore reported as degraded.
fn restore_on_dev_null(
    engine: &mut Engine,
    ns: &PidNs,
    ckpt: &deltacr::Checkpoint,
    pid: i32,
    out: &Path,
) -> Vec<Degraded> {
    let sb = ns.sandbox();
    engine.kill_processes(&sb).unwrap();
    let before = lines(out);
    let stats = engine.restore(ckpt, &sb).unwrap();
    wait_for(|| (lines(out) > before + 3).then_some(()));
    let host = ns.host_pid(pid);
    for fd in 0..3 {
        assert_eq!(fd_link(host, fd), "/dev/null", "fd {fd}");
    }
    assert_eq!(tty_nr(host), 0, "no controlling terminal");
    stats.degraded
}

#[test]
fn a_terminal_hung_up_before_the_checkpoint_becomes_dev_null() {
    let mut ns = PidNs::with_own_dev();
    let (master, pid, out) = start_on_pty(&mut ns);
    let host = ns.host_pid(pid);
    drop(master);
    wait_for(|| fd_link(host, 0).ends_with(" (deleted)").then_some(()));

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert!(
        ckpt.tree.files.iter().any(|f| matches!(f.kind, FileKind::HungUpTty { index: 0, .. })),
        "{:?}",
        ckpt.tree.files
    );
    for _ in 0..2 {
        let degraded = restore_on_dev_null(&mut engine, &ns, &ckpt, pid, &out);
        let fds: Vec<Option<i32>> = degraded.iter().map(|d| d.fd).collect();
        assert_eq!(fds, [Some(0), Some(1), Some(2)], "{degraded:?}");
        assert!(degraded.iter().all(|d| d.pid == pid && d.reason == PtyLoss::HungUp && d.path == "/dev/pts/0"));
    }
}

#[test]
fn a_terminal_whose_number_went_to_another_terminal_is_not_taken_over() {
    let mut ns = PidNs::with_own_dev();
    let (master, pid, out) = start_on_pty(&mut ns);
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    // The session's client leaves; once the tree is killed, a new session gets pty 0.
    drop(master);
    engine.kill_processes(&sb).unwrap();
    let (other, index) = ns.open_pty();
    assert_eq!(index, 0);
    for _ in 0..2 {
        let degraded = restore_on_dev_null(&mut engine, &ns, &ckpt, pid, &out);
        let fds: Vec<Option<i32>> = degraded.iter().map(|d| d.fd).collect();
        assert_eq!(fds, [Some(0), Some(1), Some(2), None], "fds and the controlling terminal: {degraded:?}");
        assert!(degraded.iter().all(|d| d.reason == PtyLoss::Taken), "{degraded:?}");
        assert!(degraded[3].to_string().contains("lost its controlling terminal /dev/pts/0"), "{}", degraded[3]);
    }
    drop(other);
}

#[test]
fn a_shell_whose_terminal_was_closed_gets_a_pty_with_its_number_again() {
    let mut ns = PidNs::with_own_dev();
    let (master, index) = ns.open_pty();
    let py = python();
    ns.spawn(&[&py, "-c", BASH_ON_PTY, &format!("/dev/pts/{index}")], None, true);
    let mut t = Term::new(master);
    t.run("X=41; stty cols 91 rows 31; echo \"ok$((1+1))\"", "ok2");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    // The client leaves: the shim closes the master and bash dies of the hangup.
    drop(t);
    engine.kill_processes(&sb).unwrap();
    let mut stats = engine.restore(&ckpt, &sb).unwrap();
    assert!(stats.degraded.is_empty(), "{:?}", stats.degraded);
    assert_eq!(stats.pty_masters.keys().copied().collect::<Vec<_>>(), [index]);
    let mut t = Term::new(stats.pty_masters.remove(&index).unwrap());
    let out = t.run("echo \"V$((X+1)):$(tty):$(stty size)\"", "V42:");
    assert!(out.contains(&format!("V42:/dev/pts/{index}:31 91")), "{out:?}");
    // Restored again while the shim serves the pty made by the first restore: it is reused.
    engine.kill_processes(&sb).unwrap();
    let stats = engine.restore(&ckpt, &sb).unwrap();
    assert!(stats.degraded.is_empty() && stats.pty_masters.is_empty(), "{stats:?}");
    let out = t.run("echo \"W$((X+2)):$(tty)\"", "W43:");
    assert!(out.contains(&format!("W43:/dev/pts/{index}")), "{out:?}");
}

/// The entries of a namespace's /dev/pts.
fn pts_entries(ns: &PidNs) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(ns.inside(Path::new("/dev/pts")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_shell_forked_into_another_sandbox_gets_its_pty_made_there() {
    let mut a = PidNs::with_own_dev();
    let mut masters: Vec<(std::fs::File, u32)> = (0..3).map(|_| a.open_pty()).collect();
    let (master, index) = masters.pop().unwrap();
    assert_eq!(index, 2);
    let py = python();
    a.spawn(&[&py, "-c", BASH_ON_PTY, "/dev/pts/2"], None, true);
    let mut t = Term::new(master);
    t.run("X=41; stty cols 77 rows 33; echo \"ok$((1+1))\"", "ok2");
    let mut engine = Engine::new();
    let sb = a.sandbox();
    let mut frozen = deltacr::Frozen::new(&a.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let store = ImageStore::new(&a.path("images")).unwrap();
    let id = ckpt.image_job(None).unwrap().write(&store).unwrap().id;

    let b = PidNs::with_own_dev();
    assert_eq!(pts_entries(&b), ["ptmx"]);
    let mut stats = engine.restore_image(store.open_chain(id).unwrap(), &b.sandbox(), None).unwrap();
    assert!(stats.degraded.is_empty(), "{:?}", stats.degraded);
    assert_eq!(stats.pty_masters.keys().copied().collect::<Vec<_>>(), [2]);
    assert_eq!(pts_entries(&b), ["2", "ptmx"], "ptys 0 and 1, made on the way, are gone again");
    let mut tb = Term::new(stats.pty_masters.remove(&2).unwrap());
    let out = tb.run("echo \"V$((X+1)):$(tty):$(stty size)\"", "V42:");
    assert!(out.contains("V42:/dev/pts/2:33 77"), "{out:?}");
    // The original runs on in its own sandbox.
    let out = t.run("echo \"A$((X+2))\"", "A43");
    assert!(out.contains("A43"), "{out:?}");
}

#[test]
fn a_pty_number_still_in_use_without_its_node_cannot_be_made() {
    let mut a = PidNs::with_own_dev();
    let (_master, pid, out) = start_on_pty(&mut a);
    let mut engine = Engine::new();
    let sb = a.sandbox();
    let mut frozen = deltacr::Frozen::new(&a.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let store = ImageStore::new(&a.path("images")).unwrap();
    let id = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    engine.kill_processes(&sb).unwrap();

    // In the other sandbox pty 0 has lost its node (master closed) but a slave keeps its number.
    let b = PidNs::with_own_dev();
    let (master, index) = b.open_pty();
    assert_eq!(index, 0);
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(b.inside(Path::new("/dev/pts/0")))
        .unwrap();
    drop(master);
    assert_eq!(pts_entries(&b), ["ptmx"]);
    let before = lines(&out);
    let stats = engine.restore_image(store.open_chain(id).unwrap(), &b.sandbox(), None).unwrap();
    assert!(stats.pty_masters.is_empty());
    assert_eq!(stats.degraded.len(), 4, "fds 0-2 and the controlling terminal: {:?}", stats.degraded);
    for d in &stats.degraded {
        assert!(matches!(&d.reason, PtyLoss::CannotCreate(why) if why.contains("still in use")), "{d}");
    }
    assert_eq!(pts_entries(&b), ["ptmx"], "the pty made on the way is gone again");
    wait_for(|| (lines(&out) > before + 3).then_some(()));
    let host = b.host_pid(pid);
    assert_eq!(fd_link(host, 1), "/dev/null");
    assert_eq!(tty_nr(host), 0);
    drop(slave);
}
