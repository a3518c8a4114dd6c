//! Test harness: a real pid namespace whose pid 1 is a tiny init (python) that reaps zombies and starts
//! programs on request, as the sandbox's init does.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::unistd::Pid;
use sandbox::cgroup::{Cgroup, Limits};

const INIT_PY: &str = r#"
import json, os, signal, subprocess, sys, threading, time
def reap(*_):
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG | 0x40000000)
        except ChildProcessError:
            return
        if pid == 0:
            return
signal.signal(signal.SIGCHLD, reap)
# Python runs signal handlers only between bytecodes of the main thread: reap from a thread blocked in
# wait too, as a real init's wait loop does.
def reaper():
    while True:
        try:
            os.waitpid(-1, 0x40000000)
        except ChildProcessError:
            time.sleep(0.02)
threading.Thread(target=reaper, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    out = open(req["stdout"], "ab") if req.get("stdout") else subprocess.DEVNULL
    p = subprocess.Popen(req["argv"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=req.get("setsid", False), cwd=req.get("cwd"),
                         process_group=None if req.get("setsid") else 0)
    if out is not subprocess.DEVNULL:
        out.close()
    print(p.pid, flush=True)
"#;

/// A pid namespace with our test init as pid 1; killed (with everything in it) on drop.
pub struct PidNs {
    unshare: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub init: Pid,
    pub dir: tempfile::TempDir,
    /// The namespace's cgroup (the sandbox crate's, as the shim has), holding init and everything it
    /// starts.
    pub cgroup: Cgroup,
    userns: bool,
}

#[derive(Default)]
struct Options {
    userns: bool,
    own_dev: bool,
}

/// Run before init in a namespace with its own /dev/pts (as a sandbox has) and its own tmpfs at
/// `$1` (a sandbox's /dev tmpfs, where the shim makes its session FIFOs); then execs the rest.
const OWN_DEV: &str = "mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts && \
mount --bind /dev/pts/ptmx /dev/ptmx && mount -t tmpfs tmpfs \"$1\" && shift && exec \"$@\"";

/// The distribution's python (not a wrapper script).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// Installs a small seccomp filter like the sandbox's (clone3 -> ENOSYS, unshare -> EPERM, the rest
/// allowed) with no_new_privs, then execs argv[1:].
const SECCOMP_EXEC: &str = r#"
import ctypes, os, struct, sys
def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    insn(0x20, 0, 0, 0),                  # load the syscall number
    insn(0x15, 0, 1, 435),                # clone3?
    insn(0x06, 0, 0, 0x00050000 | 38),    #   ENOSYS
    insn(0x15, 0, 1, 272),                # unshare?
    insn(0x06, 0, 0, 0x00050000 | 1),     #   EPERM
    insn(0x06, 0, 0, 0x7fff0000),         # allow
])
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0
os.execvp(sys.argv[1], sys.argv[1:])
"#;

/// Docker's default capabilities, for setpriv.
const DOCKER_CAPS: &str = "-all,+chown,+dac_override,+fowner,+fsetid,+kill,+setgid,+setuid,+setpcap,\
+net_bind_service,+net_raw,+sys_chroot,+mknod,+audit_write,+setfcap";

impl PidNs {
    pub fn new() -> PidNs {
        Self::with_watchdog(Duration::from_secs(60))
    }

    /// A namespace killed after `limit` (so a hung ptrace wait fails the test instead of blocking it).
    pub fn with_watchdog(limit: Duration) -> PidNs {
        Self::create(limit, Options::default())
    }

    /// Closer to a real sandbox: also a user namespace (owning the pid namespace), and programs started
    /// with Docker's default capabilities and a seccomp filter (see [`PidNs::spawn`]). Its root is host root (mapping another
    /// uid range needs newuidmap and /etc/subuid entries this machine does not have).
    pub fn user_namespaced() -> PidNs {
        Self::create(Duration::from_secs(60), Options { userns: true, ..Options::default() })
    }

    /// A namespace with its own devpts instance (its ptys are numbered from 0, apart from the host's)
    /// and its own tmpfs at [`PidNs::dev_dir`], as a sandbox's /dev is.
    pub fn with_own_dev() -> PidNs {
        Self::create(Duration::from_secs(60), Options { own_dev: true, ..Options::default() })
    }

