//! One cgroup per sandbox: resource limits (memory without swap, pids, cpu), the freezer used by
//! checkpoints, out-of-memory accounting, and killing everything in it.
//!
//! Works on cgroup v1 hosts (one hierarchy per controller), hybrid hosts (v1 controllers plus a
//! cgroup2 hierarchy without controllers, as on our development machine) and pure cgroup2 hosts;
//! the layout is detected at runtime from `/proc/self/mountinfo`:
//! - memory, pids and cpu: the controller's v1 hierarchy if it is mounted, else the cgroup2
//!   hierarchy if the controller is available there (enabled in `cgroup.subtree_control` on the
//!   way down);
//! - freezer: cgroup2's `cgroup.freeze` whenever a cgroup2 hierarchy is mounted (it has no
//!   FREEZING limbo, reports completion through `cgroup.events`, and its frozen tasks can still be
//!   ptrace-stopped), else the v1 `freezer` controller.
//!
//! A sandbox's cgroup is `<hierarchy root>/<name>` in every hierarchy used (see `docs/cgroups.md`).
//!
//! The public functions detect the [`Layout`] and pass it to the `*_in` functions that do the
//! work, which the unit tests call with a layout of fixture directories (no root needed).

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, Signal};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup name is not a relative path of simple components.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A limit is out of range.
    #[error("invalid {what} limit: {reason}")]
    InvalidLimit {
        /// Which limit.
        what: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// `/proc/self/mountinfo` could not be read.
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] io::Error),
    /// Neither a cgroup2 hierarchy nor a v1 freezer hierarchy is mounted.
    #[error("no cgroup freezer on this host: mount cgroup2 or the cgroup v1 freezer controller")]
    NoFreezer,
    /// A limit was asked for a controller that this host does not offer.
    #[error("the {controller} cgroup controller is not available on this host")]
    ControllerUnavailable {
        /// The controller's name.
        controller: &'static str,
    },
    /// `create` found the cgroup already there (e.g. left by a crash: remove it first).
    #[error("cgroup {name} already exists ({path})")]
    AlreadyExists {
        /// The cgroup's name.
        name: String,
        /// The directory that exists.
        path: PathBuf,
    },
    /// `open` found no directory of the cgroup in any hierarchy.
    #[error("cgroup {name} does not exist")]
    NotFound {
        /// The cgroup's name.
        name: String,
    },
    /// `open` found the cgroup in some hierarchies only (use [`Cgroup::remove`] to clean it up).
    #[error("cgroup {name} is incomplete, missing: {missing:?}")]
    Incomplete {
        /// The cgroup's name.
        name: String,
        /// The directories that are missing.
        missing: Vec<PathBuf>,
    },
    /// A cgroup file or directory operation failed.
    #[error("cannot {op} {path}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A cgroup file did not have the expected format.
    #[error("unexpected content in {path}: {content:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What it contained.
        content: String,
    },
    /// The cgroup did not freeze in time; it was thawed again.
    #[error("cgroup {name} did not freeze within {timeout:?} (thawed again)")]
    FreezeTimeout {
        /// The cgroup's name.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The cgroup did not thaw in time.
    #[error("cgroup {name} did not thaw within {timeout:?}")]
    ThawTimeout {
        /// The cgroup's name.
        name: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// `destroy`/`remove` refuse a cgroup with child cgroups (e.g. `deltabox` itself).
    #[error("cgroup {name} has child cgroups ({child}): remove them first")]
    HasChildren {
        /// The cgroup's name.
        name: String,
        /// One child cgroup's directory.
        child: PathBuf,
    },
    /// Processes survived SIGKILL (e.g. stuck in uninterruptible sleep).
    #[error("processes {pids:?} of cgroup {name} still exist {timeout:?} after SIGKILL")]
    KillTimeout {
        /// The cgroup's name.
        name: String,
        /// The processes left.
        pids: Vec<i32>,
        /// How long we waited.
        timeout: Duration,
    },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Limits of a sandbox; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Memory (RSS + page cache + kernel memory) in bytes. Swap is never allowed.
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
    /// CPU time as a number of CPUs (1.5 = one and a half CPUs), enforced by the CFS quota.
    pub cpus: Option<f64>,
}

/// Smallest memory limit accepted: below it even a shell cannot start.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;
/// CFS period used for the cpu limit.
const CFS_PERIOD_US: u64 = 100_000;
/// The kernel refuses CFS quotas below 1 ms.
const MIN_CFS_QUOTA_US: u64 = 1_000;

/// How long `freeze` waits before giving up (and thawing again).
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `thaw` waits for the cgroup to report thawed.
const THAW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `kill_all` waits for the processes to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest pids limit: the kernel's own maximum number of pids (`PID_MAX_LIMIT` on 64-bit).
pub const MAX_PIDS: u64 = 4 << 20;

/// CPUs this host has (the largest `cpus` limit).
pub fn host_cpus() -> f64 {
    thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64
}

impl Limits {
    /// Refuses limits a cgroup of this host cannot take (checked again by [`Cgroup::create`]).
    pub fn validate(&self) -> Result<()> {
        if let Some(bytes) = self.memory_bytes {
            if bytes < MIN_MEMORY_BYTES {
                return Err(CgroupError::InvalidLimit {
                    what: "memory",
                    reason: format!("{bytes} bytes is below the minimum of {MIN_MEMORY_BYTES}"),
                });
            }
        }
        if let Some(pids) = self.pids.filter(|p| !(1..=MAX_PIDS).contains(p)) {
            return Err(CgroupError::InvalidLimit {
                what: "pids",
                reason: format!("{pids} is outside 1..={MAX_PIDS}"),
            });
        }
        if let Some(cpus) = self.cpus {
            let max = host_cpus();
            if !cpus.is_finite() || cpus < 0.01 || cpus > max {
                return Err(CgroupError::InvalidLimit {
                    what: "cpus",
                    reason: format!("{cpus} is outside 0.01..={max} (the CPUs of this host)"),
                });
            }
        }
        Ok(())
    }
}

/// cgroup v1 or cgroup2: they name their files differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// A hierarchy's mount point and version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    root: PathBuf,
    version: Version,
}

/// Which hierarchy serves each role on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    memory: Option<Hierarchy>,
    pids: Option<Hierarchy>,
    cpu: Option<Hierarchy>,
    freezer: Hierarchy,
}

