//! Sessions and process groups whose leader has exited come back exactly: background jobs of a shell
//! that has exited (`sh -c 'server &'`, as `deltabox exec` leaves them), the jobs of a job-control
//! shell (alive or exited), `(cmd &)` in a shell, a group led by a zombie, and zombies in their
//! parent's group. Restored from templates (repeatedly) and from the image.

mod common;

use std::path::{Path, PathBuf};

use common::{counter_lines, number_rows, python, wait_for, PidNs, COUNTER};
use deltacr::state::{ProcessEntry, ProcessKind, TreeState};
use deltacr::{Checkpoint, Engine};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Appends 1, 2, 3, ... to the file argv[1], one line every 5 ms.
const TICK: &str = r#"
import sys, time
out = open(sys.argv[1], "a")
i = 0
while True:
    i += 1
    out.write("%d\n" % i)
    out.flush()
    time.sleep(0.005)
"#;

/// Writes 1, 2, 3, ... to stdout, one line every 3 ms.
const PRODUCE: &str = r#"
import sys, time
i = 0
while True:
    i += 1
    sys.stdout.write("%d\n" % i)
    sys.stdout.flush()
    time.sleep(0.003)
"#;

/// Copies the lines of stdin to the file argv[1].
const CONSUME: &str = r#"
import sys
out = open(sys.argv[1], "a")
for line in sys.stdin:
    out.write(line)
    out.flush()
"#;

/// A session leader (argv[1] is a directory) with: a zombie child `z` that led its own group and left a
/// ticking child in it (writing to z.out; now a child of init), and a child `q` leading its own group
/// with a zombie child of its own; both the leader (p.out) and q (q.out) tick. Nobody reaps.
const ZOMBIES: &str = r#"
import os, sys, time
d = sys.argv[1]
def tick(name):
    out = open(os.path.join(d, name), "a")
    i = 0
    while True:
        i += 1
        out.write("%d\n" % i)
        out.flush()
        time.sleep(0.005)
if os.fork() == 0:
    os.setpgid(0, 0)
    if os.fork() == 0:
        tick("z.out")
    os._exit(3)
if os.fork() == 0:
    os.setpgid(0, 0)
    if os.fork() == 0:
        os._exit(5)
    tick("q.out")
tick("p.out")
"#;

fn script(ns: &PidNs, name: &str, code: &str) -> PathBuf {
    let path = ns.path(name);
    std::fs::write(&path, code).unwrap();
    path
}

fn last(path: &Path) -> u64 {
    number_rows(path).last().map_or(0, |r| r[0])
}

/// (pid, ppid, pgid, sid) of every process of the tree.
fn ids(tree: &TreeState) -> Vec<(i32, i32, i32, i32)> {
    tree.processes.iter().map(|p| (p.pid, p.ppid, p.pgid, p.sid)).collect()
}

/// Checks that every process of the checkpoint is back with its parent, group and session.
fn check_ids(ns: &PidNs, procs: &[ProcessEntry], round: usize) {
    for p in procs {
        let got = deltacr::capture::ns_ids(ns.host_pid(p.pid)).unwrap();
        assert_eq!((got.ppid, got.pgid, got.sid), (p.ppid, p.pgid, p.sid), "round {round}: {} ({})", p.pid, p.comm);
    }
}

/// Waits until no process of the namespace has pid `pid` (helpers are gone, and reaped).
fn wait_gone(ns: &PidNs, pid: i32) {
    wait_for(|| (!ns.processes().iter().any(|&(_, p)| p == pid)).then_some(()));
}

/// Restores `ckpt` from its templates twice (the second time with spares), then from its image.
/// `before` runs once the processes are killed (their output files stand still), `check` after each
/// restore with what `before` said. Returns how many processes took over a spare.
fn restore_rounds<B>(
    ns: &PidNs,
    engine: &mut Engine,
    ckpt: Checkpoint,
    mut before: impl FnMut() -> B,
    mut check: impl FnMut(&Checkpoint, usize, B),
) -> usize {
    let sb = ns.sandbox();
    let store = deltacr::image::ImageStore::new(&ns.path("images")).unwrap();
    let image = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    let mut from_spares = 0;
    for round in 0..3 {
        if round == 1 {
            engine.prepare_spares(&ckpt, &sb).unwrap();
        }
        engine.kill_processes(&sb).unwrap();
        let seen = before();
        if round < 2 {
            let stats = engine.restore(&ckpt, &sb).unwrap();
            assert_eq!(stats.from_spares > 0, round == 1 && from_spares_expected(&ckpt), "round {round}");
            from_spares += stats.from_spares;
        } else {
            let chain = store.open_chain(image).unwrap();
            engine.restore_image(chain, &sb, None).unwrap();
        }
        check(&ckpt, round, seen);
    }
    from_spares
}