    fn create(limit: Duration, opts: Options) -> PidNs {
        let userns = opts.userns;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("init.py");
        std::fs::write(&script, INIT_PY).unwrap();
        let mut cmd = Command::new("unshare");
        if userns {
            cmd.arg("--map-root-user");
        }
        cmd.args(["--pid", "--ipc", "--fork", "--mount-proc"]);
        if opts.own_dev {
            let dev = dir.path().join("dev");
            std::fs::create_dir(&dev).unwrap();
            cmd.args(["sh", "-c", OWN_DEV, "sh"]).arg(dev);
        }
        let mut unshare = cmd
            .arg(if userns { SYSTEM_PYTHON.to_string() } else { python() })
            .arg("-u")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = unshare.stdin.take().unwrap();
        let mut stdout = BufReader::new(unshare.stdout.take().unwrap());
        let mut ready = String::new();
        stdout.read_line(&mut ready).unwrap();
        assert_eq!(ready, "ready\n");
        let upid = unshare.id() as i32;
        let init = wait_for(|| {
            let kids = std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children")).ok()?;
            kids.split_whitespace().next().and_then(|s| s.parse().ok()).map(Pid::from_raw)
        });
        let cgroup = Cgroup::create(&format!("deltacr-test-{}", init.as_raw()), &Limits::default()).unwrap();
        cgroup.add_process(init.as_raw()).unwrap();
        // A hung ptrace wait would block the test forever: kill the namespace after `limit`, so the
        // test fails instead.
        // A pidfd, so a recycled pid is never hit.
        let watched = deltacr::sys::pidfd_open(init).unwrap();
        let name = cgroup.name().to_string();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            // Frozen tasks do not die until thawed.
            if rustix::process::pidfd_send_signal(&watched, rustix::process::Signal::KILL).is_ok() {
                if let Ok(cgroup) = Cgroup::open(&name) {
                    let _ = cgroup.thaw();
                }
            }
        });
        PidNs { userns, unshare, stdin, stdout, init, dir, cgroup }
    }

    pub fn sandbox(&self) -> deltacr::Sandbox {
        deltacr::Sandbox { init: self.init }
    }

    /// Starts `argv` in the namespace (own process group; own session if `setsid`), stdout and stderr
    /// appended to `out` if given. Returns (pid inside the namespace, host pid).
    pub fn spawn(&mut self, argv: &[&str], out: Option<&Path>, setsid: bool) -> (i32, Pid) {
        let ns_pid = self.start(argv, out, setsid);
        (ns_pid, self.host_pid(ns_pid))
    }

    /// Like [`PidNs::spawn`] for a program that may be gone by the time it returns: only its pid inside.
    pub fn start(&mut self, argv: &[&str], out: Option<&Path>, setsid: bool) -> i32 {
        let bounding = format!("--bounding-set={DOCKER_CAPS}");
        let mut full: Vec<&str> = Vec::new();
        if self.userns {
            full.extend(["setpriv", &bounding, "--inh-caps=-all", "--", SYSTEM_PYTHON, "-c", SECCOMP_EXEC]);
        }
        full.extend(argv);
        let req = serde_json_line(&full, out, setsid);
        self.stdin.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().parse().unwrap_or_else(|_| panic!("init said {line:?}"))
    }

    /// The host pid of a process of this namespace.
    pub fn host_pid(&self, ns_pid: i32) -> Pid {
        wait_for(|| self.processes().into_iter().find(|&(_, p)| p == ns_pid).map(|(host, _)| host))
    }

    /// Every process of this namespace (with our templates and pid helper): (host pid, pid inside).
    pub fn processes(&self) -> Vec<(Pid, i32)> {
        let ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init)).unwrap();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap() {
            let Some(pid) = e.unwrap().file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok().as_ref() != Some(&ns) {
                continue;
            }
            // Gone meanwhile: skip.
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                continue;
            };
            let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
            out.push((Pid::from_raw(pid), nspid.split_whitespace().last().unwrap().parse().unwrap()));
        }
        out
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory that is a tmpfs of this namespace's own (see [`PidNs::with_own_dev`]), as its
    /// processes name it.
    pub fn dev_dir(&self) -> PathBuf {
        self.path("dev")
    }

    /// `path` (as the namespace's processes name it) seen from the host.
    pub fn inside(&self, path: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.init, path.display()))
    }

    /// Opens a new pty of the namespace's devpts, as the shim does for a session: returns its
    /// (unlocked, non-blocking) master and its number.
    pub fn open_pty(&self) -> (std::fs::File, u32) {
        let master = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
            .open(self.inside(Path::new("/dev/ptmx")))
            .unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let index = deltacr::sys::pty_index(std::os::fd::AsFd::as_fd(&master)).unwrap();
        (master, index)
    }
}

