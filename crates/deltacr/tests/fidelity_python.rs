//! Fidelity: a python process holding ~200 MB of objects and 4 threads that keep counting; two
//! checkpoints, restored many times, the older one after the newer one.

mod common;

use common::{number_rows, python, wait_for, PidNs};
use deltacr::Engine;

const BIG: &str = r#"
import sys, threading, time
out = open(sys.argv[1], "a")
objs = [bytes([i % 256]) * 4096 for i in range(50000)]   # ~200 MB in 50k objects
counts = [0, 0, 0, 0]
def work(k):
    while True:
        counts[k] += 1
        if counts[k] % 1000 == 0:
            time.sleep(0.001)
for k in range(4):
    threading.Thread(target=work, args=(k,), daemon=True).start()
gen = 0
while True:
    gen += 1
    objs[gen % len(objs)] = bytes([gen % 256]) * 4096
    check = sum(o[0] for o in objs[:1000])
    out.write("%d %d %s\n" % (gen, check, " ".join(map(str, counts))))
    out.flush()
    time.sleep(0.01)
"#;

#[test]
fn big_threaded_python_restores_repeatedly_older_after_newer() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let py = python();
    let (pid, _) = ns.spawn(&[&py, "-c", BIG, out.to_str().unwrap()], None, false);
    wait_for(|| (number_rows(&out).len() > 3).then_some(()));
    let rss_kb = std::fs::read_to_string(format!("/proc/{}/status", ns.host_pid(pid)))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse::<u64>().unwrap()))
        .unwrap();
    assert!(rss_kb > 200_000, "the workload holds ~200 MB: {rss_kb} kB");

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let take = |engine: &mut Engine| {
        let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
        let last = number_rows(&out).last().unwrap().clone();
        (engine.checkpoint(&sb, &mut frozen).unwrap(), last)
    };
    let (c1, at1) = take(&mut engine);
    wait_for(|| (number_rows(&out).last().unwrap()[0] > at1[0] + 10).then_some(()));
    let (c2, at2) = take(&mut engine);
    wait_for(|| (number_rows(&out).last().unwrap()[0] > at2[0] + 10).then_some(()));
    let live = number_rows(&out);
    let expected_check = |gen: u64| live.iter().find(|r| r[0] == gen).map(|r| r[1]).unwrap();

    for (ckpt, at) in [(&c2, &at2), (&c1, &at1), (&c2, &at2), (&c1, &at1), (&c1, &at1), (&c2, &at2)] {
        engine.kill_processes(&sb).unwrap();
        let before = number_rows(&out).len();
        engine.restore(ckpt, &sb).unwrap();
        wait_for(|| (number_rows(&out).len() > before + 1).then_some(()));
        let first = number_rows(&out)[before].clone();
        assert_eq!(first[0], at[0] + 1, "continues right after its checkpoint");
        assert_eq!(first[1], expected_check(at[0] + 1), "objects are as at the checkpoint");
        for k in 0..4 {
            assert!(first[2 + k] >= at[2 + k], "thread {k} did not go back before the checkpoint");
        }
    }
}
