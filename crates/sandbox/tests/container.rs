//! Starts real sandboxes (needs root): runs in its own process without the libtest harness because
//! cloning init requires a single-threaded caller.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use sandbox::container::{self, Container};
use sandbox::init::InitConfig;
use sandbox::ipc::Packet;
use sandbox::spec::{FromInit, Network, ProcessSpec, ToInit};
use sandbox::userns::UidSlot;

/// A one-layer busybox root filesystem built from the host's static busybox.
fn busybox_layer(dir: &Path) -> PathBuf {
    let layer = dir.join("layer");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp", "root"] {
        std::fs::create_dir_all(layer.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    for applet in ["sh", "id", "hostname", "ls", "cat", "echo", "ip", "ps", "sleep", "mount", "touch", "stat"] {
        std::os::unix::fs::symlink("busybox", layer.join("bin").join(applet)).unwrap();
    }
    std::fs::write(layer.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n")
        .unwrap();
    std::fs::write(layer.join("etc/group"), "root:x:0:\n").unwrap();
    layer
}

fn chown_tree(dir: &Path, id: u32) {
    std::os::unix::fs::lchown(dir, Some(id), Some(id)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match std::fs::symlink_metadata(&path).unwrap().is_dir() {
            true => chown_tree(&path, id),
            false => std::os::unix::fs::lchown(&path, Some(id), Some(id)).unwrap(),
        }
    }
}

struct Sandbox {
    c: Container,
    _slot: UidSlot,
}

fn start(dir: &Path, network: Network) -> Sandbox {
    let lower = busybox_layer(dir);
    let slot = UidSlot::reserve(&dir.join("slots"), None).unwrap();
    let target = dir.join("rootfs");
    std::fs::create_dir_all(&target).unwrap();
    let seccomp = sandbox::seccomp::default_filter().unwrap();
    let cfg = InitConfig { hostname: "sbx-test".into(), network, nat: None, mountpoint: target, seccomp };
    let c = container::start(&cfg, &slot.map, &[slot.lock_fd()], |_| Ok(())).unwrap();
    // The root filesystem is a bind mount of a directory owned by the sandbox's root.
    chown_tree(&lower, slot.map.host_base);
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        &lower,
        rustix::mount::OpenTreeFlags::OPEN_TREE_CLONE | rustix::mount::OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .unwrap();
    c.boot(tree).unwrap();
    Sandbox { c, _slot: slot }
}

/// Runs `argv` in the sandbox, returns (exit code, stdout+stderr).
fn run(sb: &Sandbox, argv: &[&str]) -> (i32, String) {
    let (out_r, out_w) = rustix::pipe::pipe().unwrap();
    let null: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let spec = ProcessSpec {
        argv: argv.iter().map(ToString::to_string).collect(),
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        user: None,
        tty: None,
        extra_fds: vec![],
    };
    sb.c.channel.send(&ToInit::Spawn { id: 1, spec }, &[], &[null.as_fd(), out_w.as_fd(), out_w.as_fd()]).unwrap();
    drop(out_w);
    let mut code = None;
    while code.is_none() {
        let Packet { msg, .. } = sb.c.channel.recv::<FromInit>().unwrap();
        match msg {
            FromInit::Spawned { .. } => {}
            FromInit::Exited { status, .. } => code = Some(status.shell_code()),
            FromInit::SpawnFailed { message, .. } => return (127, message),
            other => panic!("unexpected {other:?}"),
        }
    }
    let out = std::io::read_to_string(std::fs::File::from(out_r)).unwrap();
    (code.unwrap(), out)
}

fn check(name: &str, ok: bool, detail: &str, failures: &mut u32) {
    println!("{} {name}", if ok { "ok  " } else { "FAIL" });
    if !ok {
        println!("     {detail}");
        *failures += 1;
    }
}

fn main() {
    container::enter_private_mount_namespace().unwrap();
    // Like the daemon's data dir: the sandbox's uid cannot traverse it.
    let tmp = std::env::temp_dir().join(format!("sbx-container-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let sb = start(&tmp, Network::None);
    let mut failures = 0;
    let (code, out) = run(&sb, &["id"]);
    check("root inside", code == 0 && out.starts_with("uid=0(root) gid=0(root)"), &out, &mut failures);
    let status = std::fs::read_to_string(format!("/proc/{}/status", sb.c.init_pid)).unwrap();
    let host_uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    check(
        "init runs as the sandbox's host uid",
        host_uid == sb._slot.map.host_base,
        &host_uid.to_string(),
        &mut failures,
    );
    let (_, out) = run(&sb, &["hostname"]);
    check("hostname", out.trim() == "sbx-test", &out, &mut failures);
    let (_, out) = run(&sb, &["cat", "/proc/self/uid_map"]);
    check(
        "uid map",
        out.split_whitespace().collect::<Vec<_>>() == ["0", &sb._slot.map.host_base.to_string(), "65536"],
        &out,
        &mut failures,
    );
    let (_, out) = run(&sb, &["ip", "-o", "link"]);
    check("only loopback", out.lines().count() == 1 && out.contains("lo:"), &out, &mut failures);
    let (_, out) = run(&sb, &["ps", "-o", "pid,comm"]);
    check("no host processes visible", out.lines().count() == 2, &out, &mut failures);
    let (code, out) = run(&sb, &["touch", "/created"]);
    check("rootfs writable", code == 0, &out, &mut failures);
    let created = tmp.join("layer/created");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&created).unwrap());
    check(
        "new file owned by the sandbox's root on the host",
        owner == sb._slot.map.host_base,
        &owner.to_string(),
        &mut failures,
    );
    let (code, out) = run(&sb, &["nonexistent"]);
    check("missing binary", code == 127 && out.contains("No such file or directory"), &out, &mut failures);
    rustix::process::pidfd_send_signal(&sb.c.pidfd, rustix::process::Signal::KILL).unwrap();
    let _ = std::fs::remove_dir_all(&tmp);
    println!("{} passed, {failures} failed", 9 - failures);
    std::process::exit(if failures == 0 { 0 } else { 1 });
}
