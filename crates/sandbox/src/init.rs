//! The sandbox's pid 1.
//!
//! Cloned by the shim into fresh namespaces (see `container::start`), it sets up the sandbox's mounts,
//! then serves the shim: it forks every process the sandbox runs, reports their ends, reaps every zombie,
//! and forwards SIGTERM/SIGINT/SIGHUP to all processes. It is single-threaded and never exits on its own:
//! if it did, the kernel would kill the whole pid namespace.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{Gid, Pid, Uid};
use rustix::mount::{move_mount, MoveMountFlags};

use crate::ipc::{Channel, IpcError, Packet};
use crate::seccomp::SeccompFilter;
use crate::spec::{ExitStatus, FromInit, NatAddress, Network, ProcessSpec, ToInit};
use crate::sys::{dup_to, set_interface_up};

/// What init needs to know; it is a forked copy of the shim, so this is simply in its memory.
#[derive(Debug, Clone)]
pub struct InitConfig {
    pub hostname: String,
    pub network: Network,
    /// The addressing of `eth0` with [`Network::Nat`] (the shim created the link before sending `Go`).
    pub nat: Option<NatAddress>,
    /// Where to attach the root filesystem (a directory in the shim's view of the host).
    pub mountpoint: PathBuf,
    /// Installed on init at the end of setup; every sandbox process inherits it.
    pub seccomp: SeccompFilter,
}

#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct SetupError {
    step: String,
    #[source]
    source: std::io::Error,
}

fn step<E: Into<std::io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> SetupError {
    let step = step.into();
    move |e| SetupError { step, source: e.into() }
}

/// Runs init: waits for `Go` (with the root filesystem), sets up the sandbox, then serves `chan` forever.
pub fn run(cfg: &InitConfig, chan: Channel) -> ! {
    let _ = rustix::thread::set_name(c"deltabox-init");
    let rootfs = match chan.recv::<ToInit>() {
        Ok(Packet { msg: ToInit::Go, fds, .. }) if fds.len() == 1 => fds.into_iter().next().expect("one fd"),
        // The shim gave up on us before we started.
        _ => std::process::exit(1),
    };
    match setup(cfg, rootfs).and_then(|(guard, channels)| Ok((guard, Init::new(channels)?))) {
        Err(e) => {
            let _ = chan.send(&FromInit::SetupFailed { message: e.to_string() }, &[], &[]);
            std::process::exit(1)
        }
        Ok((guard, mut init)) => {
            if chan.send(&FromInit::Ready, &[], &[guard.as_fd()]).is_err() {
                std::process::exit(1)
            }
            drop(guard);
            init.chan = Some(chan);
            init.serve()
        }
    }
}

/// Sets the sandbox up around init; returns the signal guard's listener (see [`crate::signal_guard`]) and
/// init's views of /dev/.deltabox (see [`seal_channels`]).
fn setup(cfg: &InitConfig, rootfs: OwnedFd) -> Result<(OwnedFd, Channels), SetupError> {
    // Our fsuid is still host root's, the owner of the data directory on the way to the mount point:
    // after become_root we could no longer walk there.
    let mountpoint = rustix::fs::open(
        &cfg.mountpoint,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(step("open the rootfs mount point"))?;
    become_root()?;
    let channels = setup_mounts(cfg, rootfs, mountpoint)?;
    rustix::system::sethostname(cfg.hostname.as_bytes()).map_err(step("sethostname"))?;
    if cfg.network != Network::Host {
        let sock = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::DGRAM, None)
            .map_err(step("socket for loopback setup"))?;
        set_interface_up(sock.as_fd(), "lo").map_err(step("bring up lo"))?;
    }
    if let Some(nat) = &cfg.nat {
        crate::net::configure_sandbox_end(nat)
            .map_err(|e| SetupError { step: "configure eth0".into(), source: std::io::Error::other(e) })?;
    }
    // The shim placed us in the sandbox's cgroup before sending Go: that cgroup becomes our root.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP).map_err(step("unshare cgroup namespace"))?;
    // Sandbox processes must not ptrace or read the memory of init (it talks to the shim).
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(step("PR_SET_DUMPABLE"))?;
    // Restricting init itself (rather than each child) makes every fork inherit both for free; init
    // needs nothing beyond them from here on.
    let guard = cfg
        .seccomp
        .install_with_signal_guard()
        .map_err(|e| SetupError { step: "install the seccomp filter".into(), source: std::io::Error::other(e) })?;
    crate::caps::restrict_to_default()
        .map_err(|e| SetupError { step: "restrict capabilities".into(), source: std::io::Error::other(e) })?;
    Ok((guard, channels))
}

