//! A multi-threaded program (python with 4 counting threads) is restored with all its threads, their
//! tids, and counters that continue from the checkpoint.

mod common;

use common::{number_rows, python, wait_for, PidNs};
use deltacr::Engine;

const THREADS: &str = r#"
import sys, threading, time
out = open(sys.argv[1], "a")
counts = [0, 0, 0, 0]
def work(k):
    while True:
        counts[k] += 1
        if counts[k] % 1000 == 0:
            time.sleep(0.001)
for k in range(4):
    threading.Thread(target=work, args=(k,), daemon=True).start()
while True:
    out.write(" ".join(str(c) for c in counts) + "\n")
    out.flush()
    time.sleep(0.005)
"#;

fn ns_tids(ns: &PidNs, pid: i32) -> Vec<i32> {
    let host = ns.host_pid(pid);
    let mut tids: Vec<i32> = deltacr::procfs::tasks(host)
        .unwrap()
        .into_iter()
        .map(|t| deltacr::procfs::Status::read_thread(host, t).unwrap().innermost("NSpid").unwrap())
        .collect();
    tids.sort();
    tids
}

#[test]
fn threads_are_restored_with_their_tids_and_state() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let py = python();
    let (pid, _) = ns.spawn(&[&py, "-c", THREADS, out.to_str().unwrap()], None, false);
    wait_for(|| (number_rows(&out).len() > 5).then_some(()));
    let tids = ns_tids(&ns, pid);
    assert_eq!(tids.len(), 5);

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at_ckpt = number_rows(&out).last().unwrap().clone();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert_eq!(ckpt.stats.threads, 5);
    let n = number_rows(&out).len();
    wait_for(|| (number_rows(&out).len() > n + 20).then_some(()));
    let max_before = number_rows(&out).last().unwrap().clone();

    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        let before = number_rows(&out).len();
        engine.restore(&ckpt, &sb).unwrap();
        wait_for(|| (number_rows(&out).len() > before + 2).then_some(()));
        assert_eq!(ns_tids(&ns, pid), tids);
        let first = &number_rows(&out)[before];
        for k in 0..4 {
            assert!(first[k] >= at_ckpt[k], "thread {k} went back: {first:?} < {at_ckpt:?}");
            assert!(first[k] < max_before[k], "thread {k} did not restart from the checkpoint: {first:?}");
        }
        // The threads keep running after the restore.
        let later = wait_for(|| {
            let r = number_rows(&out);
            let last = r.last().unwrap().clone();
            (0..4).all(|k| last[k] > first[k]).then_some(last)
        });
        assert_eq!(later.len(), 4);
    }
}
