//! The sandbox's root filesystem. The shim mounts it (in its private mount namespace) before it clones
//! init, whose new mount namespace then starts with a copy of the mount.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, open_tree, FsMountFlags, FsOpenFlags,
    MountAttrFlags, MoveMountFlags, OpenTreeFlags,
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
    #[error("cannot mount the overlay at {target} ({step})")]
    Overlay {
        target: PathBuf,
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
    /// Mounts the filesystem at `target` with `nodev`. `userns` is a user namespace with the sandbox's id
    /// map: image layers are stored with the image's own ids and are shifted by idmapped mounts.
    pub fn mount(&self, target: &Path, userns: BorrowedFd<'_>) -> Result<(), RootfsError> {
        match self {
            Rootfs::Overlay { lower, upper, work } => mount_overlay(lower, upper, work, target, userns),
        }
    }
}

fn mount_overlay(
    lower: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    userns: BorrowedFd<'_>,
) -> Result<(), RootfsError> {
    let err = |step: &'static str| {
        move |e: rustix::io::Errno| RootfsError::Overlay { target: target.into(), step, source: e.into() }
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
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::MOUNT_ATTR_NODEV).map_err(err("fsmount"))?;
    move_mount(&mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(err("move_mount"))?;
    Ok(())
}
