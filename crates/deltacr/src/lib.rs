//! DeltaCR: incremental checkpoint/restore of a sandbox's process tree (see `docs/architecture.md`).
