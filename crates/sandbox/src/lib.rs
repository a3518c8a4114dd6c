//! Sandbox isolation: images, namespaces, cgroups, seccomp, our pid 1, exec and files
//! (see `docs/architecture.md`).

pub mod caps;
pub mod cgroup;
pub mod container;
pub mod files;
pub mod image;
pub mod init;
pub mod ipc;
pub mod procfs;
pub mod seccomp;
pub mod signal_guard;
pub mod spec;
pub mod sys;
pub mod userns;
pub mod users;