impl Layout {
    fn detect() -> Result<Layout> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
        Layout::from_mountinfo(&mountinfo)
    }

    /// The layout of the cgroup mounts listed in `mountinfo`; reads the cgroup2 root's
    /// `cgroup.controllers`.
    fn from_mountinfo(mountinfo: &str) -> Result<Layout> {
        let mounts = parse_cgroup_mounts(mountinfo);
        let unified = mounts.iter().find(|m| m.version == Version::V2).map(|m| m.root.clone());
        let v2_controllers = match &unified {
            Some(root) => read(&root.join("cgroup.controllers"))?,
            None => String::new(),
        };
        let place = |controller: &str| -> Option<Hierarchy> {
            let v1 = mounts.iter().find(|m| m.version == Version::V1 && m.controllers.iter().any(|c| c == controller));
            match (v1, &unified) {
                (Some(m), _) => Some(Hierarchy { root: m.root.clone(), version: Version::V1 }),
                (None, Some(root)) if v2_controllers.split_whitespace().any(|c| c == controller) => {
                    Some(Hierarchy { root: root.clone(), version: Version::V2 })
                }
                (None, _) => None,
            }
        };
        let freezer = match &unified {
            Some(root) => Hierarchy { root: root.clone(), version: Version::V2 },
            None => place("freezer").ok_or(CgroupError::NoFreezer)?,
        };
        Ok(Layout { memory: place("memory"), pids: place("pids"), cpu: place("cpu"), freezer })
    }

    /// Distinct hierarchies used, the freezer's first.
    fn hierarchies(&self) -> Vec<&Hierarchy> {
        let mut all = vec![&self.freezer];
        for h in [&self.memory, &self.pids, &self.cpu].into_iter().flatten() {
            if !all.contains(&h) {
                all.push(h);
            }
        }
        all
    }

    /// Controllers to enable in `cgroup.subtree_control` on the way down the cgroup2 tree.
    fn v2_controllers(&self) -> Vec<&'static str> {
        [("memory", &self.memory), ("pids", &self.pids), ("cpu", &self.cpu)]
            .into_iter()
            .filter(|(_, h)| h.as_ref().is_some_and(|h| h.version == Version::V2))
            .map(|(name, _)| name)
            .collect()
    }
}

/// One cgroup mount found in mountinfo.
#[derive(Debug, PartialEq, Eq)]
struct CgroupMount {
    root: PathBuf,
    version: Version,
    /// v1 only: the controllers bound to this hierarchy.
    controllers: Vec<String>,
}

/// Cgroup mounts in mountinfo order. Line format (proc(5)):
/// `id parent maj:min root mount-point options [optional...] - fstype source super-options`.
fn parse_cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = before.split(' ').nth(4) else {
            continue;
        };
        let mut after = after.split(' ');
        let (Some(fstype), Some(_source), Some(options)) = (after.next(), after.next(), after.next()) else {
            continue;
        };
        let version = match fstype {
            "cgroup" => Version::V1,
            "cgroup2" => Version::V2,
            _ => continue,
        };
        let controllers = match version {
            Version::V1 => options
                .split(',')
                .filter(|o| !o.contains('=') && !matches!(*o, "rw" | "ro"))
                .map(str::to_owned)
                .collect(),
            Version::V2 => Vec::new(),
        };
        mounts.push(CgroupMount { root: PathBuf::from(unescape_mountinfo(mount_point)), version, controllers });
    }
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup's directory in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dir {
    path: PathBuf,
    version: Version,
}

impl Dir {
    fn new(hierarchy: &Hierarchy, name: &str) -> Dir {
        Dir { path: hierarchy.root.join(name), version: hierarchy.version }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

/// A sandbox's cgroup. Dropping the handle leaves the cgroup alone (the sandbox keeps running);
/// [`Cgroup::destroy`] removes it.
#[derive(Debug)]
pub struct Cgroup {
    name: String,
    memory: Option<Dir>,
    pids: Option<Dir>,
    cpu: Option<Dir>,
    /// `None` only for the partial handles [`Cgroup::remove`] builds.
    freezer: Option<Dir>,
    /// Every distinct directory, the freezer's first.
    dirs: Vec<Dir>,
}

impl Cgroup {
    /// Creates the cgroup `name` (e.g. `deltabox/<id>`, relative to each hierarchy's root) with
    /// `limits`. Fails with [`CgroupError::AlreadyExists`] if any of its directories exists.
    pub fn create(name: &str, limits: &Limits) -> Result<Cgroup> {
        Cgroup::create_in(&Layout::detect()?, name, limits)
    }

    fn create_in(layout: &Layout, name: &str, limits: &Limits) -> Result<Cgroup> {
        validate_name(name)?;
        limits.validate()?;
        for (limit, hierarchy, controller) in [
            (limits.memory_bytes.is_some(), &layout.memory, "memory"),
            (limits.pids.is_some(), &layout.pids, "pids"),
            (limits.cpus.is_some(), &layout.cpu, "cpu"),
        ] {
            if limit && hierarchy.is_none() {
                return Err(CgroupError::ControllerUnavailable { controller });
            }
        }
        let cgroup = Cgroup::from_layout(layout, name);
        if let Some(dir) = cgroup.dirs.iter().find(|d| d.path.exists()) {
            return Err(CgroupError::AlreadyExists { name: name.to_owned(), path: dir.path.clone() });
        }
        let v2_controllers = layout.v2_controllers();
        let mut created = Vec::new();
        let result = layout.hierarchies().into_iter().zip(&cgroup.dirs).try_for_each(|(hierarchy, dir)| {
            let io_err = |source| CgroupError::Io { op: "create", path: dir.path.clone(), source };
            if hierarchy.version == Version::V2 {
                enable_v2_controllers(&hierarchy.root, name, &v2_controllers)?;
            }
            if let Some(parent) = dir.path.parent() {
                fs::create_dir_all(parent).map_err(io_err)?;
            }
            fs::create_dir(&dir.path).map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => {
                    CgroupError::AlreadyExists { name: name.to_owned(), path: dir.path.clone() }
                }
                _ => io_err(source),
            })?;
            created.push(dir);
            Ok(())
        });
        let result = result.and_then(|()| cgroup.apply_limits(limits));
        if let Err(err) = result {
            for dir in created {
                if let Err(rmdir_err) = fs::remove_dir(&dir.path) {
                    tracing::warn!(path = %dir.path.display(), error = %rmdir_err,
                        "cannot remove a half-created cgroup");
                }
            }
            return Err(err);
        }
        tracing::debug!(name, ?limits, "created cgroup");
        Ok(cgroup)
    }

    /// Re-attaches to an existing cgroup (e.g. after a daemon restart).
    pub fn open(name: &str) -> Result<Cgroup> {
        Cgroup::open_in(&Layout::detect()?, name)
    }