/// Runs an interactive bash on the terminal argv[1] (its stdio and controlling terminal).
pub const BASH_ON_PTY: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(fd, i)
os.close(fd)
os.environ.update(TERM="dumb", PS1="$ ", HISTFILE="/dev/null")
os.execvp("bash", ["bash", "--norc", "--noprofile", "-i"])
"#;

/// The master side of a terminal, as the shim holds it for a shell session.
pub struct Term {
    pub master: std::fs::File,
}

impl Term {
    /// Takes a pty master (made non-blocking).
    pub fn new(master: impl Into<std::os::fd::OwnedFd>) -> Term {
        let master = master.into();
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
        Term { master: master.into() }
    }

    /// Sends a line and waits until `marker` appears in the output after it.
    pub fn run(&mut self, line: &str, marker: &str) -> String {
        self.master.write_all(format!("{line}\n").as_bytes()).unwrap();
        read_until(&mut self.master, marker)
    }
}

/// Reads what is available on a non-blocking pty master (or FIFO) until `marker` shows up (at most
/// 10 s). EIO (no slave open at the moment, e.g. between kill and restore) counts as nothing yet.
pub fn read_until(master: &mut std::fs::File, marker: &str) -> String {
    use std::io::Read;
    let start = Instant::now();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(marker) {
        assert!(start.elapsed() < Duration::from_secs(10), "no {marker:?} on the terminal; saw {seen:?}");
        match master.read(&mut buf) {
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.raw_os_error() == Some(libc::EIO) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("pty read: {e}"),
        }
    }
    seen
}

impl Drop for PidNs {
    fn drop(&mut self) {
        let _ = self.cgroup.thaw();
        let _ = nix::sys::signal::kill(self.init, nix::sys::signal::Signal::SIGKILL);
        // Processes this thread still traces (after a failed test) must be collected by us, or the
        // dying namespace init waits for them forever.
        use nix::sys::wait::{waitpid, WaitPidFlag};
        let unshare = Some(Pid::from_raw(self.unshare.id() as i32));
        loop {
            // Err: the wait below already collected it (try_wait then never sees it: a test hung
            // here for good in a full run).
            if let Ok(Some(_)) | Err(_) = self.unshare.try_wait() {
                break;
            }
            let flags = WaitPidFlag::__WALL | WaitPidFlag::__WNOTHREAD | WaitPidFlag::WNOHANG;
            match waitpid(None, Some(flags)) {
                Ok(status) if status.pid() == unshare => break,
                Ok(nix::sys::wait::WaitStatus::StillAlive) | Err(_) => std::thread::sleep(Duration::from_millis(5)),
                Ok(_) => {}
            }
        }
        if let Err(e) = Cgroup::remove(self.cgroup.name()) {
            eprintln!("cannot remove the test cgroup: {e}");
        }
    }
}

fn serde_json_line(argv: &[&str], out: Option<&Path>, setsid: bool) -> String {
    let req = serde_json::json!({ "argv": argv, "stdout": out.map(|p| p.to_str().unwrap()), "setsid": setsid });
    format!("{req}\n")
}

