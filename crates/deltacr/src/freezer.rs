//! Freezing the sandbox while a checkpoint is taken.
//!
//! The shim owns the sandbox's cgroup (crates/sandbox) and hands DeltaCR a [`Freezer`]; DeltaCR calls
//! `thaw` itself once every process is seized, because tasks frozen by the cgroup v1 freezer sit in the
//! kernel and do not enter ptrace-stop until thawed. The sandbox's own [`Cgroup`] is a `Freezer`.

use std::io;

use sandbox::cgroup::Cgroup;

/// Freezes and thaws every process of a sandbox.
pub trait Freezer {
    /// Returns once every process is frozen.
    fn freeze(&self) -> io::Result<()>;
    /// Returns once every process may run again.
    fn thaw(&self) -> io::Result<()>;
}

impl Freezer for Cgroup {
    fn freeze(&self) -> io::Result<()> {
        Cgroup::freeze(self).map_err(io::Error::other)
    }
    fn thaw(&self) -> io::Result<()> {
        Cgroup::thaw(self).map_err(io::Error::other)
    }
}
