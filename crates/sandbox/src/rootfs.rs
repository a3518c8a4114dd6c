//! The sandbox's root filesystem. The shim (host root) creates it as a detached mount before it clones
//! init; init attaches it in its own mount namespace and pivots into it. A moved mount, unlike a mount
//! copied into a new user namespace's mount namespace, is not locked, so init may pivot_root into it; and
//! working with descriptors means init never walks the host path to the data directory (which its uid may
//! not traverse).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, open_tree, FsMountFlags, FsOpenFlags, MountAttrFlags,
    OpenTreeFlags,
};

use crate::sys::set_mount_idmap;

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("image layer {path} is not usable")]
    Layer {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the overlay with upper dir {upper} ({step})")]
    Overlay {
        upper: PathBuf,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where a sandbox's files come from.
#[derive(Debug, Clone)]
pub enum Rootfs {
    /// Kernel overlayfs: read-only image layers (bottom first) plus a writable upper directory.
    /// `upper` and `work` must be on the same filesystem; `upper` must be owned by the sandbox's root.
    Overlay { lower: Vec<PathBuf>, upper: PathBuf, work: PathBuf },
}

impl Rootfs {
    /// Creates the filesystem as a detached `nodev` mount (attach it with `move_mount`). `userns` is a
    /// user namespace with the sandbox's id map: image layers are stored with the image's own ids and are
    /// shifted by idmapped mounts.
    pub fn create(&self, userns: BorrowedFd<'_>) -> Result<OwnedFd, RootfsError> {
        match self {
            Rootfs::Overlay { lower, upper, work } => overlay(lower, upper, work, userns),
        }
    }
}

fn overlay(lower: &[PathBuf], upper: &Path, work: &Path, userns: BorrowedFd<'_>) -> Result<OwnedFd, RootfsError> {
    let err = |step: &'static str| {
        move |e: rustix::io::Errno| RootfsError::Overlay { upper: upper.into(), step, source: e.into() }
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).map_err(err("fsopen"))?;
    // Detached idmapped copies of the layers; the overlay keeps its own references to them, so they
    // need no place in any mount tree and vanish with the overlay.
    let mut layer_mounts = Vec::with_capacity(lower.len());
    for path in lower {
        let layer_err = |e: std::io::Error| RootfsError::Layer { path: path.clone(), source: e };
        let m = open_tree(rustix::fs::CWD, path, OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC)
            .map_err(|e| layer_err(e.into()))?;
        set_mount_idmap(m.as_fd(), userns).map_err(layer_err)?;
        layer_mounts.push(m);
    }
    // "lowerdir+" appends below the previous one: the first given is the top-most lower layer.
    for m in layer_mounts.iter().rev() {
        let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(m));
        fsconfig_set_string(&fs, "lowerdir+", path.as_str()).map_err(err("lowerdir+"))?;
    }
    fsconfig_set_string(&fs, "upperdir", upper).map_err(err("upperdir"))?;
    fsconfig_set_string(&fs, "workdir", work).map_err(err("workdir"))?;
    fsconfig_create(&fs).map_err(err("create"))?;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_NODEV).map_err(err("fsmount"))
}