/// Whether a restore with spares uses one: spares are made for children of init, and one is taken
/// over by a child of init restored from its template or by a session helper's copy-on-write member.
fn from_spares_expected(ckpt: &Checkpoint) -> bool {
    ckpt.tree.processes.iter().any(|p| p.ppid == 1 && matches!(p.kind, ProcessKind::Live(_)))
}

/// Restores (see [`restore_rounds`]) and checks that every process is back with its ids and that
/// every ticker (`outs`, whose last values at checkpoint time were `at`) continues where it was.
fn restore_and_check(
    ns: &PidNs,
    engine: &mut Engine,
    ckpt: Checkpoint,
    procs: &[ProcessEntry],
    outs: &[PathBuf],
    at: &[u64],
) {
    let row_counts = || outs.iter().map(|o| number_rows(o).len()).collect::<Vec<_>>();
    let _ = restore_rounds(ns, engine, ckpt, row_counts, |_, round, before| {
        check_ids(ns, procs, round);
        for ((o, b), a) in outs.iter().zip(&before).zip(at) {
            wait_for(|| (number_rows(o).len() > *b).then_some(()));
            assert_eq!(number_rows(o)[*b][0], a + 1, "round {round}: {} continues", o.display());
        }
    });
}

#[test]
fn background_jobs_of_an_exited_shell_are_restored() {
    background_jobs_of_an_exited_shell(PidNs::new());
}

#[test]
fn background_jobs_of_an_exited_shell_are_restored_in_a_user_namespace() {
    background_jobs_of_an_exited_shell(PidNs::user_namespaced());
}

/// `sh -c 'a & b | c & exit'` run as its own session (as `deltabox exec` runs commands): a, b and c
/// stay in the shell's session and process group after it exits, as children of init.
fn background_jobs_of_an_exited_shell(mut ns: PidNs) {
    let py = python();
    let (counter, produce, consume) =
        (script(&ns, "counter.py", COUNTER), script(&ns, "produce.py", PRODUCE), script(&ns, "consume.py", CONSUME));
    let (out_a, out_c) = (ns.path("a.out"), ns.path("c.out"));
    let cmd = format!(
        "{py} {} {} & {py} {} | {py} {} {} & exit 0",
        counter.display(),
        out_a.display(),
        produce.display(),
        consume.display(),
        out_c.display()
    );
    let sh = ns.start(&["sh", "-c", &cmd], Some(&ns.path("log")), true);
    wait_for(|| (counter_lines(&out_a).len() > 5 && last(&out_c) > 5).then_some(()));
    wait_gone(&ns, sh);

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let (a0, c0) = (counter_lines(&out_a).len(), last(&out_c));
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let procs = ckpt.tree.processes.clone();
    assert_eq!(
        ids(&ckpt.tree).iter().map(|&(_, ppid, pgid, sid)| (ppid, pgid, sid)).collect::<Vec<_>>(),
        [(1, sh, sh); 3]
    );
    // What the original writes next, to compare the restored counter's memory with.
    wait_for(|| (counter_lines(&out_a).len() > a0 + 1).then_some(()));
    let next_a = counter_lines(&out_a)[a0];

    let counts = || (counter_lines(&out_a).len(), number_rows(&out_c).len());
    let from_spares = restore_rounds(&ns, &mut engine, ckpt, counts, |ckpt, round, (a_before, c_before)| {
        check_ids(&ns, &procs, round);
        // The helper that re-created the session is gone.
        wait_gone(&ns, sh);
        wait_for(|| (counter_lines(&out_a).len() > a_before && number_rows(&out_c).len() > c_before).then_some(()));
        assert_eq!(counter_lines(&out_a)[a_before], next_a, "round {round}: the counter continues with its memory");
        assert_eq!(number_rows(&out_c)[c_before][0], c0 + 1, "round {round}: the pipeline continues");
        // A signal to the process group reaches every restored member, and no template.
        let pgid = deltacr::capture::host_pgid(ns.host_pid(procs[0].pid)).unwrap();
        killpg(Pid::from_raw(pgid), Signal::SIGKILL).unwrap();
        for p in &procs {
            wait_gone(&ns, p.pid);
        }
        assert_eq!(ckpt.lost_templates(), Vec::<i32>::new(), "round {round}");
    });
    // The session helper's copy-on-write member took over its template's spare.
    assert_eq!(from_spares, 1);
}

