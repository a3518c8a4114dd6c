//! The pid helper makes the next process of a pid namespace get the pid we ask for.

mod common;

use deltacr::pidns::PidSetter;

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
