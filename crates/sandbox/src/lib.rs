//! Sandbox isolation: images, namespaces, cgroups, seccomp, our pid 1, exec and files
//! (see `docs/architecture.md`).

pub mod caps;
pub mod cgroup;
pub mod seccomp;
mod sys;
