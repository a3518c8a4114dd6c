//! Raw syscalls of this crate, each wrapped in a small safe function.

use std::io;

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, program)`: installs a classic-BPF filter on the calling
/// thread. Allocates nothing (callable in a child forked from a multi-threaded process).
pub(crate) fn seccomp_set_mode_filter(program: &[seccompiler::sock_filter]) -> io::Result<()> {
    let len =
        u16::try_from(program.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let fprog = libc::sock_fprog {
        len,
        // The kernel only reads the program (copy_from_user); libc's type is `*mut` by history.
        filter: program.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: `fprog` points at `len` instructions that live for the whole call;
    // `seccompiler::sock_filter` and `libc::sock_filter` are both `#[repr(C)]`
    // `{ u16 code; u8 jt; u8 jf; u32 k }`, the kernel's `struct sock_filter`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