/// We were cloned by host root into a new user namespace, where host root is unmapped; switch to the
/// namespace's root (host uid = the sandbox's base) keeping our capabilities in the namespace.
fn become_root() -> Result<(), SetupError> {
    nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(step("setresgid"))?;
    nix::unistd::setgroups(&[Gid::from_raw(0)]).map_err(step("setgroups"))?;
    nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(step("setresuid"))?;
    Ok(())
}

fn mount_fs(source: &str, target: &Path, fstype: &str, flags: MsFlags, data: &str) -> Result<(), SetupError> {
    std::fs::create_dir_all(target).map_err(step(format!("mkdir {}", target.display())))?;
    mount(Some(source), target, Some(fstype), flags, Some(data))
        .map_err(step(format!("mount {fstype} on {}", target.display())))
}

/// Attaches the detached mount `mount` on the directory `target` (both descriptors).
fn attach(mount: &OwnedFd, target: &OwnedFd) -> rustix::io::Result<()> {
    move_mount(mount, "", target, "", MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH)
}

/// Mounts the sandbox's filesystems and enters its root; returns init's views of [`CHANNELS`].
fn setup_mounts(cfg: &InitConfig, rootfs: OwnedFd, mountpoint: OwnedFd) -> Result<Channels, SetupError> {
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(step("make mounts private"))?;
    attach(&rootfs, &mountpoint).map_err(step("attach the root filesystem"))?;
    // The mount's descriptor now names the attached root: work relative to it from here on.
    rustix::process::fchdir(&rootfs).map_err(step("enter the root filesystem"))?;
    let root = Path::new(".");
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    // New proc/sysfs mounts in a user namespace are allowed only while a full one is visible, so mount
    // them before the host's tree is detached.
    mount_fs("proc", &root.join("proc"), "proc", nosuid_nodev | MsFlags::MS_NOEXEC, "hidepid=invisible")?;
    match cfg.network {
        Network::None | Network::Nat => {
            mount_fs("sysfs", &root.join("sys"), "sysfs", nosuid_nodev | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY, "")?;
        }
        // sysfs can only be mounted by the owner of the network namespace: reuse the host's, read-only.
        Network::Host => {
            let sys = root.join("sys");
            std::fs::create_dir_all(&sys).map_err(step("mkdir /sys"))?;
            mount(Some("/sys"), &sys, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
                .map_err(step("bind /sys"))?;
            mount(
                None::<&str>,
                &sys,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid_nodev | MsFlags::MS_NOEXEC,
                None::<&str>,
            )
            .map_err(step("remount /sys read-only"))?;
        }
    }
    setup_dev(&root.join("dev"))?;
    let channels = root.join(CHANNELS.trim_start_matches('/'));
    setup_etc(cfg, rootfs.as_fd(), &channels)?;
    let writable = seal_channels(&channels)?;
    if cfg.network != Network::None {
        bind_resolv_conf(rootfs.as_fd(), &channels)?;
    }
    // /tmp stays on the sandbox's own filesystem, not a tmpfs: checkpoints, rollbacks and forks must
    // include it (agents keep work there).
    ensure_sticky_dir(&root.join("tmp"))?;

    rustix::process::pivot_root(".", ".").map_err(step("pivot_root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the host's root"))?;
    rustix::process::chdir("/").map_err(step("chdir /"))?;
    let flags = rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC;
    let sealed = rustix::fs::open(CHANNELS, flags, rustix::fs::Mode::empty()).map_err(step("open /dev/.deltabox"))?;
    Ok(Channels { sealed, writable })
}

/// Init's two views of [`CHANNELS`]: the sandbox's (read-only; processes find FIFOs there by path, and a
/// FIFO opened through it is named by that path, which DeltaCR records), and a writable detached copy only
/// init holds (to make FIFOs and their directories).
struct Channels {
    sealed: OwnedFd,
    writable: OwnedFd,
}

/// Where init keeps what is the sandbox's but not part of its checkpoints: the shell sessions' FIFOs (and,
/// with the host's network, the host's /etc/resolv.conf).
pub const CHANNELS: &str = "/dev/.deltabox";

/// Makes `dir` ([`CHANNELS`], a tmpfs, with its `sessions` directory) read-only for every process of the
/// sandbox, and returns a writable detached copy of it that only init holds. The sandbox can then neither store
/// data there (it would survive rollbacks: it is outside the checkpoints) nor rename or replace the session
/// FIFOs; opening a FIFO for writing needs no writable mount.
fn seal_channels(dir: &Path) -> Result<OwnedFd, SetupError> {
    let sessions = dir.join("sessions");
    std::fs::create_dir_all(&sessions).map_err(step("mkdir /dev/.deltabox/sessions"))?;
    std::fs::set_permissions(&sessions, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(step("chmod /dev/.deltabox/sessions"))?;
    let own = clone_mount(dir).map_err(step("clone /dev/.deltabox for init"))?;
    let sealed = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC;
    mount(None::<&str>, dir, None::<&str>, sealed, None::<&str>).map_err(step("remount /dev/.deltabox read-only"))?;
    Ok(own)
}

/// A detached copy of the mount at `path` (with its flags), to attach elsewhere or to use through its fd.
fn clone_mount(path: &Path) -> rustix::io::Result<OwnedFd> {
    use rustix::mount::OpenTreeFlags;
    rustix::mount::open_tree(rustix::fs::CWD, path, OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)
}

/// Opens `path` under the sandbox's root `root` (a symlink the image or a checkpoint put there stays inside),
/// non-blocking unless `O_PATH` (a FIFO put there must not stop init), with mode 0644 when it is created.
fn open_in_root(root: BorrowedFd<'_>, path: &str, flags: rustix::fs::OFlags) -> rustix::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    // openat2 refuses a mode without O_CREAT, and O_PATH with flags beyond O_DIRECTORY and O_CLOEXEC.
    let mode = if flags.contains(OFlags::CREATE) { Mode::from_raw_mode(0o644) } else { Mode::empty() };
    let nonblock = if flags.contains(OFlags::PATH) { OFlags::empty() } else { OFlags::NONBLOCK };
    let flags = flags | OFlags::CLOEXEC | nonblock;
    let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
    rustix::fs::openat2(root, path, flags, mode, resolve).map(std::fs::File::from)
}

/// /etc/hostname and the `127.0.1.1` line of /etc/hosts name this sandbox: they are written into the
/// sandbox's own /etc at each start (a fork renames itself; the rest of /etc/hosts stays as the image or the
/// checkpoint had it), so edits are part of checkpoints like any file and cannot pass data between branches.
/// With a network, the sandbox's /etc/resolv.conf is written into `channels` ([`CHANNELS`]), to be bound
/// read-only by [`bind_resolv_conf`] once they are sealed: the host's own with the host's network, the
/// gateway (the daemon's DNS forwarder) with NAT.
fn setup_etc(cfg: &InitConfig, root: BorrowedFd<'_>, channels: &Path) -> Result<(), SetupError> {
    use rustix::fs::OFlags;
    if open_in_root(root, "etc", OFlags::PATH | OFlags::DIRECTORY).is_err() {
        return Ok(());
    }
    let mut current = String::new();
    if let Ok(file) = open_in_root(root, "etc/hosts", OFlags::RDONLY) {
        // Bounded: a checkpoint's /etc/hosts is the agent's to write.
        let _ = std::io::Read::read_to_string(&mut std::io::Read::take(file, 1 << 20), &mut current);
    }
    let write = |name: &str, content: String| -> Result<(), SetupError> {
        let mut file = open_in_root(root, &format!("etc/{name}"), OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC)
            .map_err(step(format!("open /etc/{name}")))?;
        std::io::Write::write_all(&mut file, content.as_bytes()).map_err(step(format!("write /etc/{name}")))
    };
    write("hostname", format!("{}\n", cfg.hostname))?;
    write("hosts", hosts_naming(&current, &cfg.hostname))?;
    let resolv = match (cfg.network, &cfg.nat) {
        (Network::Host, _) => std::fs::read_to_string("/etc/resolv.conf").ok(),
        (Network::Nat, Some(nat)) => Some(format!("nameserver {}\n", nat.gateway)),
        _ => None,
    };
    if let Some(resolv) = resolv {
        std::fs::write(channels.join("resolv.conf"), resolv).map_err(step("write /dev/.deltabox/resolv.conf"))?;
    }
    Ok(())
}

/// Binds the resolv.conf written into the sealed `channels` by [`setup_etc`] onto the sandbox's
/// /etc/resolv.conf (created if missing; resolved under `root`): read-only, as a copy of the sealed mount is.
fn bind_resolv_conf(root: BorrowedFd<'_>, channels: &Path) -> Result<(), SetupError> {
    use rustix::fs::OFlags;
    let source = channels.join("resolv.conf");
    if !source.exists() || open_in_root(root, "etc", OFlags::PATH | OFlags::DIRECTORY).is_err() {
        return Ok(());
    }
    let copy = clone_mount(&source).map_err(step("clone /dev/.deltabox/resolv.conf"))?;
    if open_in_root(root, "etc/resolv.conf", OFlags::PATH).is_err() {
        open_in_root(root, "etc/resolv.conf", OFlags::WRONLY | OFlags::CREATE)
            .map_err(step("create /etc/resolv.conf"))?;
    }
    let target = open_in_root(root, "etc/resolv.conf", OFlags::PATH).map_err(step("open /etc/resolv.conf"))?;
    attach(&copy, &target.into()).map_err(step("bind /etc/resolv.conf"))
}

/// `hosts` (an /etc/hosts) naming `hostname` as 127.0.1.1 (any other 127.0.1.1 line is dropped), with the
/// usual localhost lines when it has none.
fn hosts_naming(hosts: &str, hostname: &str) -> String {
    let first = |line: &str| line.split_whitespace().next().map(str::to_string);
    let mut lines: Vec<&str> = hosts.lines().filter(|l| first(l).as_deref() != Some("127.0.1.1")).collect();
    if !lines.iter().any(|l| first(l).as_deref() == Some("127.0.0.1")) {
        lines.splice(0..0, ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]);
    }
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!("127.0.1.1\t{hostname}\n"));
    out
}

