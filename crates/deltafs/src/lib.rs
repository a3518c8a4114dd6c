//! DeltaFS: the layered sandbox filesystem (see `docs/architecture.md`).
