//! Sandbox isolation: images, namespaces, cgroups, seccomp, our pid 1, exec and files
//! (see `docs/architecture.md`).

pub mod image;