/// Creates `dir` as a world-writable sticky directory if the image has none.
fn ensure_sticky_dir(dir: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::PermissionsExt;
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(step(format!("mkdir {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
            .map_err(step(format!("chmod {}", dir.display())))?;
    }
    Ok(())
}

/// A minimal /dev in the root filesystem's own `/dev` directory, so what processes write there (a socket
/// such as /dev/log, POSIX shared memory in /dev/shm, any file) is part of checkpoints, rollbacks and forks:
/// the host's harmless character devices bind-mounted onto files there (a user namespace cannot mknod;
/// device nodes the image ships are removed: the root filesystem is `nodev`, they could not be opened), a
/// private devpts instance, /dev/shm (mode 1777), and a small tmpfs at [`CHANNELS`] for what is the
/// sandbox's but stays out of its checkpoints.
fn setup_dev(dev: &Path) -> Result<(), SetupError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let nosuid = MsFlags::MS_NOSUID;
    std::fs::create_dir_all(dev).map_err(step("mkdir /dev"))?;
    for entry in std::fs::read_dir(dev).map_err(step("list /dev"))? {
        let entry = entry.map_err(step("list /dev"))?;
        let kind = entry.file_type().map_err(step("stat an entry of /dev"))?;
        if kind.is_char_device() || kind.is_block_device() {
            std::fs::remove_file(entry.path()).map_err(step(format!("remove {}", entry.path().display())))?;
        }
    }
    let shm = dev.join("shm");
    std::fs::create_dir_all(&shm).map_err(step("mkdir /dev/shm"))?;
    // Every user may create shared memory objects, as in a tmpfs /dev/shm (images ship it 0755).
    std::fs::set_permissions(&shm, PermissionsExt::from_mode(0o1777)).map_err(step("chmod /dev/shm"))?;
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(name);
        if !std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_file()) {
            let _ = std::fs::remove_file(&target);
            std::fs::File::create(&target).map_err(step(format!("create /dev/{name}")))?;
        }
        let host = Path::new("/dev").join(name);
        mount(Some(&host), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(step(format!("bind /dev/{name}")))?;
    }
    mount_fs(
        "devpts",
        &dev.join("pts"),
        "devpts",
        nosuid | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )?;
    let channels = dev.join(CHANNELS.trim_start_matches("/dev/"));
    mount_fs("deltabox", &channels, "tmpfs", nosuid | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC, "mode=755,size=1m")?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = dev.join(link);
        if std::fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
            continue;
        }
        if std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path).map_err(step(format!("remove /dev/{link}")))?;
        }
        std::os::unix::fs::symlink(target, &path).map_err(step(format!("symlink /dev/{link}")))?;
    }
    Ok(())
}

