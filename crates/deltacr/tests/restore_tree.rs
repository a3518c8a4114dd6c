//! A process tree (bash → python → producer | consumer, plus a zombie child) is restored with its
//! parent links, the pipe between producer and consumer (and its unread data), the shared output file
//! and the zombie, which its parent can still reap.

mod common;

use common::{python, wait_for, PidNs};
use deltacr::state::ProcessKind;
use deltacr::Engine;

const TREE_PY: &str = r#"
import os, sys, time
out = open(sys.argv[1], "a")
flag = sys.argv[2]
r, w = os.pipe()
if os.fork() == 0:
    os.close(r)
    i = 0
    while True:
        i += 1
        os.write(w, b"%d\n" % i)
        time.sleep(0.003)
if os.fork() == 0:
    os.close(w)
    for line in os.fdopen(r):
        out.write("c " + line)
        out.flush()
os.close(r)
os.close(w)
if os.fork() == 0:
    os.setgid(65534)
    os.setuid(65534)
    while True:
        time.sleep(1)
z = os.fork()
if z == 0:
    os._exit(7)
n = 0
while True:
    n += 1
    out.write("p %d\n" % n)
    out.flush()
    if z and os.path.exists(flag):
        pid, status = os.waitpid(z, 0)
        out.write("z %d %d\n" % (pid, os.WEXITSTATUS(status)))
        out.flush()
        z = 0
    time.sleep(0.005)
"#;

fn last(lines: &[String], tag: &str) -> Option<u64> {
    lines.iter().rev().find_map(|l| l.strip_prefix(tag).map(|v| v.trim().parse().unwrap()))
}

fn read(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn a_tree_with_pipes_and_a_zombie_is_restored() {
    tree_with_pipes_and_a_zombie(PidNs::new());
}

#[test]
fn a_tree_in_a_user_namespace_with_docker_capabilities_is_restored() {
    tree_with_pipes_and_a_zombie(PidNs::user_namespaced());
}

fn tree_with_pipes_and_a_zombie(mut ns: PidNs) {
    let out = ns.path("out");
    let flag = ns.path("flag");
    let script = format!("{} -c '{}' {} {}", python(), TREE_PY.replace('\'', "'\\''"), out.display(), flag.display());
    let (bash, _) = ns.spawn(&["bash", "-c", &format!("{script}; echo done")], None, false);
    wait_for(|| (last(&read(&out), "c ").unwrap_or(0) > 5).then_some(()));

    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let at = read(&out);
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let (p0, c0) = (last(&at, "p ").unwrap(), last(&at, "c ").unwrap());
    let procs = ckpt.tree.processes.clone();
    assert_eq!(procs.len(), 6, "bash, python, producer, consumer, nobody, zombie: {procs:?}");
    assert_eq!(procs[0].pid, bash);
    let py = procs[1].pid;
    assert_eq!(procs[1].ppid, bash);
    let zombie = procs.iter().find(|p| matches!(p.kind, ProcessKind::Zombie { .. })).unwrap();
    assert_eq!(zombie.ppid, py);
    let zpid = zombie.pid;

    wait_for(|| (last(&read(&out), "p ").unwrap() > p0 + 20).then_some(()));
    let store = deltacr::image::ImageStore::new(&ns.path("images")).unwrap();
    let image = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    let mut ckpt = Some(ckpt);
    // Twice from the templates, then once from the image without them.
    for round in 0..3 {
        engine.kill_processes(&sb).unwrap();
        let before = read(&out).len();
        if round < 2 {
            engine.restore(ckpt.as_ref().unwrap(), &sb).unwrap();
        } else {
            // Dropping the checkpoint kills its templates.
            drop(ckpt.take());
            let chain = store.open_chain(image).unwrap();
            engine.restore_image(chain, &sb, None).unwrap();
        }
        // Parent links and credentials are back.
        for p in &procs {
            if let ProcessKind::Live(st) = &p.kind {
                let host = ns.host_pid(p.pid);
                let ids = deltacr::capture::ns_ids(host).unwrap();
                assert_eq!((ids.ppid, ids.pgid, ids.sid), (p.ppid, p.pgid, p.sid), "round {round}: {p:?}");
                assert_eq!(deltacr::capture::read_creds(host).unwrap(), st.creds, "round {round}: {p:?}");
                let filters = deltacr::procfs::Status::read(host).unwrap().get("Seccomp_filters").unwrap().parse();
                assert_eq!(filters, Ok(st.seccomp.len()), "round {round}: seccomp filters of {}", p.pid);
                // Ignored and caught signals (python ignores SIGPIPE and catches SIGINT).
                let (ign, cgt) =
                    st.sigactions.iter().enumerate().fold((0u64, 0u64), |(i, c), (n, a)| match a.handler {
                        0 => (i, c),
                        1 => (i | 1 << n, c),
                        _ => (i, c | 1 << n),
                    });
                assert_ne!((ign, cgt), (0, 0));
                let status = deltacr::procfs::Status::read(host).unwrap();
                assert_eq!((status.hex("SigIgn").unwrap(), status.hex("SigCgt").unwrap()), (ign, cgt), "{p:?}");
            }
        }
        wait_for(|| {
            let new = read(&out).split_off(before);
            (last(&new, "p ").is_some() && last(&new, "c ").is_some()).then_some(())
        });
        let new = read(&out).split_off(before);
        let first = |tag: &str| new.iter().find_map(|l| l.strip_prefix(tag).map(|v| v.trim().parse::<u64>().unwrap()));
        assert_eq!(first("p "), Some(p0 + 1), "round {round}: parent continues: {new:?}");
        assert_eq!(first("c "), Some(c0 + 1), "round {round}: consumer continues: {new:?}");
        // The zombie can be reaped by its parent, with its exit status.
        std::fs::write(&flag, "").unwrap();
        wait_for(|| read(&out).split_off(before).iter().any(|l| l.starts_with("z ")).then_some(()));
        let z = read(&out).split_off(before).into_iter().find(|l| l.starts_with("z ")).unwrap();
        assert_eq!(z, format!("z {zpid} 7"));
        std::fs::remove_file(&flag).unwrap();
    }
}

#[test]
fn a_shell_pipeline_with_full_pipe_buffers_finishes_after_restore() {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    let started = ns.path("started");
    // yes and head block on full pipes while the last stage sleeps.
    let script = format!("yes | head -c 10000000 | (touch {}; sleep 2; wc -c) > {}", started.display(), out.display());
    ns.spawn(&["bash", "-c", &script], None, false);
    wait_for(|| started.exists().then_some(()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut engine = Engine::new();
    let sb = ns.sandbox();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let pipes = ckpt
        .tree
        .files
        .iter()
        .filter(|f| matches!(&f.kind, deltacr::state::FileKind::Pipe { data, .. } if !data.is_empty()))
        .count();
    assert!(pipes >= 2, "both pipes hold unread data at the checkpoint");
    wait_for(|| std::fs::read_to_string(&out).ok().filter(|s| s.trim() == "10000000"));
    for _ in 0..2 {
        engine.kill_processes(&sb).unwrap();
        std::fs::write(&out, "").unwrap();
        engine.restore(&ckpt, &sb).unwrap();
        wait_for(|| std::fs::read_to_string(&out).ok().filter(|s| s.trim() == "10000000"));
    }
}
