//! Choosing the pid of the next process created in the sandbox's pid namespace.
//!
//! clone3's `set_tid` and writing `ns_last_pid` both need CAP_CHECKPOINT_RESTORE (or CAP_SYS_ADMIN) in
//! the user namespace that owns the pid namespace, which sandbox processes (Docker-like capabilities)
//! do not have; and `ns_last_pid` acts on the writer's own pid namespace. So DeltaCR keeps a helper
//! process of the host (host root, initial user namespace) *inside* the sandbox's pid namespace that
//! writes `ns_last_pid` on request; the next fork/clone by any process of the namespace then gets the
//! pid we want. This is race-free while nothing else in the namespace forks (during a restore the
//! sandbox's own processes are gone or stopped by us, and its init only forks on request).
//!
//! The helper first moves itself to a pid near `pid_max` (so it never holds a pid we need) and puts
//! the counter back where it was. Being a host-root process, it is invisible to (hidepid) and cannot be
//! signalled by the sandbox's processes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};

use nix::sched::{setns, CloneFlags};
use nix::sys::wait::waitpid;
use nix::unistd::{pipe, Pid};

use crate::sys;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum PidNsError {
    #[error("cannot enter the pid namespace of process {pid}")]
    Enter {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the pid helper")]
    Spawn(#[source] io::Error),
    #[error("pid helper request failed")]
    Request(#[source] io::Error),
}

/// A helper in a pid namespace that sets the namespace's last allocated pid.
pub struct PidSetter {
    req: File,
    ack: File,
    helper_ns_pid: i32,
    /// Start of the pids our own long-lived tasks take (see [`PidSetter::reserved_floor`]).
    reserved_floor: i32,
}

impl PidSetter {
    /// Starts a helper in the pid namespace of host process `ns_member` (e.g. the sandbox's init).
    pub fn spawn(ns_member: Pid) -> Result<PidSetter, PidNsError> {
        let enter = |source| PidNsError::Enter { pid: ns_member.as_raw(), source };
        let target = File::open(format!("/proc/{}/ns/pid", ns_member.as_raw())).map_err(enter)?;
        let own = File::open("/proc/thread-self/ns/pid_for_children").map_err(enter)?;
        let pid_max = sandbox::signal_guard::pid_max().map_err(PidNsError::Spawn)?;
        let (req_rd, req_wr) = pipe().map_err(|e| PidNsError::Spawn(e.into()))?;
        let (ack_rd, ack_wr) = pipe().map_err(|e| PidNsError::Spawn(e.into()))?;
        setns(&target, CloneFlags::CLONE_NEWPID).map_err(|e| enter(e.into()))?;
        let forked = sys::fork_pid_helper(req_rd.as_fd(), ack_wr.as_fd(), pid_max - 2);
        setns(&own, CloneFlags::CLONE_NEWPID).map_err(|e| enter(e.into()))?;
        let first = forked.map_err(PidNsError::Spawn)?;
        drop::<OwnedFd>(req_rd);
        drop::<OwnedFd>(ack_wr);
        let reserved_floor = sandbox::signal_guard::reserved_floor(pid_max);
        let mut setter = PidSetter { req: req_wr.into(), ack: ack_rd.into(), helper_ns_pid: 0, reserved_floor };
        let answer = setter.read_answer();
        waitpid(first, None).map_err(|e| PidNsError::Spawn(e.into()))?;
        setter.helper_ns_pid = answer?;
        Ok(setter)
    }

    fn read_answer(&mut self) -> Result<i32, PidNsError> {
        let mut buf = [0u8; 4];
        self.ack.read_exact(&mut buf).map_err(PidNsError::Request)?;
        let v = i32::from_ne_bytes(buf);
        if v < 0 {
            Err(PidNsError::Request(io::Error::from_raw_os_error(-v)))
        } else {
            Ok(v)
        }
    }

    fn request(&mut self, v: i32) -> Result<i32, PidNsError> {
        self.req.write_all(&v.to_ne_bytes()).map_err(PidNsError::Request)?;
        self.read_answer()
    }

    /// The next process or thread created in the namespace gets `pid`.
    pub fn set_next(&mut self, pid: i32) -> Result<(), PidNsError> {
        self.request(pid - 1).map(drop)
    }

    /// The namespace's last allocated pid.
    pub fn last_pid(&mut self) -> Result<i32, PidNsError> {
        self.request(-1)
    }

    /// Sets the namespace's last allocated pid.
    pub fn set_last_pid(&mut self, pid: i32) -> Result<(), PidNsError> {
        self.request(pid).map(drop)
    }

    /// Where the pids of DeltaCR's long-lived tasks in the namespace (templates, spares) start: the top
    /// eighth of the pid range (the helper sits at its very end; the sandbox's signal guard looks only
    /// at signals aimed there). Set the counter here while making
    /// them, then back: they then never hold a pid that a restore of another checkpoint needs (after
    /// rollbacks, timelines reuse pids), and do not change the pids the sandbox hands out next.
    pub fn reserved_floor(&self) -> i32 {
        self.reserved_floor
    }

    /// The helper's own pid inside the namespace.
    pub fn helper_pid(&self) -> i32 {
        self.helper_ns_pid
    }
}
