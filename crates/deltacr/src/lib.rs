//! DeltaCR: incremental checkpoint/restore of a sandbox's process tree with ptrace (see `docs/deltacr.md`).

pub mod pidns;
pub mod procfs;
pub mod ptrace;
pub mod sys;