/// A `Spawn` whose exec has not been confirmed yet.
struct Pending {
    id: u64,
    pid: i32,
    /// Close-on-exec pipe: EOF means the exec succeeded, data is the child's error message.
    errors: OwnedFd,
    pty_master: Option<OwnedFd>,
}

struct Init {
    chan: Option<Channel>,
    /// [`CHANNELS`] as the sandbox sees it (read-only), and init's own writable view of it.
    channels: Channels,
    signals: SignalFd,
    pending: Vec<Pending>,
    /// Processes started by `Spawn` whose end the shim wants to hear about.
    watched: HashSet<i32>,
    /// Ends of watched processes that died before their exec was confirmed.
    early_exits: HashMap<i32, ExitStatus>,
}

const HANDLED_SIGNALS: [Signal; 4] = [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP];

impl Init {
    fn new(channels: Channels) -> Result<Init, SetupError> {
        let mut mask = SigSet::empty();
        for s in HANDLED_SIGNALS {
            mask.add(s);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(step("block signals"))?;
        let signals =
            SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK).map_err(step("signalfd"))?;
        Ok(Init {
            chan: None,
            channels,
            signals,
            pending: Vec::new(),
            watched: HashSet::new(),
            early_exits: HashMap::new(),
        })
    }

    fn send(&mut self, msg: &FromInit, fds: &[BorrowedFd<'_>]) {
        if let Some(chan) = &self.chan {
            if let Err(IpcError::Closed) = chan.send(msg, &[], fds) {
                // The shim is gone; keep reaping so the sandbox stays sane until it is destroyed.
                self.chan = None;
            }
        }
    }

    fn serve(mut self) -> ! {
        loop {
            let (chan_ready, sig_ready, pending_ready) = {
                let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
                if let Some(chan) = &self.chan {
                    fds.push(PollFd::new(chan.as_fd(), PollFlags::POLLIN));
                }
                let first_pending = fds.len();
                fds.extend(self.pending.iter().map(|p| PollFd::new(p.errors.as_fd(), PollFlags::POLLIN)));
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => continue,
                }
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                let pending_ready: Vec<i32> = fds[first_pending..]
                    .iter()
                    .zip(&self.pending)
                    .filter(|(f, _)| ready(f))
                    .map(|(_, p)| p.pid)
                    .collect();
                (self.chan.is_some() && ready(&fds[1]), ready(&fds[0]), pending_ready)
            };
            for pid in pending_ready {
                self.confirm(pid);
            }
            if sig_ready {
                self.handle_signals();
            }
            if chan_ready {
                self.handle_request();
            }
        }
    }

