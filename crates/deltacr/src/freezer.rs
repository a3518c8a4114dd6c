//! Freezing the sandbox while a checkpoint is taken.
//!
//! The shim owns the sandbox's cgroup (crates/sandbox) and hands DeltaCR a [`Freezer`]; DeltaCR calls
//! `thaw` itself once every process is seized, because tasks frozen by the cgroup v1 freezer sit in the
//! kernel and do not enter ptrace-stop until thawed. [`CgroupFreezer`] is a direct implementation for a
//! cgroup directory (v1 `freezer.state` or v2 `cgroup.freeze`), used by the tests and benchmarks.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Freezes and thaws every process of a sandbox.
pub trait Freezer {
    /// Returns once every process is frozen.
    fn freeze(&self) -> io::Result<()>;
    /// Returns once every process may run again.
    fn thaw(&self) -> io::Result<()>;
}

/// Which cgroup freezer interface a directory has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// The freezer of one cgroup directory.
#[derive(Debug, Clone)]
pub struct CgroupFreezer {
    dir: PathBuf,
    version: CgroupVersion,
}

const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

impl CgroupFreezer {
    /// Uses `dir`, detecting v1 (`freezer.state`) or v2 (`cgroup.freeze`).
    pub fn new(dir: &Path) -> io::Result<CgroupFreezer> {
        let version = if dir.join("freezer.state").exists() {
            CgroupVersion::V1
        } else if dir.join("cgroup.freeze").exists() {
            CgroupVersion::V2
        } else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} has neither freezer.state nor cgroup.freeze", dir.display()),
            ));
        };
        Ok(CgroupFreezer { dir: dir.to_path_buf(), version })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn set(&self, frozen: bool) -> io::Result<()> {
        let (file, value) = match self.version {
            CgroupVersion::V1 => ("freezer.state", if frozen { "FROZEN" } else { "THAWED" }),
            CgroupVersion::V2 => ("cgroup.freeze", if frozen { "1" } else { "0" }),
        };
        std::fs::write(self.dir.join(file), value)?;
        let start = Instant::now();
        while !self.settled(frozen)? {
            if start.elapsed() > SETTLE_TIMEOUT {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("cgroup {} did not reach {value}", self.dir.display()),
                ));
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    fn settled(&self, frozen: bool) -> io::Result<bool> {
        Ok(match self.version {
            CgroupVersion::V1 => {
                let state = std::fs::read_to_string(self.dir.join("freezer.state"))?;
                state.trim() == if frozen { "FROZEN" } else { "THAWED" }
            }
            CgroupVersion::V2 => {
                let events = std::fs::read_to_string(self.dir.join("cgroup.events"))?;
                events.lines().any(|l| l == if frozen { "frozen 1" } else { "frozen 0" })
            }
        })
    }
}

impl Freezer for CgroupFreezer {
    fn freeze(&self) -> io::Result<()> {
        self.set(true)
    }
    fn thaw(&self) -> io::Result<()> {
        self.set(false)
    }
}
