//! Checkpoint a single-threaded program, let it run on, kill it, restore: it continues from the
//! checkpoint with the same pid, memory, fds and file offsets.

mod common;

use common::{counter_lines, python, wait_for, wait_for_content, PidNs, COUNTER};
use deltacr::Engine;

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
    let at_checkpoint = counter_lines(&out);
    let ckpt = engine.checkpoint(&sb).unwrap();
    assert_eq!(ckpt.tree.processes.len(), 1);
    assert_eq!(ckpt.tree.processes[0].pid, pid);
    let (n, crc_n) = *at_checkpoint.last().unwrap();

    // The live process was not disturbed.
    let m = n + 20;
    wait_for(|| {
        counter_lines(&out)
            .iter()
            .any(|&(i, _)| i == m)
            .then_some(())
    });
    let later = counter_lines(&out);

    for round in 0..2 {
        engine.kill_processes(&sb).unwrap();
        assert!(
            nix::sys::signal::kill(host, None).is_err(),
            "live process is gone"
        );
        let before = counter_lines(&out).len();
        engine.restore(&ckpt, &sb).unwrap();
        let restored = ns.host_pid(pid);
        wait_for(|| (counter_lines(&out).len() >= before + 3).then_some(()));
        let now = counter_lines(&out);
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