    fn handle_request(&mut self) {
        let Some(chan) = &self.chan else { return };
        match chan.recv::<ToInit>() {
            Err(IpcError::Closed) => self.chan = None,
            Err(e) => tracing::warn!("bad message from shim: {e}"),
            Ok(Packet { msg, fds, .. }) => match msg {
                ToInit::Go => {}
                ToInit::Spawn { id, spec } => match spawn(&spec, fds) {
                    Ok((pid, errors, pty_master)) => {
                        self.watched.insert(pid);
                        self.pending.push(Pending { id, pid, errors, pty_master });
                    }
                    Err(message) => self.send(&FromInit::SpawnFailed { id, message }, &[]),
                },
                ToInit::Signal { pid, signal, group } => {
                    if pid > 1 {
                        if let Ok(sig) = Signal::try_from(signal) {
                            let _ = kill(Pid::from_raw(if group { -pid } else { pid }), sig);
                        }
                    }
                }
                ToInit::OpenFifos { paths } => {
                    match paths.iter().map(|p| open_fifo(&self.channels, p)).collect::<Result<Vec<_>, _>>() {
                        Ok(fifos) => {
                            let fds: Vec<BorrowedFd<'_>> = fifos.iter().map(|f| f.as_fd()).collect();
                            self.send(&FromInit::FifosOpened { error: None }, &fds);
                        }
                        Err(error) => self.send(&FromInit::FifosOpened { error: Some(error) }, &[]),
                    }
                }
                ToInit::Watch { pid } => {
                    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                        Ok(status) => match ExitStatus::from_wait_status(status) {
                            // Ended before we were asked: report it now, as nobody else will.
                            Some(status) => self.send(&FromInit::Exited { pid, status }, &[]),
                            None => {
                                self.watched.insert(pid);
                            }
                        },
                        // Not (or no longer) our child: it is gone.
                        Err(_) => {
                            let status = ExitStatus { code: None, signal: Some(libc::SIGKILL) };
                            self.send(&FromInit::Exited { pid, status }, &[]);
                        }
                    }
                }
            },
        }
    }

    fn handle_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(),
                Ok(sig) => {
                    let _ = kill(Pid::from_raw(-1), sig);
                }
                Err(_) => {}
            }
        }
    }

    fn reap(&mut self) {
        loop {
            // __WALL: DeltaCR's helpers and discarded tasks are children of init that do not signal SIGCHLD.
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    let (Some(pid), Some(exit)) = (status.pid(), ExitStatus::from_wait_status(status)) else {
                        continue;
                    };
                    let pid = pid.as_raw();
                    if self.pending.iter().any(|p| p.pid == pid) {
                        // Report the exec outcome before the exit.
                        self.early_exits.insert(pid, exit);
                        self.confirm(pid);
                    } else if self.watched.remove(&pid) {
                        self.send(&FromInit::Exited { pid, status: exit }, &[]);
                    }
                }
            }
        }
    }

    /// The error pipe of pending spawn `pid` is readable (or the child died): report the exec outcome.
    fn confirm(&mut self, pid: i32) {
        let Some(pos) = self.pending.iter().position(|p| p.pid == pid) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let n = match rustix::io::read(&self.pending[pos].errors, &mut buf) {
            Ok(n) => n,
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return,
            Err(_) => 0,
        };
        let p = self.pending.swap_remove(pos);
        if n > 0 {
            self.watched.remove(&pid);
            self.early_exits.remove(&pid);
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.send(&FromInit::SpawnFailed { id: p.id, message }, &[]);
            return;
        }
        let fds: Vec<BorrowedFd<'_>> = p.pty_master.iter().map(|f| f.as_fd()).collect();
        self.send(&FromInit::Spawned { id: p.id, pid }, &fds);
        if let Some(status) = self.early_exits.remove(&pid) {
            self.watched.remove(&pid);
            self.send(&FromInit::Exited { pid, status }, &[]);
        }
    }
}