/// The real python3 executable (not a wrapper script that forks on every start).
pub fn python() -> String {
    static PY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

/// Polls `f` until it returns Some (at most 10 s).
pub fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `path` contains `needle`.
pub fn wait_for_content(path: &Path, needle: &str) -> String {
    wait_for(|| std::fs::read_to_string(path).ok().filter(|s| s.contains(needle)))
}

/// A python program that appends "i crc" lines to the file argv[1] every 5 ms; each step rewrites one
/// page of an 8 MB buffer (all of it written first) and prints the CRC of the whole buffer, so a
/// restore with wrong memory shows, and most pages stay unchanged between two checkpoints.
pub const COUNTER: &str = r#"
import sys, time, zlib
out = open(sys.argv[1], "a")
buf = bytearray(8 << 20)
for k in range(0, len(buf), 4096):
    buf[k] = 1
i = 0
while True:
    i += 1
    buf[(i * 4096) % len(buf)] = i % 251
    out.write("%d %d\n" % (i, zlib.crc32(buf)))
    out.flush()
    time.sleep(0.005)
"#;

/// The (counter, crc) lines COUNTER wrote so far.
pub fn counter_lines(path: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.split(' ');
            (it.next().unwrap().parse().unwrap(), it.next().unwrap().parse().unwrap())
        })
        .collect()
}

/// The lines of a file of space-separated numbers (empty when the file does not exist yet).
pub fn number_rows(path: &Path) -> Vec<Vec<u64>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').map(|n| n.parse().unwrap()).collect())
        .collect()
}

/// Restores `ckpt` into `ns` `from_templates` times from its templates, then once from its image (its
/// processes killed before each), and checks that each run continues from the checkpoint:
/// `continues(n)` checks what the program wrote after its `n` lines of output so far and returns the
/// first counter there, which must be at most `at + 1` (`at`: the lines written when the checkpoint
/// returned) and the same every time. `lines()` counts the output's lines.
pub fn restores_continue(
    engine: &mut deltacr::Engine,
    ns: &PidNs,
    ckpt: &deltacr::Checkpoint,
    from_templates: usize,
    at: u64,
    lines: impl Fn() -> usize,
    continues: impl Fn(usize) -> u64,
) {
    let sb = ns.sandbox();
    let store = deltacr::image::ImageStore::new(&ns.path("images")).unwrap();
    let image = ckpt.image_job(None).unwrap().write(&store).unwrap();
    let mut resumed = None;
    for round in 0..=from_templates {
        engine.kill_processes(&sb).unwrap();
        let before = lines();
        if round < from_templates {
            engine.restore(ckpt, &sb).unwrap();
        } else {
            engine.restore_image(store.open_chain(image.id).unwrap(), &sb, None).unwrap();
        }
        let first = continues(before);
        assert!(first <= at + 1, "round {round}: restored from the checkpoint ({first} > {at} + 1)");
        assert_eq!(*resumed.get_or_insert(first), first, "round {round}");
    }
    engine.kill_processes(&sb).unwrap();
}

/// Waits until `out` has more than `from + min` lines of numbers, checks that each line from `from` on is
/// `expected(i)` for consecutive counters `i` (its first number), and returns the first counter.
pub fn rows_follow(out: &Path, from: usize, min: usize, expected: impl Fn(u64) -> Vec<u64>) -> u64 {
    let rows = wait_for(|| Some(number_rows(out)).filter(|r| r.len() > from + min));
    let first = rows[from][0];
    for (k, row) in rows[from..].iter().enumerate() {
        assert_eq!(row, &expected(first + k as u64), "line {} of {:?}", from + k, &rows[from..]);
    }
    first
}

/// A program checkpointed by [`run_and_checkpoint`].
pub struct Checkpointed {
    pub ns: PidNs,
    /// Its output file.
    pub out: PathBuf,
    pub engine: deltacr::Engine,
    pub ckpt: deltacr::Checkpoint,
    /// Lines of output when the checkpoint returned.
    pub at: u64,
}

/// Starts python `program` (argv[1]: its output file) in a new namespace, waits until its output follows
/// `expected` from counter 1 (see [`rows_follow`]), and checkpoints it.
pub fn run_and_checkpoint(program: &str, min: usize, expected: impl Fn(u64) -> Vec<u64>) -> Checkpointed {
    let mut ns = PidNs::new();
    let out = ns.path("out");
    ns.spawn(&[&python(), "-c", program, out.to_str().unwrap()], None, false);
    assert_eq!(rows_follow(&out, 0, min, expected), 1);
    let mut engine = deltacr::Engine::new();
    let mut frozen = deltacr::Frozen::new(&ns.cgroup).unwrap();
    let ckpt = engine.checkpoint(&ns.sandbox(), &mut frozen).unwrap();
    drop(frozen);
    let at = number_rows(&out).len() as u64;
    Checkpointed { ns, out, engine, ckpt, at }
}
