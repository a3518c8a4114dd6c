//! Fidelity: an interactive bash on a pseudo-terminal (whose master the test holds, as the shim does)
//! is checkpointed, changed, and restored: cwd, exported and plain variables, functions, aliases,
//! history and a background job that is still listed and can be waited for.

mod common;

use std::os::fd::AsRawFd;

use common::{python, PidNs, Term, BASH_ON_PTY};
use deltacr::Engine;

#[test]
fn interactive_bash_session_comes_back_whole() {
    let mut ns = PidNs::new();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave_path = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let py = python();
    ns.spawn(&[py.as_str(), "-c", BASH_ON_PTY, slave_path.to_str().unwrap()], None, true);
    drop(pty.slave);
    let mut t = Term::new(pty.master);
    t.run("echo \"up-$((40+2))\"", "up-42");
    t.run("cd /tmp && export EXP=e1 && LOC=l1", "$ ");
    t.run("f() { echo \"fn-$1\"; }", "$ ");
    t.run("alias al='echo al-$((1+1))'", "$ ");
    t.run("sleep 1000 &", "$ ");
    t.run("sleep 2000 &", "$ ");
    t.run("kill -STOP %2", "$ ");
    let out = t.run("sleep 0.2 ; jobs ; echo \"K$((3*3))\"", "K9");
    assert!(out.contains("Stopped"), "{out:?}");
    t.run("echo \"S-$((2+3))\"", "S-5");

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    assert_eq!(ckpt.tree.processes.len(), 3, "bash and its two jobs: {:?}", ckpt.tree.processes);

    // Change everything the restore must undo.
    t.run("cd / ; EXP=changed ; LOC=changed ; unset -f f ; unalias al ; kill %1", "$ ");
    t.run("echo \"M-$((3+4))\"", "M-7");

    for round in 0..2 {
        // The second round's bash takes over a spare (its jobs are rebuilt as always).
        if round == 1 {
            assert_eq!(engine.prepare_spares(&ckpt, &sb).unwrap(), 1);
        }
        engine.kill_processes(&sb).unwrap();
        assert_eq!(engine.restore(&ckpt, &sb).unwrap().from_spares, round);
        let out = t.run("echo \"V:$PWD:$EXP:$LOC:$(f x)\"", "V:/tmp");
        assert!(out.contains("V:/tmp:e1:l1:fn-x"), "round {round}: {out:?}");
        let out = t.run("al", "al-2");
        assert!(out.contains("al-2"), "{out:?}");
        let out = t.run("bash -c 'echo \"exported$((7*7))-$EXP\"'", "exported49-");
        assert!(out.contains("exported49-e1"), "{out:?}");
        // (A regex like 'sleep 100[0]' does not match its own command line.)
        let out =
            t.run("echo \"H$((9*9)):$(history | grep -c 'sleep 100[0]')-$(history | grep -c 'unalia[s]')\"", "H81:");
        assert!(out.contains("H81:1-0"), "history is the checkpoint's: {out:?}");
        let out = t.run("jobs ; echo \"J-$((6+6))\"", "J-12");
        assert!(out.contains("Running") && out.contains("sleep 1000"), "round {round}: {out:?}");
        assert!(out.contains("Stopped") && out.contains("sleep 2000"), "round {round}: {out:?}");
        let out = t.run("kill %1 ; wait %1 ; echo \"W$((8*8))-$?\"", "W64-");
        assert!(out.contains("W64-143"), "the job was waited for: {out:?}");
        let out = t.run("kill -CONT %2 ; kill %2 ; wait %2 ; echo \"X$((4*4))-$?\"", "X16-");
        assert!(out.contains("X16-143"), "the stopped job continued and was waited for: {out:?}");
    }
}