/// The process's standard streams: three received descriptors, or a new pty.
enum Stdio {
    Pipes(Vec<OwnedFd>),
    Pty { master: OwnedFd, slave: PathBuf },
}

fn open_pty(size: crate::spec::WinSize) -> Result<Stdio, String> {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|e| format!("open /dev/ptmx: {e}"))?;
    grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let slave = ptsname(&master, Vec::new()).map_err(|e| format!("ptsname: {e}"))?;
    let ws = rustix::termios::Winsize { ws_row: size.rows, ws_col: size.cols, ws_xpixel: 0, ws_ypixel: 0 };
    rustix::termios::tcsetwinsize(&master, ws).map_err(|e| format!("set window size: {e}"))?;
    Ok(Stdio::Pty { master, slave: PathBuf::from(std::ffi::OsString::from_vec(slave.into_bytes())) })
}

/// Forks and execs `spec`. Returns the pid, the exec-error pipe and the pty master (if any).
fn spawn(spec: &ProcessSpec, fds: Vec<OwnedFd>) -> Result<(i32, OwnedFd, Option<OwnedFd>), String> {
    if spec.argv.is_empty() {
        return Err("empty command".into());
    }
    let mut fds = fds;
    let stdio_count = if spec.tty.is_some() { 0 } else { 3 };
    if fds.len() != stdio_count + spec.extra_fds.len() {
        return Err(format!("expected {} descriptors, got {}", stdio_count + spec.extra_fds.len(), fds.len()));
    }
    if spec.extra_fds.iter().any(|&n| n < 3) {
        return Err("extra descriptors must be numbered 3 or above".into());
    }
    let extra = fds.split_off(stdio_count);
    let stdio = match spec.tty {
        Some(size) => open_pty(size)?,
        None => Stdio::Pipes(fds),
    };
    let (err_rd, err_wr) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK)
            .map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: init is single-threaded, so the child may do anything a normal program does.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(err_rd);
            let Err(message) = exec_child(spec, &stdio, &extra);
            let _ = rustix::io::write(&err_wr, message.as_bytes());
            // SAFETY: _exit skips destructors of the copy of init's state, which this child must not run.
            unsafe { libc::_exit(127) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            let master = match stdio {
                Stdio::Pty { master, .. } => Some(master),
                Stdio::Pipes(_) => None,
            };
            Ok((child.as_raw(), err_rd, master))
        }
    }
}

