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
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at_checkpoint = counter_lines(&out);
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert_eq!(ckpt.tree.processes.len(), 1);
    assert_eq!(ckpt.tree.processes[0].pid, pid);
    let (n, crc_n) = *at_checkpoint.last().unwrap();

    // The live process was not disturbed.
    let m = n + 20;
    wait_for(|| counter_lines(&out).iter().any(|&(i, _)| i == m).then_some(()));
    let later = counter_lines(&out);

    // Rounds 1 and 3 take over a spare prepared before them (and the spare is used up).
    for round in 0..4 {
        let spare = round % 2 == 1;
        if spare {
            assert_eq!(engine.prepare_spares(&ckpt, &sb).unwrap(), 1);
            assert_eq!(engine.prepare_spares(&ckpt, &sb).unwrap(), 0, "it has one already");
        }
        engine.kill_processes(&sb).unwrap();
        assert!(nix::sys::signal::kill(host, None).is_err(), "live process is gone");
        let before = counter_lines(&out).len();
        let stats = engine.restore(&ckpt, &sb).unwrap();
        assert_eq!(stats.from_spares, usize::from(spare), "round {round}");
        let restored = ns.host_pid(pid);
        // init's children: the pid helper, the template, the restored process and, after a restore from a
        // spare, the spare, which holds the process's memory until the process is killed.
        let children = |engine: &mut Engine| {
            engine.tidy();
            deltacr::procfs::children(ns.init).unwrap().len()
        };
        let expected = if spare { 4 } else { 3 };
        wait_for(|| (children(&mut engine) == expected).then_some(()));
        wait_for(|| (counter_lines(&out).len() >= before + 3).then_some(()));
        let now = counter_lines(&out);
        // Continues right after the checkpoint's last line, with the same memory contents.
        assert_eq!(now[before].0, n + 1, "round {round}: {:?}", &now[before - 2..]);
        let expected_crc = later.iter().find(|&&(i, _)| i == n + 1).unwrap().1;
        assert_eq!(now[before].1, expected_crc, "round {round}: memory differs after restore");
        assert_ne!(crc_n, 0);
        let cmdline = std::fs::read(format!("/proc/{restored}/cmdline")).unwrap();
        assert!(cmdline.starts_with(py.as_bytes()));
    }
    // The last round's process ends on its own: tidy lets its holder go.
    nix::sys::signal::kill(ns.host_pid(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_for(|| {
        engine.tidy();
        (deltacr::procfs::children(ns.init).unwrap().len() == 2).then_some(())
    });
}

#[test]
fn a_process_in_a_user_namespace_with_docker_capabilities_is_restored() {
    let mut ns = PidNs::user_namespaced();
    let out = ns.path("out");
    let (pid, host) = ns.spawn(&[common::SYSTEM_PYTHON, "-c", COUNTER, out.to_str().unwrap()], None, false);
    wait_for_content(&out, "\n5 ");
    let status = std::fs::read_to_string(format!("/proc/{host}/status")).unwrap();
    assert!(status.contains("CapEff:\t00000000a80425fb"), "Docker's capabilities: {status}");
    assert!(status.contains("Seccomp_filters:\t1"), "a seccomp filter: {status}");
    let own_userns = std::fs::read_link("/proc/self/ns/user").unwrap();
    assert_ne!(std::fs::read_link(format!("/proc/{host}/ns/user")).unwrap(), own_userns, "in its own user namespace");
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at = counter_lines(&out);
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let n = at.last().unwrap().0;
    wait_for(|| counter_lines(&out).iter().any(|&(i, _)| i == n + 10).then_some(()));
    let later = counter_lines(&out);
    // The second round takes over a spare (clone(CLONE_VM) passes the seccomp filter).
    for round in 0..2 {
        if round == 1 {
            assert_eq!(engine.prepare_spares(&ckpt, &sb).unwrap(), 1);
        }
        engine.kill_processes(&sb).unwrap();
        let before = counter_lines(&out).len();
        assert_eq!(engine.restore(&ckpt, &sb).unwrap().from_spares, round);
        wait_for(|| (counter_lines(&out).len() > before).then_some(()));
        let expected = later.iter().find(|&&(i, _)| i == n + 1).unwrap();
        assert_eq!(counter_lines(&out)[before], *expected);
        let restored = ns.host_pid(pid);
        let st = std::fs::read_to_string(format!("/proc/{restored}/status")).unwrap();
        assert!(st.contains("CapEff:\t00000000a80425fb"), "capabilities are kept: {st}");
        assert!(st.contains("Seccomp:\t2") && st.contains("Seccomp_filters:\t1"), "the filter is kept: {st}");
    }
}
