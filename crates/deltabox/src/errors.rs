//! Error text for answers that cross process boundaries, and how the daemon and the shim classify errors.

pub use sandbox::error_chain;

/// The failure is a full disk (or a used-up quota): the user can free space and try again.
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let errno = cause.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error);
        let sql = cause.downcast_ref::<rusqlite::Error>().and_then(rusqlite::Error::sqlite_error_code);
        matches!(errno, Some(libc::ENOSPC | libc::EDQUOT)) || sql == Some(rusqlite::ErrorCode::DiskFull)
    })
}
