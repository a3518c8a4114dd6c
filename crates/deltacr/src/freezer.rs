//! Freezing the sandbox while a checkpoint is taken.
//!
//! The shim owns the sandbox's cgroup (crates/sandbox) and freezes it by making a [`Frozen`] from a
//! [`Freezer`]; it hands the `Frozen` to [`Engine::checkpoint`](crate::Engine::checkpoint), which thaws
//! the sandbox through it once every running process is seized (tasks frozen by the cgroup v1 freezer
//! sit in the kernel and do not enter ptrace-stop until thawed). A `Frozen` thaws exactly once: then,
//! or when it is dropped on any other way out. Nothing else thaws. The sandbox's own [`Cgroup`] is a
//! `Freezer`.

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

/// A sandbox frozen by its [`Freezer`]: made by freezing it, it thaws it exactly once — at
/// [`Frozen::thaw`], or when dropped if that was not called.
pub struct Frozen<'a> {
    freezer: &'a dyn Freezer,
    frozen: bool,
}

impl<'a> Frozen<'a> {
    /// Freezes the sandbox (nothing to thaw when that fails).
    pub fn new(freezer: &'a dyn Freezer) -> io::Result<Frozen<'a>> {
        freezer.freeze()?;
        Ok(Frozen { freezer, frozen: true })
    }

    /// Thaws the sandbox; does nothing if it was thawed already. A thaw that fails is not tried again.
    pub fn thaw(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.frozen) {
            return Ok(());
        }
        self.freezer.thaw()
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.thaw() {
            tracing::error!(error = %e, "cannot thaw the sandbox");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::{Cell, RefCell};

    use super::*;

    /// Records the calls it gets; `fail` makes them fail.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<&'static str>>,
        fail: Cell<bool>,
    }

    impl Recorder {
        fn record(&self, call: &'static str) -> io::Result<()> {
            self.calls.borrow_mut().push(call);
            if self.fail.get() {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            Ok(())
        }
    }

    impl Freezer for Recorder {
        fn freeze(&self) -> io::Result<()> {
            self.record("freeze")
        }
        fn thaw(&self) -> io::Result<()> {
            self.record("thaw")
        }
    }

    #[test]
    fn an_explicit_thaw_is_the_only_one() {
        let r = Recorder::default();
        let mut frozen = Frozen::new(&r).unwrap();
        assert_eq!(*r.calls.borrow(), ["freeze"]);
        frozen.thaw().unwrap();
        frozen.thaw().unwrap();
        drop(frozen);
        assert_eq!(*r.calls.borrow(), ["freeze", "thaw"]);
    }

    #[test]
    fn dropping_thaws_a_frozen_sandbox() {
        let r = Recorder::default();
        drop(Frozen::new(&r).unwrap());
        assert_eq!(*r.calls.borrow(), ["freeze", "thaw"]);
    }

    #[test]
    fn a_failed_thaw_is_not_retried() {
        let r = Recorder::default();
        let mut frozen = Frozen::new(&r).unwrap();
        r.fail.set(true);
        assert!(frozen.thaw().is_err());
        drop(frozen);
        assert_eq!(*r.calls.borrow(), ["freeze", "thaw"]);
    }

    #[test]
    fn a_failed_freeze_thaws_nothing() {
        let r = Recorder::default();
        r.fail.set(true);
        assert!(Frozen::new(&r).is_err());
        assert_eq!(*r.calls.borrow(), ["freeze"]);
    }
}