    fn open_in(layout: &Layout, name: &str) -> Result<Cgroup> {
        validate_name(name)?;
        let cgroup = Cgroup::from_layout(layout, name);
        let missing: Vec<PathBuf> = cgroup.dirs.iter().filter(|d| !d.path.is_dir()).map(|d| d.path.clone()).collect();
        if missing.len() == cgroup.dirs.len() {
            return Err(CgroupError::NotFound { name: name.to_owned() });
        }
        if !missing.is_empty() {
            return Err(CgroupError::Incomplete { name: name.to_owned(), missing });
        }
        Ok(cgroup)
    }

    /// Kills every process of the cgroup `name` and removes whatever exists of it in every
    /// hierarchy, also when it is incomplete. Succeeds when nothing of it exists.
    pub fn remove(name: &str) -> Result<()> {
        validate_name(name)?;
        Cgroup::existing_parts(&Layout::detect()?, name).destroy()
    }

    /// A handle on the directories of `name` that exist (without freezer if its directory is
    /// missing), so that an incomplete cgroup can be destroyed.
    fn existing_parts(layout: &Layout, name: &str) -> Cgroup {
        let mut cgroup = Cgroup::from_layout(layout, name);
        cgroup.dirs.retain(|d| d.path.is_dir());
        if cgroup.freezer.as_ref().is_some_and(|f| !cgroup.dirs.contains(f)) {
            cgroup.freezer = None;
        }
        cgroup
    }

    /// Names (`parent/child`) of the cgroups directly under `parent` in any hierarchy, so the
    /// daemon can find stale ones. Empty if `parent` does not exist.
    pub fn list_children(parent: &str) -> Result<Vec<String>> {
        Cgroup::list_children_in(&Layout::detect()?, parent)
    }

