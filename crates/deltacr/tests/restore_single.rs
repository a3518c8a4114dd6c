//! Checkpoint a single-threaded program, let it run on, kill it, restore: it continues from the
//! checkpoint with the same pid, memory, fds and file offsets.

mod common;

use common::{python, wait_for, wait_for_content, PidNs};
use deltacr::Engine;

/// Appends a counter to a file every 5 ms; each line also carries a checksum of 8 MB of memory that
/// the loop rewrites, so a restore with wrong memory shows.
const COUNTER: &str = r#"
import sys, time, zlib
out = open(sys.argv[1], "a")
buf = bytearray(8 << 20)
i = 0
while True:
    i += 1
    buf[(i * 4096) % len(buf)] = i % 251
    out.write("%d %d\n" % (i, zlib.crc32(buf)))
    out.flush()
    time.sleep(0.005)
"#;

fn lines(path: &std::path::Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            (
                it.next().unwrap().parse().unwrap(),
                it.next().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_restored_process_continues_from_the_checkpoint() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let py = python();
    let (pid, host) = ns.spawn(&[&py, "-c", COUNTER, out.to_str().unwrap()], None, false);
    wait_for_content(&out, "\n5 ");

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    sb.freezer.freeze().unwrap();
    let at_checkpoint = lines(&out);
    let ckpt = engine.checkpoint(&sb).unwrap();
    assert_eq!(ckpt.tree.processes.len(), 1);
    assert_eq!(ckpt.tree.processes[0].pid, pid);
    let (n, crc_n) = *at_checkpoint.last().unwrap();

    // The live process was not disturbed.
    let m = n + 20;
    wait_for(|| lines(&out).iter().any(|&(i, _)| i == m).then_some(()));
    let later = lines(&out);

    for round in 0..2 {
        engine.kill_processes(&sb).unwrap();
        assert!(
            nix::sys::signal::kill(host, None).is_err(),
            "live process is gone"
        );
        let before = lines(&out).len();
        engine.restore(&ckpt, &sb).unwrap();
        let restored = ns.host_pid(pid);
        wait_for(|| (lines(&out).len() >= before + 3).then_some(()));
        let now = lines(&out);
        // Continues right after the checkpoint's last line, with the same memory contents.
        assert_eq!(
            now[before].0,
            n + 1,
            "round {round}: {:?}",
            &now[before - 2..]
        );
        let expected_crc = later.iter().find(|&&(i, _)| i == n + 1).unwrap().1;
        assert_eq!(
            now[before].1, expected_crc,
            "round {round}: memory differs after restore"
        );
        assert_ne!(crc_n, 0);
        let cmdline = std::fs::read(format!("/proc/{restored}/cmdline")).unwrap();
        assert!(cmdline.starts_with(py.as_bytes()));
    }
}
