//! Descriptions of sandboxes and processes shared by the daemon, the shim and init.

use serde::{Deserialize, Serialize};

/// How the sandbox reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own network namespace with only the loopback interface.
    #[default]
    None,
    /// The host's network namespace: no isolation at all (the daemon refuses it unless started with
    /// `--allow-host-network`).
    Host,
    /// Its own network namespace with an address of its own, reaching the outside through the host's NAT
    /// under the daemon's egress policy (docs/network.md).
    Nat,
}

/// The sandbox's addressing in the [`Network::Nat`] mode, as init configures its `eth0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatAddress {
    /// The sandbox's own address.
    pub address: std::net::Ipv4Addr,
    /// The host's end of the link: the sandbox's default gateway and DNS server.
    pub gateway: std::net::Ipv4Addr,
    pub prefix_len: u8,
}

/// A process to start inside a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessSpec {
    /// Program and arguments; the program is looked up in `PATH` from `env` when it has no `/`.
    pub argv: Vec<String>,
    /// The complete environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// `user`, `uid`, `user:group` or `uid:gid` as in the sandbox's /etc/passwd; `None` = root.
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of this size instead of pipes.
    pub tty: Option<WinSize>,
    /// Descriptor numbers for the extra descriptors sent with the request (after stdin, stdout and
    /// stderr when there is no tty).
    #[serde(default)]
    pub extra_fds: Vec<i32>,
}

/// Terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when a signal killed it.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Decodes a `waitpid` status word.
    pub fn from_wait_status(status: nix::sys::wait::WaitStatus) -> Option<ExitStatus> {
        use nix::sys::wait::WaitStatus;
        match status {
            WaitStatus::Exited(_, code) => Some(ExitStatus { code: Some(code), signal: None }),
            WaitStatus::Signaled(_, sig, _) => Some(ExitStatus { code: None, signal: Some(sig as i32) }),
            _ => None,
        }
    }

    /// The shell convention: the code, or 128 + signal number.
    pub fn shell_code(&self) -> i32 {
        self.code.unwrap_or_else(|| 128 + self.signal.unwrap_or(0))
    }
}

/// Messages from the shim to init.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToInit {
    /// User namespace maps and cgroup are in place: set up the sandbox and report `Ready`. The packet
    /// carries the root filesystem as a detached mount (from `fsmount` or `open_tree(OPEN_TREE_CLONE)`).
    Go,
    /// Fork and exec a process. Without a tty, the packet carries stdin, stdout and stderr, then the
    /// descriptors listed in `spec.extra_fds`.
    Spawn { id: u64, spec: ProcessSpec },
    /// Send `signal` to process `pid` (to its process group when `group`).
    Signal { pid: i32, signal: i32, group: bool },
    /// Create these FIFOs (and their directories) inside the sandbox if missing, and send each opened
    /// read-write, in order, with `FifosOpened`. The shim never opens a path inside the sandbox itself: a
    /// process there could have put a symlink to a host file in its way (see docs/security.md).
    OpenFifos { paths: Vec<String> },
    /// Report the end of process `pid` (a child of init it did not start itself, e.g. one restored from a
    /// checkpoint) with `Exited`.
    Watch { pid: i32 },
}

/// Messages from init to the shim.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromInit {
    /// Set up; the packet carries the signal guard's seccomp listener, for the shim to serve
    /// ([`crate::signal_guard::serve`]): until it does, signals sent inside by pid wait.
    Ready,
    SetupFailed {
        message: String,
    },
    /// The program was executed. With a tty, the packet carries the pty master.
    Spawned {
        id: u64,
        pid: i32,
    },
    /// The process could not be started; `message` says which step failed and why.
    SpawnFailed {
        id: u64,
        message: String,
    },
    /// Answer to `OpenFifos`: without an error, the packet carries one descriptor per path.
    FifosOpened {
        error: Option<String>,
    },
    /// A process started by `Spawn` ended.
    Exited {
        pid: i32,
        status: ExitStatus,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_code_follows_the_shell_convention() {
        assert_eq!(ExitStatus { code: None, signal: Some(9) }.shell_code(), 137);
        assert_eq!(ExitStatus { code: Some(3), signal: None }.shell_code(), 3);
    }
}