/// Runs in the forked child: prepares the process and execs it. Returns only on failure.
fn exec_child(spec: &ProcessSpec, stdio: &Stdio, extra: &[OwnedFd]) -> Result<Infallible, String> {
    let all = SigSet::all();
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&all), None).map_err(|e| format!("unblock signals: {e}"))?;
    nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
    match stdio {
        Stdio::Pipes(fds) => {
            for (target, fd) in fds.iter().enumerate() {
                dup_to(fd.as_fd(), target as i32, false).map_err(|e| format!("dup2: {e}"))?;
            }
        }
        Stdio::Pty { slave, .. } => {
            let fd = rustix::fs::open(slave, rustix::fs::OFlags::RDWR, rustix::fs::Mode::empty())
                .map_err(|e| format!("open {}: {e}", slave.display()))?;
            rustix::process::ioctl_tiocsctty(&fd).map_err(|e| format!("TIOCSCTTY: {e}"))?;
            for target in 0..3 {
                dup_to(fd.as_fd(), target, false).map_err(|e| format!("dup2: {e}"))?;
            }
        }
    }
    // Copy the extra descriptors out of the way first, so placing one never clobbers another.
    let moved = extra
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 1000))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("dup: {e}"))?;
    for (fd, &target) in moved.iter().zip(&spec.extra_fds) {
        dup_to(fd.as_fd(), target, false).map_err(|e| format!("dup2 to {target}: {e}"))?;
    }
    let user = crate::users::resolve(spec.user.as_deref())?;
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    rustix::process::chdir(spec.cwd.as_str()).map_err(|e| format!("cannot change directory to {}: {e}", spec.cwd))?;
    nix::unistd::setgroups(&user.groups.iter().map(|g| Gid::from_raw(*g)).collect::<Vec<_>>())
        .map_err(|e| format!("setgroups: {e}"))?;
    nix::unistd::setresgid(Gid::from_raw(user.gid), Gid::from_raw(user.gid), Gid::from_raw(user.gid))
        .map_err(|e| format!("setgid {}: {e}", user.gid))?;
    nix::unistd::setresuid(Uid::from_raw(user.uid), Uid::from_raw(user.uid), Uid::from_raw(user.uid))
        .map_err(|e| format!("setuid {}: {e}", user.uid))?;
    exec_path(&spec.argv, &env)
}

