//! DeltaCR: incremental checkpoint/restore of a sandbox's process tree with ptrace (see `docs/deltacr.md`).

pub mod capture;
pub mod engine;
pub mod fdpass;
pub mod files;
pub mod freezer;
pub mod image;
pub mod ipc;
pub mod lazy;
pub mod memuse;
pub mod mm;
pub mod pidns;
pub mod plan;
pub mod procfs;
pub mod ptrace;
pub mod pty;
pub mod restore;
pub mod sockdiag;
pub mod state;
pub mod sys;
pub mod template;
pub mod uffd;

pub use engine::{Checkpoint, CheckpointStats, CrError, Engine, MemoryRestore, Partial, RestoreStats, Sandbox};
pub use freezer::{Freezer, Frozen};
pub use pty::{Degraded, PtyLoss};
pub use state::AddressMove;
