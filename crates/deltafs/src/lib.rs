//! DeltaFS: the layered sandbox filesystem, served over FUSE.
//!
//! A mount shows an immutable *stack* (image layers indexed once, then frozen delta layers) plus one
//! writable layer. [`Mount::checkpoint`] freezes the writable layer in O(1) and returns a
//! [`StackId`]; [`Mount::rollback`] switches to any checkpoint of the same base and invalidates the
//! kernel's caches for exactly what differs; any number of mounts (in any process) can start from
//! one checkpoint. The daemon deletes unused data with [`Store::delete_unreferenced`].
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deltafs::{mount, MountOptions, Store};
//! let store = Store::open("/var/lib/deltabox/deltafs".as_ref())?;
//! let base = store.base_stack(&["/var/lib/deltabox/images/layers/abc".into()])?;
//! let m = mount(&store, base, "/run/sb1/rootfs".as_ref(), &MountOptions::default())?;
//! let cp = m.checkpoint()?;
//! // ... the sandbox changes files ...
//! m.rollback(cp)?;
//! m.unmount()?;
//! # Ok(()) }
//! ```
//! Design, on-disk format and measured behaviour: `docs/deltafs.md`.

mod busy_poll;
mod fuse;
mod image;
mod journal;
mod mount;
mod node;
mod reclaim;
mod store;
mod sys;
mod volume;

pub use image::ImageError;
pub use journal::JournalError;
pub use mount::{abort_stale_mount, mount, DiskUsage, Mount, MountError, MountOptions, Quota};
pub use store::{GcStats, InvalidStackId, LayerInfo, StackId, Store, StoreError};
pub use volume::RollbackStats;
