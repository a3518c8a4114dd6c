//! Shell sessions driven through FIFOs in the sandbox's /dev tmpfs (`/dev/.deltabox/sessions/<nonce>/
//! {cmd,out,err}`, the shim holding the other ends): restore reopens the FIFOs by path in the same
//! sandbox (also after the shim made them anew) and in another sandbox where the shim made the same
//! paths beforehand.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};

use common::{read_until, PidNs};
use deltacr::image::ImageStore;
use deltacr::Engine;

/// bash reading commands from the FIFO cmd, writing to the FIFOs out and err, in directory argv[1].
const SESSION: &str = r#"
import os, sys
d = sys.argv[1]
for name, fd, flags in (("cmd", 0, os.O_RDONLY), ("out", 1, os.O_WRONLY), ("err", 2, os.O_WRONLY)):
    f = os.open(os.path.join(d, name), flags)
    os.dup2(f, fd)
    os.close(f)
os.execvp("bash", ["bash", "--norc", "--noprofile"])
"#;

/// The shim's ends of a session's FIFOs.
struct Session {
    cmd: File,
    out: File,
    err: File,
}

impl Session {
    /// Makes the session's FIFOs in `ns` (at `dir` as its processes see it) and opens the shim's ends
    /// (read-write, so no open waits for the other side).
    fn make(ns: &PidNs, dir: &Path) -> Session {
        let host_dir = ns.inside(dir);
        std::fs::create_dir_all(&host_dir).unwrap();
        let open = |name: &str| {
            let path = host_dir.join(name);
            nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            nix::fcntl::fcntl(&f, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
            f
        };
        Session { cmd: open("cmd"), out: open("out"), err: open("err") }
    }

    /// Sends a command; waits for the line `expect` on out (or on err with `on_err`).
    fn run(&mut self, line: &str, expect: &str, on_err: bool) {
        use std::io::Write;
        self.cmd.write_all(format!("{line}\n").as_bytes()).unwrap();
        read_until(if on_err { &mut self.err } else { &mut self.out }, &format!("{expect}\n"));
    }

    /// The session state set before the checkpoint is back (X=41), on both streams.
    fn check_restored(&mut self) {
        self.run("echo \"v$((X+1))\"", "v42", false);
        self.run("echo \"e$((X+2))\" >&2", "e43", true);
    }
}

fn session_dir(ns: &PidNs) -> PathBuf {
    ns.dev_dir().join(".deltabox/sessions/5e55")
}

#[test]
fn session_fifos_are_reopened_by_path_here_and_in_another_sandbox() {
    let mut a = PidNs::with_own_dev();
    let dir = session_dir(&a);
    let mut s = Session::make(&a, &dir);
    let py = common::python();
    a.spawn(&[&py, "-c", SESSION, dir.to_str().unwrap()], None, false);
    s.run("X=41; echo \"ok$((1+1))\"", "ok2", false);
    let mut engine = Engine::new();
    let sb = a.sandbox();
    let mut frozen = deltacr::Frozen::new(&a.cgroup).unwrap();
    let ckpt = engine.checkpoint(&sb, &mut frozen).unwrap();
    let store = ImageStore::new(&a.path("images")).unwrap();
    let id = ckpt.image_job(None).unwrap().write(&store).unwrap().id;
    s.run("X=0; echo \"changed\"", "changed", false);

    // Same sandbox, same FIFOs.
    engine.kill_processes(&sb).unwrap();
    engine.restore(&ckpt, &sb).unwrap();
    s.check_restored();

    // Same sandbox, the session's FIFOs made anew (other inodes) by the shim.
    engine.kill_processes(&sb).unwrap();
    drop(s);
    std::fs::remove_dir_all(a.inside(&dir)).unwrap();
    let mut s = Session::make(&a, &dir);
    engine.restore(&ckpt, &sb).unwrap();
    s.check_restored();

    // Another sandbox (its own /dev tmpfs) where the shim made the same paths beforehand.
    let b = PidNs::with_own_dev();
    let mut sb_session = Session::make(&b, &dir);
    engine.restore_image(store.open_chain(id).unwrap(), &b.sandbox(), None).unwrap();
    sb_session.check_restored();
    // The original session runs on, apart.
    s.run("echo \"a$((X+3))\"", "a44", false);
}