/// Job-control shells: one alive with two jobs (one a pipeline), one that exited leaving its jobs in
/// their groups, one alive with `(job &)` whose subshell (the group's leader) exited, and a background
/// job of a shell in init's session (no setsid) that exited.
#[test]
fn process_groups_of_job_control_shells_are_restored() {
    let mut ns = PidNs::new();
    let py = python();
    let tick = script(&ns, "tick.py", TICK);
    let t = |n: u32| format!("{py} {} {}", tick.display(), ns.path(&format!("{n}.out")).display());
    let shells = [
        (format!("set -m; {} & {} | {} & wait", t(1), t(2), t(3)), true),
        (format!("set -m; {} & {} | {} & exit 0", t(4), t(5), t(6)), true),
        (format!("set -m; ({} &); {}", t(7), t(8)), true),
        (format!("{} & exit 0", t(9)), false),
    ];
    for (cmd, setsid) in &shells {
        ns.start(&["bash", "-c", cmd], None, *setsid);
    }
    let outs: Vec<PathBuf> = (1..=9).map(|n| ns.path(&format!("{n}.out"))).collect();
    wait_for(|| outs.iter().all(|o| last(o) > 3).then_some(()));
    // The two exited shells are gone (their children may have been reparented a moment ago).
    std::thread::sleep(std::time::Duration::from_millis(50));

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at: Vec<u64> = outs.iter().map(|o| last(o)).collect();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let procs = ckpt.tree.processes.clone();
    let has = |pid: i32| procs.iter().any(|p| p.pid == pid);
    let orphaned_groups = procs.iter().filter(|p| p.pgid > 1 && !has(p.pgid)).count();
    let orphaned_sessions = procs.iter().filter(|p| p.sid > 1 && !has(p.sid)).count();
    assert_eq!((orphaned_groups, orphaned_sessions), (2, 3), "{:?}", ids(&ckpt.tree));

    restore_and_check(&ns, &mut engine, ckpt, &procs, &outs, &at);
}

/// A group whose leader is a zombie keeps its member (a child of init in the zombie's parent's
/// session), and a zombie that is not a group leader is back in its parent's group.
#[test]
fn groups_led_by_zombies_and_zombies_in_groups_are_restored() {
    let mut ns = PidNs::new();
    let dir = ns.path("z");
    std::fs::create_dir(&dir).unwrap();
    let zombies = script(&ns, "zombies.py", ZOMBIES);
    ns.spawn(&[&python(), zombies.to_str().unwrap(), dir.to_str().unwrap()], None, true);
    let outs: Vec<PathBuf> = ["p.out", "q.out", "z.out"].iter().map(|n| dir.join(n)).collect();
    wait_for(|| outs.iter().all(|o| last(o) > 3).then_some(()));

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at: Vec<u64> = outs.iter().map(|o| last(o)).collect();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let procs = ckpt.tree.processes.clone();
    let zombie_pgids: Vec<bool> =
        procs.iter().filter(|p| matches!(p.kind, ProcessKind::Zombie { .. })).map(|z| z.pgid == z.pid).collect();
    assert_eq!(zombie_pgids.len(), 2, "{:?}", ids(&ckpt.tree));
    assert!(zombie_pgids.contains(&true) && zombie_pgids.contains(&false), "{:?}", ids(&ckpt.tree));

    restore_and_check(&ns, &mut engine, ckpt, &procs, &outs, &at);
}