    fn list_children_in(layout: &Layout, parent: &str) -> Result<Vec<String>> {
        validate_name(parent)?;
        let mut names = Vec::new();
        for hierarchy in layout.hierarchies() {
            for child in subdir_names(&hierarchy.root.join(parent))? {
                let name = format!("{parent}/{child}");
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn from_layout(layout: &Layout, name: &str) -> Cgroup {
        let dir = |h: &Option<Hierarchy>| h.as_ref().map(|h| Dir::new(h, name));
        let dirs = layout.hierarchies().into_iter().map(|h| Dir::new(h, name)).collect();
        Cgroup {
            name: name.to_owned(),
            memory: dir(&layout.memory),
            pids: dir(&layout.pids),
            cpu: dir(&layout.cpu),
            freezer: Some(Dir::new(&layout.freezer, name)),
            dirs,
        }
    }

    /// The cgroup's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn apply_limits(&self, limits: &Limits) -> Result<()> {
        if let Some(memory) = &self.memory {
            match memory.version {
                Version::V1 => {
                    if let Some(bytes) = limits.memory_bytes {
                        write(&memory.file("memory.limit_in_bytes"), &bytes.to_string())?;
                        // memory+swap = memory: no swap. Absent without swap accounting.
                        let memsw = memory.file("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            write(&memsw, &bytes.to_string())?;
                        }
                    }
                    // Keeps reclaim of this cgroup from swapping, also without a limit.
                    write(&memory.file("memory.swappiness"), "0")?;
                }
                Version::V2 => {
                    if let Some(bytes) = limits.memory_bytes {
                        write(&memory.file("memory.max"), &bytes.to_string())?;
                    }
                    // Absent when the kernel has no swap accounting.
                    let swap = memory.file("memory.swap.max");
                    if swap.exists() {
                        write(&swap, "0")?;
                    }
                }
            }
        }
        if let (Some(pids), Some(max)) = (&self.pids, limits.pids) {
            write(&pids.file("pids.max"), &max.to_string())?;
        }
        if let (Some(cpu), Some(cpus)) = (&self.cpu, limits.cpus) {
            let quota = ((cpus * CFS_PERIOD_US as f64).round() as u64).max(MIN_CFS_QUOTA_US);
            match cpu.version {
                Version::V1 => {
                    write(&cpu.file("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                    write(&cpu.file("cpu.cfs_quota_us"), &quota.to_string())?;
                }
                Version::V2 => write(&cpu.file("cpu.max"), &format!("{quota} {CFS_PERIOD_US}"))?,
            }
        }
        Ok(())
    }

    /// Moves the process `host_pid` (as seen from the caller's pid namespace), with all its
    /// threads, into the cgroup in every hierarchy. Its future children are born inside.
    pub fn add_process(&self, host_pid: i32) -> Result<()> {
        for dir in &self.dirs {
            write(&dir.file("cgroup.procs"), &host_pid.to_string())?;
        }
        Ok(())
    }

    /// A file listing every process of the cgroup, one pid (of the caller's pid namespace) per line:
    /// the freezer's `cgroup.procs` (every hierarchy holds the same processes, and the freezer's
    /// are the ones a checkpoint stops).
    pub fn procs_file(&self) -> Result<PathBuf> {
        Ok(self.freezer()?.file("cgroup.procs"))
    }

    /// Processes in the cgroup, as pids of the caller's pid namespace.
    pub fn procs(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for dir in &self.dirs {
            for pid in read_pids(&dir.file("cgroup.procs"))? {
                if !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
        }
        Ok(pids)
    }

    fn freezer(&self) -> Result<&Dir> {
        self.freezer.as_ref().ok_or(CgroupError::NoFreezer)
    }

    /// Freezes every process of the cgroup and returns once all of them are frozen. Gives up
    /// after a few seconds (a task stuck in uninterruptible sleep cannot freeze), thawing again.
    pub fn freeze(&self) -> Result<()> {
        let freezer = self.freezer()?;
        let frozen = match freezer.version {
            Version::V2 => set_frozen_v2(freezer, true, FREEZE_TIMEOUT)?,
            Version::V1 => freeze_v1(freezer)?,
        };
        if frozen {
            return Ok(());
        }
        self.thaw()?;
        Err(CgroupError::FreezeTimeout { name: self.name.clone(), timeout: FREEZE_TIMEOUT })
    }

    /// Thaws the cgroup and returns once the kernel reports it thawed.
    pub fn thaw(&self) -> Result<()> {
        let freezer = self.freezer()?;
        let thawed = match freezer.version {
            Version::V2 => set_frozen_v2(freezer, false, THAW_TIMEOUT)?,
            Version::V1 => {
                let state = freezer.file("freezer.state");
                write(&state, "THAWED")?;
                poll_until(THAW_TIMEOUT, || Ok(read(&state)?.trim() == "THAWED"))?
            }
        };
        if thawed {
            Ok(())
        } else {
            Err(CgroupError::ThawTimeout { name: self.name.clone(), timeout: THAW_TIMEOUT })
        }
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> Result<u64> {
        let memory = self.controller(&self.memory, "memory")?;
        let file = match memory.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        read_key(&memory.file(file), "oom_kill")
    }

    /// How many times a fork failed because of the pids limit.
    pub fn pids_limit_hits(&self) -> Result<u64> {
        let pids = self.controller(&self.pids, "pids")?;
        read_key(&pids.file("pids.events"), "max")
    }

    /// Memory charged to the cgroup, in bytes (including page cache).
    pub fn memory_usage(&self) -> Result<u64> {
        let memory = self.controller(&self.memory, "memory")?;
        let file = match memory.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        read_number(&memory.file(file))
    }

    /// Number of processes and threads in the cgroup.
    pub fn pids_current(&self) -> Result<u64> {
        let pids = self.controller(&self.pids, "pids")?;
        read_number(&pids.file("pids.current"))
    }

    fn controller<'a>(&self, dir: &'a Option<Dir>, controller: &'static str) -> Result<&'a Dir> {
        dir.as_ref().ok_or(CgroupError::ControllerUnavailable { controller })
    }

    /// Kills every process of the cgroup and returns once none is left, leaving the cgroup thawed
    /// (ready for new processes, e.g. after a rollback). Uses cgroup2's `cgroup.kill` where the
    /// kernel has it (Linux >= 5.14); otherwise freezes (so nothing can fork meanwhile), sends
    /// SIGKILL to every process, thaws so they die, and repeats until the cgroup is empty.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + KILL_TIMEOUT;
        let kill_file = self
            .freezer
            .as_ref()
            .filter(|f| f.version == Version::V2)
            .map(|f| f.file("cgroup.kill"))
            .filter(|f| f.exists());
        match kill_file {
            Some(kill_file) => {
                write(&kill_file, "1")?;
                self.thaw()?;
            }
            None => self.kill_frozen_until(deadline)?,
        }
        let empty = poll_until(deadline.saturating_duration_since(Instant::now()), || Ok(self.procs()?.is_empty()))?;
        if empty {
            return Ok(());
        }
        Err(CgroupError::KillTimeout { name: self.name.clone(), pids: self.procs()?, timeout: KILL_TIMEOUT })
    }

    /// The freeze + SIGKILL + thaw loop of [`Cgroup::kill_all`].
    fn kill_frozen_until(&self, deadline: Instant) -> Result<()> {
        while Instant::now() < deadline {
            // Frozen, nothing can fork and no pid can be reused between reading and signalling.
            // A task stuck in uninterruptible sleep keeps the cgroup from freezing: kill anyway.
            let frozen = match self.freezer {
                Some(_) => match self.freeze() {
                    Ok(()) => true,
                    Err(CgroupError::FreezeTimeout { .. }) => false,
                    Err(err) => return Err(err),
                },
                None => false,
            };
            let pids = self.procs();
            for &pid in pids.iter().flatten() {
                if let Some(pid) = Pid::from_raw(pid) {
                    // ESRCH: already gone.
                    let _ = rustix::process::kill_process(pid, Signal::KILL);
                }
            }
            if frozen {
                // v1 frozen tasks only die once thawed.
                self.thaw()?;
            }
            if pids?.is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Kills every process ([`Cgroup::kill_all`]) and removes the cgroup's directory in every
    /// hierarchy (parents such as `deltabox/` stay). Refuses a cgroup that has child cgroups:
    /// cgroup2's `cgroup.kill` would kill their processes too.
    pub fn destroy(self) -> Result<()> {
        if self.dirs.is_empty() {
            return Ok(());
        }
        for dir in &self.dirs {
            if let Some(child) = subdir_names(&dir.path)?.first() {
                return Err(CgroupError::HasChildren { name: self.name.clone(), child: dir.path.join(child) });
            }
        }
        self.kill_all()?;
        for dir in &self.dirs {
            match fs::remove_dir(&dir.path) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CgroupError::Io { op: "remove", path: dir.path.clone(), source }),
            }
        }
        tracing::debug!(name = %self.name, "destroyed cgroup");
        Ok(())
    }
}

/// Names of the subdirectories (child cgroups) of `dir`; none if `dir` does not exist.
fn subdir_names(dir: &Path) -> Result<Vec<String>> {
    let io_err = |source| CgroupError::Io { op: "list", path: dir.to_path_buf(), source };
    let entries = match fs::read_dir(dir) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        entries => entries.map_err(io_err)?,
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err)?;
        if entry.file_type().map_err(io_err)?.is_dir() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Names are relative paths of `[A-Za-z0-9._-]` components, as `deltabox/<sandbox id>`.
fn validate_name(name: &str) -> Result<()> {
    let invalid = |reason| Err(CgroupError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return invalid("empty");
    }
    for component in name.split('/') {
        if component.is_empty() {
            return invalid("empty path component (leading, trailing or double '/')");
        }
        if component == "." || component == ".." {
            return invalid("'.' and '..' are not allowed");
        }
        if component.len() > 255 {
            return invalid("a path component is longer than 255 bytes");
        }
        if !component.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            return invalid("only ASCII letters, digits, '.', '_' and '-' are allowed");
        }
        if component.starts_with("cgroup.") {
            return invalid("components starting with 'cgroup.' clash with cgroup files");
        }
    }
    Ok(())
}

/// Enables `controllers` in `cgroup.subtree_control` of the cgroup2 root and of every ancestor
/// of `name`, creating the ancestors. cgroup2 only lets a cgroup use a controller that its parent
/// enabled for its children.
fn enable_v2_controllers(root: &Path, name: &str, controllers: &[&str]) -> Result<()> {
    if controllers.is_empty() {
        return Ok(());
    }
    let mut dir = root.to_path_buf();
    let ancestors: Vec<&str> = name.split('/').collect();
    for (i, component) in ancestors.iter().enumerate() {
        let control = dir.join("cgroup.subtree_control");
        let enabled = read(&control)?;
        let missing: Vec<String> = controllers
            .iter()
            .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
            .map(|c| format!("+{c}"))
            .collect();
        if !missing.is_empty() {
            write(&control, &missing.join(" "))?;
        }
        dir.push(component);
        if i + 1 < ancestors.len() && !dir.is_dir() {
            fs::create_dir(&dir)
                .or_else(|err| match err.kind() {
                    io::ErrorKind::AlreadyExists => Ok(()),
                    _ => Err(err),
                })
                .map_err(|source| CgroupError::Io { op: "create", path: dir.clone(), source })?;
        }
    }
    Ok(())
}

/// cgroup2: writes `cgroup.freeze` and waits until `cgroup.events` reports the new state.
fn set_frozen_v2(freezer: &Dir, frozen: bool, timeout: Duration) -> Result<bool> {
    let value = u64::from(frozen);
    write(&freezer.file("cgroup.freeze"), &value.to_string())?;
    wait_for_event(&freezer.file("cgroup.events"), "frozen", value, timeout)
}

/// v1: writes FROZEN until `freezer.state` says FROZEN. A v1 cgroup can stay FREEZING while
/// new tasks keep appearing (forks racing the freeze); writing FROZEN again retries them, and
/// an occasional thaw lets stuck tasks make progress (as runc does).
fn freeze_v1(freezer: &Dir) -> Result<bool> {
    let state = freezer.file("freezer.state");
    let deadline = Instant::now() + FREEZE_TIMEOUT;
    let mut attempt = 0u32;
    while Instant::now() < deadline {
        write(&state, "FROZEN")?;
        match read(&state)?.trim() {
            "FROZEN" => return Ok(true),
            "FREEZING" => {}
            other => return Err(CgroupError::Parse { path: state, content: other.to_owned() }),
        }
        attempt += 1;
        if attempt.is_multiple_of(50) {
            write(&state, "THAWED")?;
            thread::sleep(Duration::from_millis(1));
        } else {
            thread::sleep(Duration::from_micros(50 * u64::from(attempt.min(20))));
        }
    }
    Ok(false)
}

/// Waits until `key` in a cgroup2 `cgroup.events` file has `value`. The kernel signals changes of
/// that file with POLLPRI, so this sleeps in poll(2), but it sends at most one notification per
/// 10 ms per file (`CGROUP_FILE_NOTIFY_MIN_INTV`, deferring the rest to a timer): a freeze right
/// after a thaw would wait up to 10 ms for its notification. So poll(2) also times out after a
/// short, growing pause (20 µs to 250 µs) to re-read the file.
fn wait_for_event(path: &Path, key: &str, value: u64, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let io_err = |op, source| CgroupError::Io { op, path: path.to_path_buf(), source };
    let mut file = fs::File::open(path).map_err(|e| io_err("open", e))?;
    let mut content = String::new();
    let mut pause = Duration::from_micros(20);
    loop {
        content.clear();
        file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_string(&mut content)).map_err(|e| io_err("read", e))?;
        if parse_key(&content, key) == Some(value) {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let fd = file.as_fd();
        let mut fds = [PollFd::new(&fd, PollFlags::PRI)];
        let timeout = Timespec::try_from(left.min(pause)).expect("a pause fits in a timespec");
        pause = (pause * 2).min(Duration::from_micros(250));
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(io_err("poll", errno.into())),
        }
    }
}

/// Calls `done` with growing pauses (from 50 µs to 10 ms) until it says true or `timeout` passes.
fn poll_until(timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(50);
    loop {
        if done()? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Io { op: "read", path: path.to_path_buf(), source })
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Io { op: "write", path: path.to_path_buf(), source })
}

fn read_number(path: &Path) -> Result<u64> {
    let content = read(path)?;
    content.trim().parse().map_err(|_| CgroupError::Parse { path: path.to_path_buf(), content })
}

fn read_pids(path: &Path) -> Result<Vec<i32>> {
    let content = read(path)?;
    content
        .lines()
        .map(|line| line.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|_| CgroupError::Parse { path: path.to_path_buf(), content })
}

/// Reads `key`'s value from a flat-keyed file (`key value` lines).
fn read_key(path: &Path, key: &str) -> Result<u64> {
    let content = read(path)?;
    parse_key(&content, key).ok_or_else(|| CgroupError::Parse { path: path.to_path_buf(), content })
}

fn parse_key(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// CPU time (utime + stime, in clock ticks) of `pid`.
    fn cpu_ticks(pid: u32) -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        assert!(poll_until(Duration::from_secs(60), || Ok(cond())).unwrap(), "timed out waiting until {what}");
    }

    /// The cgroup2 freezer is what this host's layout uses; hosts without cgroup2 use the v1
    /// freezer, tested here by forcing it into the detected layout.
    #[test]
    fn v1_freezer_freezes_thaws_and_kills() {
        let mut layout = Layout::detect().unwrap();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let Some(v1) = parse_cgroup_mounts(&mountinfo)
            .into_iter()
            .find(|m| m.version == Version::V1 && m.controllers.iter().any(|c| c == "freezer"))
        else {
            testing::skip("this kernel has no cgroup v1 freezer mounted");
            return;
        };
        layout.freezer = Hierarchy { root: v1.root, version: Version::V1 };
        let parent = format!("deltabox-unit-{}", std::process::id());
        let name = format!("{parent}/v1-freezer");
        let cgroup = Cgroup::create_in(&layout, &name, &Limits::default()).unwrap();
        let test = std::panic::catch_unwind(|| {
            let mut child = Command::new("/bin/sh")
                .args(["-c", "read _ || exit 1\nwhile :; do :; done"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            cgroup.add_process(child.id() as i32).unwrap();
            child.stdin.take().unwrap().write_all(b"go\n").unwrap();
            let pid = child.id();
            wait_until("the loop runs", || cpu_ticks(pid) > 0);
            cgroup.freeze().unwrap();
            let frozen_at = cpu_ticks(pid);
            thread::sleep(Duration::from_millis(300));
            assert_eq!(cpu_ticks(pid), frozen_at, "a frozen process kept running");
            cgroup.thaw().unwrap();
            wait_until("the thawed loop runs", || cpu_ticks(pid) > frozen_at);
            // Without cgroup.kill: the freeze + SIGKILL + thaw loop.
            cgroup.kill_all().unwrap();
            assert!(cgroup.procs().unwrap().is_empty());
            child.wait().unwrap();
        });
        // Clean up in the layout the test used, also after a failure.
        let cleanup = [&name, &parent].map(|n| Cgroup::existing_parts(&layout, n).destroy());
        if let Err(panic) = test {
            std::panic::resume_unwind(panic);
        }
        for result in cleanup {
            result.unwrap();
        }
        assert!(!layout.freezer.root.join(&name).exists());
    }

    #[test]
    fn parses_hybrid_mountinfo() {
        let mountinfo = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/un\\040ified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";
        let mounts = parse_cgroup_mounts(mountinfo);
        assert_eq!(
            mounts,
            vec![
                CgroupMount {
                    root: "/sys/fs/cgroup/cpu".into(),
                    version: Version::V1,
                    controllers: vec!["cpu".into()],
                },
                CgroupMount {
                    root: "/sys/fs/cgroup/cpu,cpuacct".into(),
                    version: Version::V1,
                    controllers: vec!["cpu".into(), "cpuacct".into()],
                },
                CgroupMount {
                    root: "/sys/fs/cgroup/systemd".into(),
                    version: Version::V1,
                    controllers: vec!["xattr".into()],
                },
                CgroupMount { root: "/sys/fs/cgroup/un ified".into(), version: Version::V2, controllers: vec![] },
            ]
        );
    }

    #[test]
    fn names_are_validated() {
        for bad in ["", "/abs", "a//b", "a/", "..", "a/../b", "a/./b", "sp ace", "a/cgroup.procs", "é"] {
            assert!(matches!(validate_name(bad), Err(CgroupError::InvalidName { .. })), "{bad:?} accepted");
        }
        for good in ["deltabox/abc-123", "x", "a.b_c/d-e/f"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn limits_are_validated() {
        let bad = [
            Limits { memory_bytes: Some(MIN_MEMORY_BYTES - 1), ..Limits::default() },
            Limits { pids: Some(0), ..Limits::default() },
            Limits { pids: Some(MAX_PIDS + 1), ..Limits::default() },
            Limits { cpus: Some(0.0), ..Limits::default() },
            Limits { cpus: Some(f64::NAN), ..Limits::default() },
            Limits { cpus: Some(1e9), ..Limits::default() },
        ];
        for limits in bad {
            assert!(matches!(limits.validate(), Err(CgroupError::InvalidLimit { .. })), "{limits:?} accepted");
        }
        Limits { memory_bytes: Some(MIN_MEMORY_BYTES), pids: Some(1), cpus: Some(0.5) }.validate().unwrap();
    }

    #[test]
    fn flat_keyed_files_parse() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(parse_key(events, "oom_kill"), Some(2));
        assert_eq!(parse_key(events, "oom"), Some(1));
        assert_eq!(parse_key(events, "missing"), None);
        assert_eq!(parse_key("populated 1\nfrozen 0\n", "frozen"), Some(0));
    }

    /// cgroup mounts on fixture directories, laid out as the kernel would: a root of each mount
    /// and, for cgroup2, its `cgroup.controllers` and `cgroup.subtree_control` (empty). A plain
    /// directory is not cgroupfs (no files appear in new directories, writes are not checked, a
    /// directory with files cannot be removed), so these tests check which directories and files
    /// the code creates and writes for a layout, not what the kernel does with them.
    struct Fixture {
        dir: tempfile::TempDir,
        mountinfo: String,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture { dir: tempfile::tempdir().unwrap(), mountinfo: String::new() }
        }

        fn path(&self, relative: &str) -> PathBuf {
            self.dir.path().join(relative)
        }

        /// A v1 hierarchy of `controllers`, at `<fixture>/<controllers joined by ','>`.
        fn v1(mut self, controllers: &[&str]) -> Fixture {
            let options = controllers.join(",");
            let root = self.path(&options);
            fs::create_dir(&root).unwrap();
            self.mountinfo += &format!("40 31 0:40 / {} rw,relatime - cgroup cgroup rw,{options}\n", root.display());
            self
        }

        /// A cgroup2 hierarchy at `<fixture>/<dir>` offering `controllers`.
        fn v2(mut self, dir: &str, controllers: &str) -> Fixture {
            let root = self.path(dir);
            fs::create_dir(&root).unwrap();
            fs::write(root.join("cgroup.controllers"), controllers).unwrap();
            fs::write(root.join("cgroup.subtree_control"), "").unwrap();
            self.mountinfo += &format!("41 31 0:41 / {} rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n", root.display());
            self
        }

        /// A cgroup2 cgroup that exists already (e.g. `deltabox`, made by the daemon before).
        fn v2_cgroup(self, relative: &str) -> Fixture {
            fs::create_dir(self.path(relative)).unwrap();
            fs::write(self.path(relative).join("cgroup.subtree_control"), "").unwrap();
            self
        }

        fn layout(&self) -> Layout {
            Layout::from_mountinfo(&self.mountinfo).unwrap()
        }

        fn read(&self, relative: &str) -> String {
            fs::read_to_string(self.path(relative)).unwrap()
        }

        /// Names in `<fixture>/<relative>`, sorted; none if it does not exist.
        fn entries(&self, relative: &str) -> Vec<String> {
            let Ok(entries) = fs::read_dir(self.path(relative)) else {
                return Vec::new();
            };
            let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            names.sort();
            names
        }
    }

    fn v1_all() -> Fixture {
        Fixture::new().v1(&["memory"]).v1(&["pids"]).v1(&["cpu", "cpuacct"]).v1(&["freezer"])
    }

    const LIMITS: Limits = Limits { memory_bytes: Some(64 << 20), pids: Some(100), cpus: Some(0.5) };

    #[test]
    fn layouts_are_detected_from_the_mounts() {
        let v1 = |root: PathBuf| Some(Hierarchy { root, version: Version::V1 });
        let v2 = |root: PathBuf| Some(Hierarchy { root, version: Version::V2 });

        let fixture = Fixture::new().v2("v2", "cpuset cpu io memory pids");
        let root = fixture.path("v2");
        let layout = fixture.layout();
        assert_eq!(
            layout,
            Layout {
                memory: v2(root.clone()),
                pids: v2(root.clone()),
                cpu: v2(root.clone()),
                freezer: Hierarchy { root, version: Version::V2 },
            }
        );
        assert_eq!(layout.hierarchies().len(), 1);
        assert_eq!(layout.v2_controllers(), ["memory", "pids", "cpu"]);

        // A controller cgroup2 does not offer is unavailable.
        let fixture = Fixture::new().v2("v2", "memory io");
        let layout = fixture.layout();
        assert_eq!((&layout.pids, &layout.cpu), (&None, &None));
        assert_eq!(layout.v2_controllers(), ["memory"]);

        // Hybrid (this machine): v1 controllers, the freezer of the controller-less cgroup2.
        let fixture = v1_all().v2("unified", "");
        let layout = fixture.layout();
        assert_eq!(
            layout,
            Layout {
                memory: v1(fixture.path("memory")),
                pids: v1(fixture.path("pids")),
                cpu: v1(fixture.path("cpu,cpuacct")),
                freezer: Hierarchy { root: fixture.path("unified"), version: Version::V2 },
            }
        );
        assert!(layout.v2_controllers().is_empty());

        // A controller on v1 stays there even if cgroup2 offers it too.
        let layout = Fixture::new().v1(&["memory"]).v2("unified", "memory pids").layout();
        assert_eq!(layout.memory.unwrap().version, Version::V1);
        assert_eq!(layout.pids.unwrap().version, Version::V2);

        let fixture = v1_all();
        assert_eq!(fixture.layout().freezer, Hierarchy { root: fixture.path("freezer"), version: Version::V1 });
        assert!(matches!(
            Layout::from_mountinfo(&Fixture::new().v1(&["memory"]).mountinfo),
            Err(CgroupError::NoFreezer)
        ));
    }

    #[test]
    fn v2_create_enables_controllers_down_the_tree_and_writes_limits() {
        let fixture = Fixture::new().v2("v2", "cpuset cpu io memory pids").v2_cgroup("v2/deltabox");
        fs::write(fixture.path("v2/cgroup.subtree_control"), "memory").unwrap();
        let cgroup = Cgroup::create_in(&fixture.layout(), "deltabox/sbx", &LIMITS).unwrap();
        // Only the controllers not yet enabled are written.
        assert_eq!(fixture.read("v2/cgroup.subtree_control"), "+pids +cpu");
        assert_eq!(fixture.read("v2/deltabox/cgroup.subtree_control"), "+memory +pids +cpu");
        // memory.swap.max is absent (no swap accounting), so it is not written.
        assert_eq!(fixture.entries("v2/deltabox/sbx"), ["cpu.max", "memory.max", "pids.max"]);
        assert_eq!(fixture.read("v2/deltabox/sbx/memory.max"), (64u64 << 20).to_string());
        assert_eq!(fixture.read("v2/deltabox/sbx/pids.max"), "100");
        assert_eq!(fixture.read("v2/deltabox/sbx/cpu.max"), "50000 100000");
        assert_eq!(cgroup.procs_file().unwrap(), fixture.path("v2/deltabox/sbx/cgroup.procs"));

        // Without limits nothing is enabled or written.
        let fixture = Fixture::new().v2("v2", "cpu memory pids");
        let layout = Layout { memory: None, pids: None, cpu: None, ..fixture.layout() };
        Cgroup::create_in(&layout, "sbx", &Limits::default()).unwrap();
        assert_eq!(fixture.read("v2/cgroup.subtree_control"), "");
        assert!(fixture.entries("v2/sbx").is_empty());
    }

    #[test]
    fn swap_is_disabled_where_it_is_accounted() {
        let fixture = Fixture::new().v2("v2", "memory");
        let cgroup = Cgroup::from_layout(&fixture.layout(), "sbx");
        fs::create_dir(fixture.path("v2/sbx")).unwrap();
        fs::write(fixture.path("v2/sbx/memory.swap.max"), "max").unwrap();
        cgroup.apply_limits(&Limits::default()).unwrap();
        assert_eq!(fixture.read("v2/sbx/memory.swap.max"), "0");
        assert_eq!(fixture.entries("v2/sbx"), ["memory.swap.max"]);

        let fixture = v1_all();
        let cgroup = Cgroup::from_layout(&fixture.layout(), "sbx");
        fs::create_dir(fixture.path("memory/sbx")).unwrap();
        fs::write(fixture.path("memory/sbx/memory.memsw.limit_in_bytes"), "max").unwrap();
        cgroup.apply_limits(&Limits { memory_bytes: LIMITS.memory_bytes, ..Limits::default() }).unwrap();
        assert_eq!(fixture.read("memory/sbx/memory.memsw.limit_in_bytes"), (64u64 << 20).to_string());
        assert_eq!(fixture.read("memory/sbx/memory.limit_in_bytes"), (64u64 << 20).to_string());
    }

    #[test]
    fn v1_create_makes_one_directory_per_hierarchy() {
        let fixture = v1_all();
        let cgroup = Cgroup::create_in(&fixture.layout(), "deltabox/sbx", &LIMITS).unwrap();
        assert_eq!(fixture.entries("memory/deltabox/sbx"), ["memory.limit_in_bytes", "memory.swappiness"]);
        assert_eq!(fixture.read("memory/deltabox/sbx/memory.limit_in_bytes"), (64u64 << 20).to_string());
        assert_eq!(fixture.read("memory/deltabox/sbx/memory.swappiness"), "0");
        assert_eq!(fixture.entries("pids/deltabox/sbx"), ["pids.max"]);
        assert_eq!(fixture.read("pids/deltabox/sbx/pids.max"), "100");
        assert_eq!(fixture.entries("cpu,cpuacct/deltabox/sbx"), ["cpu.cfs_period_us", "cpu.cfs_quota_us"]);
        assert_eq!(fixture.read("cpu,cpuacct/deltabox/sbx/cpu.cfs_period_us"), "100000");
        assert_eq!(fixture.read("cpu,cpuacct/deltabox/sbx/cpu.cfs_quota_us"), "50000");
        assert!(fixture.entries("freezer/deltabox/sbx").is_empty());

        cgroup.add_process(1234).unwrap();
        for hierarchy in ["freezer", "memory", "pids", "cpu,cpuacct"] {
            assert_eq!(fixture.read(&format!("{hierarchy}/deltabox/sbx/cgroup.procs")), "1234");
        }
        assert_eq!(cgroup.procs_file().unwrap(), fixture.path("freezer/deltabox/sbx/cgroup.procs"));

        // The v1 freezer (freezer.state reads back what was written here).
        cgroup.freeze().unwrap();
        assert_eq!(fixture.read("freezer/deltabox/sbx/freezer.state"), "FROZEN");
        cgroup.thaw().unwrap();
        assert_eq!(fixture.read("freezer/deltabox/sbx/freezer.state"), "THAWED");
        // No cgroup.kill on v1: freeze, kill the listed (none), thaw.
        for hierarchy in ["freezer", "memory", "pids", "cpu,cpuacct"] {
            fs::write(fixture.path(&format!("{hierarchy}/deltabox/sbx/cgroup.procs")), "").unwrap();
        }
        fs::write(fixture.path("freezer/deltabox/sbx/freezer.state"), "FROZEN").unwrap();
        cgroup.kill_all().unwrap();
        assert_eq!(fixture.read("freezer/deltabox/sbx/freezer.state"), "THAWED");
    }

    #[test]
    fn hybrid_freezes_on_cgroup2_and_limits_on_v1() {
        let fixture = v1_all().v2("unified", "");
        let cgroup = Cgroup::create_in(&fixture.layout(), "sbx", &LIMITS).unwrap();
        // No controller is on cgroup2: its subtree_control is left alone.
        assert_eq!(fixture.read("unified/cgroup.subtree_control"), "");
        assert!(fixture.entries("unified/sbx").is_empty());
        // The v1 freezer hierarchy is not used.
        assert!(!fixture.path("freezer/sbx").exists());
        assert_eq!(fixture.entries("pids/sbx"), ["pids.max"]);

        fs::write(fixture.path("unified/sbx/cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
        cgroup.freeze().unwrap();
        assert_eq!(fixture.read("unified/sbx/cgroup.freeze"), "1");
        fs::write(fixture.path("unified/sbx/cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        cgroup.thaw().unwrap();
        assert_eq!(fixture.read("unified/sbx/cgroup.freeze"), "0");

        // cgroup.kill where the kernel has it, then a thaw.
        for hierarchy in ["unified", "memory", "pids", "cpu,cpuacct"] {
            fs::write(fixture.path(&format!("{hierarchy}/sbx/cgroup.procs")), "").unwrap();
        }
        fs::write(fixture.path("unified/sbx/cgroup.kill"), "").unwrap();
        fs::write(fixture.path("unified/sbx/cgroup.freeze"), "").unwrap();
        cgroup.kill_all().unwrap();
        assert_eq!(fixture.read("unified/sbx/cgroup.kill"), "1");
        assert_eq!(fixture.read("unified/sbx/cgroup.freeze"), "0");
    }

    #[test]
    fn create_refuses_before_touching_anything() {
        let fixture = Fixture::new().v2("v2", "memory");
        let limits = Limits { pids: Some(10), ..Limits::default() };
        assert!(matches!(
            Cgroup::create_in(&fixture.layout(), "sbx", &limits),
            Err(CgroupError::ControllerUnavailable { controller: "pids" })
        ));
        assert_eq!(fixture.entries("v2"), ["cgroup.controllers", "cgroup.subtree_control"]);

        let fixture = v1_all();
        fs::create_dir_all(fixture.path("pids/deltabox/sbx")).unwrap();
        let err = Cgroup::create_in(&fixture.layout(), "deltabox/sbx", &LIMITS).unwrap_err();
        assert!(matches!(err, CgroupError::AlreadyExists { path, .. } if path == fixture.path("pids/deltabox/sbx")));
        for hierarchy in ["freezer", "memory", "cpu,cpuacct"] {
            assert!(fixture.entries(hierarchy).is_empty(), "{hierarchy} touched");
        }
    }

    #[test]
    fn half_created_cgroups_are_removed() {
        let fixture = v1_all();
        // The cpu hierarchy, created last, cannot take the cgroup.
        fs::write(fixture.path("cpu,cpuacct/deltabox"), "").unwrap();
        let err = Cgroup::create_in(&fixture.layout(), "deltabox/sbx", &LIMITS).unwrap_err();
        assert!(matches!(err, CgroupError::Io { op: "create", .. }), "{err:?}");
        // Parents stay, the cgroup's own directories go.
        for hierarchy in ["freezer", "memory", "pids"] {
            assert_eq!(fixture.entries(&format!("{hierarchy}/deltabox")), Vec::<String>::new(), "{hierarchy}");
            assert!(fixture.path(&format!("{hierarchy}/deltabox")).is_dir());
        }
    }

    #[test]
    fn open_needs_every_hierarchy() {
        let fixture = v1_all();
        let layout = fixture.layout();
        assert!(matches!(Cgroup::open_in(&layout, "deltabox/sbx"), Err(CgroupError::NotFound { .. })));
        for hierarchy in ["freezer", "memory"] {
            fs::create_dir_all(fixture.path(&format!("{hierarchy}/deltabox/sbx"))).unwrap();
        }
        let err = Cgroup::open_in(&layout, "deltabox/sbx").unwrap_err();
        let missing = vec![fixture.path("pids/deltabox/sbx"), fixture.path("cpu,cpuacct/deltabox/sbx")];
        assert!(matches!(&err, CgroupError::Incomplete { missing: m, .. } if *m == missing), "{err:?}");
        for hierarchy in ["pids", "cpu,cpuacct"] {
            fs::create_dir_all(fixture.path(&format!("{hierarchy}/deltabox/sbx"))).unwrap();
        }
        let cgroup = Cgroup::open_in(&layout, "deltabox/sbx").unwrap();
        assert_eq!(cgroup.dirs.len(), 4);
        assert!(matches!(Cgroup::open_in(&layout, "../sbx"), Err(CgroupError::InvalidName { .. })));
    }

    #[test]
    fn children_are_listed_across_hierarchies() {
        let fixture = Fixture::new().v1(&["memory"]).v2("unified", "").v2_cgroup("unified/deltabox");
        let layout = fixture.layout();
        assert!(Cgroup::list_children_in(&layout, "other").unwrap().is_empty());
        for dir in ["unified/deltabox/b", "unified/deltabox/a", "memory/deltabox/a", "memory/deltabox/c"] {
            fs::create_dir_all(fixture.path(dir)).unwrap();
        }
        assert_eq!(Cgroup::list_children_in(&layout, "deltabox").unwrap(), ["deltabox/a", "deltabox/b", "deltabox/c"]);
    }

    #[test]
    fn remove_takes_what_exists() {
        let fixture = Fixture::new().v1(&["memory"]).v1(&["pids"]).v2("unified", "");
        let layout = fixture.layout();
        // Nothing exists: nothing to do.
        let cgroup = Cgroup::existing_parts(&layout, "sbx");
        assert!(cgroup.dirs.is_empty() && cgroup.freezer.is_none());
        cgroup.destroy().unwrap();

        // Without its freezer directory the rest is still taken (and killed without freezing).
        fs::create_dir(fixture.path("pids/sbx")).unwrap();
        let cgroup = Cgroup::existing_parts(&layout, "sbx");
        assert_eq!(cgroup.dirs, [Dir { path: fixture.path("pids/sbx"), version: Version::V1 }]);
        assert!(cgroup.freezer.is_none());

        // A child cgroup (in any hierarchy) stops it before anything is killed or removed.
        fs::create_dir_all(fixture.path("unified/sbx/child")).unwrap();
        let cgroup = Cgroup::existing_parts(&layout, "sbx");
        assert_eq!(cgroup.dirs.len(), 2);
        assert!(cgroup.freezer.is_some());
        let err = cgroup.destroy().unwrap_err();
        assert!(matches!(err, CgroupError::HasChildren { child, .. } if child == fixture.path("unified/sbx/child")));
        assert!(fixture.path("pids/sbx").is_dir() && fixture.entries("unified/sbx") == ["child"]);
    }
}
