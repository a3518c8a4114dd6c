//! The files API through a real `/proc/<pid>/root` of a process in its own user and mount namespaces,
//! with a small tmpfs mounted only there: the API must see the process's mounts (as the daemon sees a
//! sandbox's /tmp), report ENOSPC cleanly, and refuse the kernel's pseudo-filesystems.

mod files_support;

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;

use files_support::{MountNsProcess, MAP};
use sandbox::files::{FilesError, SandboxRoot, WriteOptions};

struct Setup {
    /// Holds the mount point (empty in our namespace) until the process is gone.
    _dir: tempfile::TempDir,
    /// The mount point as a path inside the process's root (its root is the host's `/`).
    inner: String,
    host_view: std::path::PathBuf,
    files: SandboxRoot,
    _process: MountNsProcess,
}

fn setup(size: &str) -> Option<Setup> {
    let dir = tempfile::Builder::new().prefix("deltabox-procroot-").tempdir().unwrap();
    let mount_point = dir.path().join("mnt");
    fs::create_dir(&mount_point).unwrap();
    let process = MountNsProcess::start(&mount_point, size)?;
    let files = SandboxRoot::open(&process.root_dir(), MAP).unwrap();
    Some(Setup {
        inner: mount_point.to_str().unwrap().to_owned(),
        host_view: mount_point,
        _dir: dir,
        files,
        _process: process,
    })
}

fn leftovers(s: &Setup) -> Vec<String> {
    s.files.list(&s.inner).unwrap().into_iter().map(|e| e.name).collect()
}

#[test]
fn operations_see_the_mounts_of_the_process() {
    let Some(s) = setup("1m") else { return };
    let path = format!("{}/inner.txt", s.inner);
    let opts = WriteOptions { uid: 1000, gid: 1000, ..WriteOptions::default() };
    // The tmpfs belongs to the process's user namespace, where host root's ids are not mapped.
    let stat = s.files.write(&path, &mut &b"only in the namespace"[..], &opts).unwrap();
    assert_eq!((stat.uid, stat.gid), (1000, 1000));
    let host_meta = fs::metadata(s._process.root_dir().join(path.trim_start_matches('/'))).unwrap();
    assert_eq!(host_meta.uid(), MAP.host_base + 1000);
    // Our namespace has the empty mount point; the file went into the process's tmpfs.
    assert_eq!(fs::read_dir(&s.host_view).unwrap().count(), 0);
    let (mut file, _) = s.files.open_read(&path).unwrap();
    let mut data = String::new();
    file.read_to_string(&mut data).unwrap();
    assert_eq!(data, "only in the namespace");
    assert_eq!(leftovers(&s), ["inner.txt"]);

    let mut tar = Vec::new();
    s.files.write_tar(&s.inner, &mut tar).unwrap();
    let dest = format!("{}/copy", s.inner);
    s.files.extract_tar(&dest, &mut &tar[..]).unwrap();
    s.files.mkdir(&format!("{dest}/sub"), 0o700, false, 5, 5).unwrap();
    assert_eq!(s.files.stat(&format!("{dest}/inner.txt")).unwrap().size, 21);
    s.files.remove(&dest, true).unwrap();
    assert_eq!(leftovers(&s), ["inner.txt"]);
}

#[test]
fn a_full_filesystem_gives_no_space_and_leaves_nothing_behind() {
    let Some(s) = setup("256k") else { return };
    let path = format!("{}/f", s.inner);
    s.files.write(&path, &mut &b"old content"[..], &WriteOptions::default()).unwrap();
    let big = vec![7u8; 1 << 20];
    let err = s.files.write(&path, &mut &big[..], &WriteOptions::default()).unwrap_err();
    assert!(matches!(&err, FilesError::NoSpace { path: p } if *p == path), "{err:?}");
    assert_eq!(err.code(), "no_space");
    assert!(err.to_string().contains("no space left"), "{err}");
    // The old file is intact and no temporary file is left.
    let (mut file, _) = s.files.open_read(&path).unwrap();
    let mut data = Vec::new();
    file.read_to_end(&mut data).unwrap();
    assert_eq!(data, b"old content");
    assert_eq!(leftovers(&s), ["f"]);

    // The same for an archive: the file that does not fit is not there, half-written or otherwise.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(big.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    builder.append_data(&mut header, "big", &big[..]).unwrap();
    let tar = builder.into_inner().unwrap();
    let err = s.files.extract_tar(&s.inner, &mut &tar[..]).unwrap_err();
    assert!(matches!(err, FilesError::NoSpace { .. }), "{err:?}");
    assert_eq!(leftovers(&s), ["f"]);
}

#[test]
fn kernel_pseudo_filesystems_and_magic_links_are_refused() {
    let Some(s) = setup("1m") else { return };
    // The process's root is the host's `/`, with /proc and /sys mounted.
    for path in ["/proc/version", "/proc/self/status", "/sys/kernel/uevent_seqnum"] {
        let err = s.files.open_read(path).unwrap_err();
        assert!(matches!(err, FilesError::PseudoFilesystem { .. }), "{path}: {err:?}");
    }
    assert!(matches!(s.files.write_tar("/proc/self", &mut Vec::new()), Err(FilesError::PseudoFilesystem { .. })));
    assert!(matches!(
        s.files.write("/proc/deltabox-test", &mut &b"x"[..], &WriteOptions::default()),
        Err(FilesError::PseudoFilesystem { .. })
    ));
    // /proc/<pid>/root and /proc/<pid>/cwd are magic links: never followed, even inside the root.
    for path in ["/proc/self/root/etc/hostname", "/proc/self/cwd/Cargo.toml"] {
        let err = s.files.open_read(path).unwrap_err();
        assert!(matches!(err, FilesError::InvalidPath { .. }), "{path}: {err:?}");
    }
    // Metadata of pseudo-filesystem files is harmless and allowed.
    s.files.stat("/proc/version").unwrap();
}
