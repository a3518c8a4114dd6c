//! Sandbox isolation: images, namespaces, cgroups, seccomp, our pid 1, exec and files
//! (see `docs/architecture.md`).

pub mod caps;
pub mod cgroup;
pub mod container;
pub mod files;
pub mod image;
pub mod init;
pub mod ipc;
pub mod net;
pub mod procfs;
pub mod seccomp;
pub mod signal_guard;
pub mod slot;
pub mod spec;
pub mod sys;
pub mod userns;
pub mod users;

/// An error and its sources, joined by ": " (for logs and answers that cross process boundaries).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
