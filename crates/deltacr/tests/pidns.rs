//! The pid helper makes the next process of a pid namespace get the pid we ask for.

mod common;

use deltacr::pidns::PidSetter;
use deltacr::Engine;

#[test]
fn next_process_gets_the_requested_pid_and_the_counter_is_kept() {
    let mut ns = common::PidNs::new();
    let mut setter = PidSetter::spawn(ns.init).unwrap();
    assert!(setter.helper_pid() > 30000, "helper moved out of the way: {}", setter.helper_pid());
    let before = setter.last_pid().unwrap();
    assert!(before < 100, "the helper put the counter back: {before}");
    setter.set_next(4242).unwrap();
    let (pid, _) = ns.spawn(&["sleep", "100"], None, false);
    assert_eq!(pid, 4242);
    assert_eq!(setter.last_pid().unwrap(), 4242);
    setter.set_last_pid(before).unwrap();
    assert_eq!(setter.last_pid().unwrap(), before);
}

/// Templates (and spares) take pids from the reserved top of the range: a checkpoint does not change
/// the pids the sandbox hands out next, and a template made in one timeline never holds a pid that
/// a checkpoint of another timeline needs.
#[test]
fn templates_take_no_pid_the_sandbox_or_another_timeline_needs() {
    let mut ns = common::PidNs::new();
    let (p, _) = ns.spawn(&["sleep", "1000"], None, false);
    let mut engine = Engine::new();
    let first = {
        let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
        engine.checkpoint(&ns.sandbox(), &mut frozen).unwrap()
    };
    let (z1, _) = ns.spawn(&["sleep", "1001"], None, false);
    let (z2, _) = ns.spawn(&["sleep", "1002"], None, false);
    assert_eq!((z1, z2), (p + 1, p + 2), "the checkpoint took no pids");
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let second = engine.checkpoint(&sb, &mut frozen).unwrap();
    // Back to the first checkpoint, whose timeline makes a checkpoint (templates) of its own.
    engine.kill_processes(&sb).unwrap();
    engine.restore(&first, &sb).unwrap();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let other_timeline = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert_eq!(engine.prepare_spares(&other_timeline, &sb).unwrap(), 1);
    // The second checkpoint needs p+1 and p+2 again.
    engine.kill_processes(&sb).unwrap();
    engine.restore(&second, &sb).unwrap();
    let cmdline = |pid: i32| std::fs::read_to_string(format!("/proc/{}/cmdline", ns.host_pid(pid))).unwrap();
    assert_eq!([cmdline(z1), cmdline(z2)], ["sleep\x001001\x00", "sleep\x001002\x00"]);
}
