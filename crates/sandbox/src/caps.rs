//! Docker's default capability set for sandbox processes.
//!
//! [`restrict_to_default`] runs in a child that init has just forked, before `execve`: it must not
//! allocate, so it uses only plain syscalls (`prctl`, `capget`, `capset` via `rustix`) on values
//! computed at compile time. Capabilities are relative to the sandbox's user namespace.

use std::io;

use rustix::thread::{CapabilitySet, CapabilitySets};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    /// `prctl(PR_CAPBSET_DROP)` failed (the caller lacks `CAP_SETPCAP`).
    #[error("cannot drop capability {cap} from the bounding set")]
    DropBounding {
        /// The capability number (`CAP_*`).
        cap: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// `prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)` failed.
    #[error("cannot clear the ambient capability set")]
    ClearAmbient(#[source] io::Error),
    /// `capget` or `capset` failed.
    #[error("cannot read or set the permitted/effective/inheritable capabilities")]
    Capset(#[source] io::Error),
}

/// Docker's default set: CHOWN DAC_OVERRIDE FSETID FOWNER MKNOD NET_RAW SETGID SETUID SETFCAP
/// SETPCAP NET_BIND_SERVICE SYS_CHROOT KILL AUDIT_WRITE (`0xa80425fb`).
pub const DEFAULT_CAPS: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::MKNOD)
    .union(CapabilitySet::NET_RAW)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETFCAP)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::AUDIT_WRITE);

/// Capability numbers fit in the kernel's 64-bit sets.
const MAX_CAPS: u32 = 64;

/// Restricts the calling thread to [`DEFAULT_CAPS`]: drops every other capability from the
/// bounding set (so an `execve` as root cannot regain it), clears the ambient set, keeps only
/// default capabilities in the permitted and effective sets, and empties the inheritable set
/// (as Docker does since CVE-2022-24769).
///
/// Allocates nothing. Needs `CAP_SETPCAP` (part of the default set). Call it after
/// [`crate::seccomp::SeccompFilter::install`], which needs `CAP_SYS_ADMIN`.
pub fn restrict_to_default() -> Result<(), CapsError> {
    for cap in 0..MAX_CAPS {
        let set = CapabilitySet::from_bits_retain(1 << cap);
        if DEFAULT_CAPS.contains(set) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(set) {
            Ok(()) => {}
            // Numbers above the kernel's last capability (/proc/sys/kernel/cap_last_cap).
            Err(rustix::io::Errno::INVAL) => break,
            Err(errno) => return Err(CapsError::DropBounding { cap, source: errno.into() }),
        }
    }
    rustix::thread::clear_ambient_capability_set().map_err(|errno| CapsError::ClearAmbient(errno.into()))?;
    let current = rustix::thread::capabilities(None).map_err(|errno| CapsError::Capset(errno.into()))?;
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: current.effective & DEFAULT_CAPS,
            permitted: current.permitted & DEFAULT_CAPS,
            inheritable: CapabilitySet::empty(),
        },
    )
    .map_err(|errno| CapsError::Capset(errno.into()))
}