/// Opens FIFO `path` (under [`CHANNELS`]) read-write (which never blocks and never sees end of file),
/// making it and its directories (private to root) through init's writable view if missing. Nothing on the
/// way may be a symlink, and what is opened must be a FIFO.
fn open_fifo(channels: &Channels, path: &str) -> Result<OwnedFd, String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let fail = |what: &'static str| move |e: rustix::io::Errno| format!("{what} {path}: {e}");
    let relative = path
        .strip_prefix(CHANNELS)
        .and_then(|p| p.strip_prefix('/'))
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("{path}: not under {CHANNELS}"))?;
    let (dirs, name) = relative.rsplit_once('/').unwrap_or(("", relative));
    let beneath = ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH;
    let mut dir =
        rustix::fs::openat(&channels.writable, ".", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(fail("open the directory of"))?;
    for part in dirs.split('/').filter(|p| !p.is_empty()) {
        let created = match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(fail("mkdir for")(e)),
        };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        dir = rustix::fs::openat2(&dir, part, flags, Mode::empty(), beneath).map_err(fail("open a directory of"))?;
        if created {
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(0o700)).map_err(fail("chmod a directory of"))?;
        }
    }
    match rustix::fs::mknodat(&dir, name, rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(fail("mkfifo")(e)),
    }
    let fifo = rustix::fs::openat2(&channels.sealed, relative, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty(), beneath)
        .map_err(fail("open"))?;
    let kind = rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&fifo).map_err(fail("stat"))?.st_mode);
    if kind != rustix::fs::FileType::Fifo {
        return Err(format!("{path} is not a FIFO"));
    }
    Ok(fifo)
}

/// `execve` with a `PATH` search that uses the process's new environment (glibc's execvpe would use init's).
fn exec_path(argv: &[String], env: &[String]) -> Result<Infallible, String> {
    let cstrings = |v: &[String]| -> Result<Vec<CString>, String> {
        v.iter().map(|s| CString::new(s.as_bytes()).map_err(|_| format!("NUL byte in {s:?}"))).collect()
    };
    let args = cstrings(argv)?;
    let envs = cstrings(env)?;
    let program = &argv[0];
    let candidates: Vec<PathBuf> = if program.contains('/') {
        vec![PathBuf::from(program)]
    } else {
        let path = env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        path.split(':').filter(|d| !d.is_empty()).map(|d| Path::new(d).join(program)).collect()
    };
    let mut last = nix::Error::ENOENT;
    for candidate in &candidates {
        let Ok(c) = CString::new(candidate.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        let Err(e) = nix::unistd::execve(&c, &args, &envs);
        // Keep looking after "not here"; remember a more telling error such as EACCES.
        if e != nix::Error::ENOENT && e != nix::Error::ENOTDIR || last == nix::Error::ENOENT {
            last = e;
        }
    }
    Err(format!("cannot execute {program:?}: {}", last.desc()))
}

#[cfg(test)]
mod tests {
    use super::hosts_naming;

    #[test]
    fn hosts_name_the_sandbox_and_keep_the_rest() {
        let image = "127.0.0.1\tlocalhost\n10.0.0.5 db\n127.0.1.1\told-name\n";
        assert_eq!(hosts_naming(image, "new"), "127.0.0.1\tlocalhost\n10.0.0.5 db\n127.0.1.1\tnew\n");
        assert_eq!(
            hosts_naming("", "sb"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\tsb\n"
        );
    }
}
