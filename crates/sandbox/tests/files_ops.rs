//! The files API on a real directory tree standing in for a sandbox's root (run as root: files are
//! chowned to the sandbox's host id range).

mod files_support;

use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;

use files_support::{host_id, Fixture, HOST_SECRET, MAP};
use sandbox::files::{FileKind, FilesError, WriteOptions};

fn read_all(fx: &Fixture, path: &str) -> Vec<u8> {
    let (mut file, stat) = fx.files.open_read(path).unwrap_or_else(|e| panic!("open_read {path}: {e}"));
    let mut data = Vec::new();
    file.read_to_end(&mut data).unwrap();
    assert_eq!(stat.size, data.len() as u64);
    data
}

fn write(fx: &Fixture, path: &str, data: &[u8], opts: &WriteOptions) -> Result<sandbox::files::FileStat, FilesError> {
    fx.files.write(path, &mut &data[..], opts)
}

fn temp_files_in(dir: &std::path::Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".deltabox-tmp"))
        .collect()
}

#[test]
fn write_then_read_back_with_mapped_owner_and_mode() {
    let fx = Fixture::new();
    let opts = WriteOptions { mode: 0o4750, uid: 1000, gid: 100, ..WriteOptions::default() };
    let stat = write(&fx, "/home/user/notes.txt", b"hello", &opts).unwrap();
    assert_eq!(
        (stat.path.as_str(), stat.name.as_str(), stat.kind, stat.size, stat.mode, stat.uid, stat.gid),
        ("/home/user/notes.txt", "notes.txt", FileKind::File, 5, 0o4750, 1000, 100)
    );
    assert_eq!(read_all(&fx, "/home/user/notes.txt"), b"hello");

    let host = fs::metadata(fx.host_path("/home/user/notes.txt")).unwrap();
    assert_eq!((host.uid(), host.gid(), host.mode() & 0o7777), (host_id(1000), host_id(100), 0o4750));
    // Parents made for a write are 0755 and belong to the sandbox's root.
    for dir in ["/home", "/home/user"] {
        let meta = fs::metadata(fx.host_path(dir)).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (host_id(0), host_id(0), 0o755), "{dir}");
    }
    assert!(temp_files_in(&fx.host_path("/home/user")).is_empty());
}

#[test]
fn write_replaces_content_and_never_follows_the_target() {
    let fx = Fixture::new();
    write(&fx, "/etc/passwd", b"new content", &WriteOptions::default()).unwrap();
    assert_eq!(read_all(&fx, "/etc/passwd"), b"new content");

    // A symlink at the path is replaced, not written through (here it points at a host file).
    symlink(fx.host.join("secret"), fx.host_path("/tmp/evil")).unwrap();
    write(&fx, "/tmp/evil", b"mine", &WriteOptions::default()).unwrap();
    assert!(fs::symlink_metadata(fx.host_path("/tmp/evil")).unwrap().is_file());
    assert_eq!(read_all(&fx, "/tmp/evil"), b"mine");

    // A hard link elsewhere keeps the old content: the file is replaced, not rewritten in place.
    fs::hard_link(fx.host_path("/etc/passwd"), fx.host_path("/tmp/passwd-link")).unwrap();
    write(&fx, "/etc/passwd", b"third", &WriteOptions::default()).unwrap();
    assert_eq!(read_all(&fx, "/tmp/passwd-link"), b"new content");
    fx.assert_host_untouched();
}

#[test]
fn write_refuses_bad_requests_without_side_effects() {
    let fx = Fixture::new();
    let no_parents = WriteOptions { create_parents: false, ..WriteOptions::default() };
    assert!(
        matches!(write(&fx, "/missing/file", b"x", &no_parents), Err(FilesError::NotFound { path }) if path == "/missing")
    );
    assert!(!fx.host_path("/missing").exists());
    assert!(matches!(write(&fx, "/", b"x", &WriteOptions::default()), Err(FilesError::IsADirectory { .. })));
    assert!(matches!(write(&fx, "/etc", b"x", &WriteOptions::default()), Err(FilesError::IsADirectory { .. })));
    assert!(temp_files_in(&fx.root).is_empty());
    let bad_uid = WriteOptions { uid: MAP.count, ..WriteOptions::default() };
    assert!(matches!(write(&fx, "/tmp/x", b"x", &bad_uid), Err(FilesError::IdNotMapped { id, .. }) if id == MAP.count));
    let bad_mode = WriteOptions { mode: 0o10644, ..WriteOptions::default() };
    assert!(matches!(write(&fx, "/tmp/x", b"x", &bad_mode), Err(FilesError::InvalidMode { .. })));
    // A file where a parent directory should be.
    assert!(matches!(
        write(&fx, "/etc/passwd/x", b"x", &WriteOptions::default()),
        Err(FilesError::NotADirectory { .. })
    ));
    assert!(!fx.host_path("/tmp/x").exists());
}

#[test]
fn write_whose_input_fails_leaves_nothing_behind() {
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 0 {
                return Err(std::io::Error::other("client went away"));
            }
            self.0 -= 1;
            buf[..4].copy_from_slice(b"data");
            Ok(4)
        }
    }
    let fx = Fixture::new();
    let err = fx.files.write("/etc/passwd", &mut Failing(3), &WriteOptions::default()).unwrap_err();
    assert!(matches!(err, FilesError::ReadInput { .. }), "{err:?}");
    assert_eq!(read_all(&fx, "/etc/passwd"), b"root:x:0:0::/root:/bin/sh\n");
    assert!(temp_files_in(&fx.host_path("/etc")).is_empty());
}

#[test]
fn stat_reports_every_kind_and_the_sandbox_view_of_owners() {
    let fx = Fixture::new();
    let tmp = fx.host_path("/tmp");
    symlink("../etc/passwd", tmp.join("link")).unwrap();
    nix::unistd::mkfifo(&tmp.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o640)).unwrap();
    let _listener = UnixListener::bind(tmp.join("sock")).unwrap();
    nix::sys::stat::mknod(
        &tmp.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    fs::write(tmp.join("foreign"), b"abc").unwrap();
    // Host ids outside the sandbox's range show as nobody.
    std::os::unix::fs::chown(tmp.join("foreign"), Some(1234), Some(host_id(7))).unwrap();

    let kind = |path: &str| fx.files.stat(path).unwrap().kind;
    assert_eq!(kind("/"), FileKind::Dir);
    assert_eq!(kind("/tmp/fifo"), FileKind::Fifo);
    assert_eq!(kind("/tmp/sock"), FileKind::Socket);
    assert_eq!(kind("/tmp/null"), FileKind::Char);
    let link = fx.files.stat("/tmp/./link").unwrap();
    assert_eq!(
        (link.kind, link.path.as_str(), link.link_target.as_deref()),
        (FileKind::Symlink, "/tmp/link", Some("../etc/passwd"))
    );
    let foreign = fx.files.stat("/tmp/foreign").unwrap();
    assert_eq!((foreign.uid, foreign.gid, foreign.size), (65534, 7, 3));
    let passwd = fx.files.stat("/etc/passwd").unwrap();
    assert_eq!((passwd.uid, passwd.gid), (0, 0));
    let host_mtime = fs::metadata(fx.host_path("/etc/passwd")).unwrap().mtime();
    assert_eq!(passwd.mtime.floor() as i64, host_mtime);
    let json = serde_json::to_value(&link).unwrap();
    assert_eq!(json["kind"], "symlink");
    assert!(matches!(fx.files.stat("/nope"), Err(FilesError::NotFound { path }) if path == "/nope"));
}

#[test]
fn open_read_refuses_what_is_not_a_regular_file() {
    let fx = Fixture::new();
    let tmp = fx.host_path("/tmp");
    nix::unistd::mkfifo(&tmp.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    // Opening a fifo with nobody writing would block: the API must refuse it without opening it.
    assert!(matches!(fx.files.open_read("/tmp/fifo"), Err(FilesError::NotARegularFile { kind: FileKind::Fifo, .. })));
    assert!(matches!(fx.files.open_read("/etc"), Err(FilesError::IsADirectory { .. })));
    symlink("/etc/passwd", tmp.join("abs-link")).unwrap();
    // A final symlink is followed, inside the sandbox.
    assert_eq!(read_all(&fx, "/tmp/abs-link"), b"root:x:0:0::/root:/bin/sh\n");
}

#[test]
fn list_is_sorted_and_follows_a_symlinked_directory() {
    let fx = Fixture::new();
    for name in ["b", "a", "c"] {
        write(&fx, &format!("/tmp/d/{name}"), name.as_bytes(), &WriteOptions::default()).unwrap();
    }
    fx.files.mkdir("/tmp/d/sub", 0o700, false, 0, 0).unwrap();
    symlink("/tmp/d", fx.host_path("/tmp/dlink")).unwrap();
    let names: Vec<_> = fx.files.list("/tmp/dlink").unwrap().into_iter().map(|s| (s.name, s.path, s.kind)).collect();
    assert_eq!(
        names,
        [
            ("a".into(), "/tmp/dlink/a".into(), FileKind::File),
            ("b".into(), "/tmp/dlink/b".into(), FileKind::File),
            ("c".into(), "/tmp/dlink/c".into(), FileKind::File),
            ("sub".into(), "/tmp/dlink/sub".into(), FileKind::Dir),
        ]
    );
    assert!(matches!(fx.files.list("/etc/passwd"), Err(FilesError::NotADirectory { .. })));
    assert!(matches!(fx.files.list("/nope"), Err(FilesError::NotFound { .. })));
}

#[test]
fn mkdir_with_and_without_parents() {
    let fx = Fixture::new();
    let made = fx.files.mkdir("/srv", 0o1777, false, 5, 6).unwrap();
    assert_eq!((made.kind, made.mode, made.uid, made.gid), (FileKind::Dir, 0o1777, 5, 6));
    let host = fs::metadata(fx.host_path("/srv")).unwrap();
    assert_eq!((host.uid(), host.mode() & 0o7777), (host_id(5), 0o1777));
    assert!(matches!(fx.files.mkdir("/srv", 0o755, false, 0, 0), Err(FilesError::AlreadyExists { .. })));
    assert!(matches!(fx.files.mkdir("/a/b", 0o755, false, 0, 0), Err(FilesError::NotFound { .. })));

    let deep = fx.files.mkdir("/a/b/c", 0o700, true, 1000, 1000).unwrap();
    assert_eq!((deep.mode, deep.uid), (0o700, 1000));
    let parent = fs::metadata(fx.host_path("/a/b")).unwrap();
    assert_eq!((parent.uid(), parent.mode() & 0o7777), (host_id(1000), 0o755));
    // `mkdir -p` of what exists is fine, also through a symlink to a directory; a file is not.
    fx.files.mkdir("/a/b/c", 0o700, true, 0, 0).unwrap();
    symlink("a/b", fx.host_path("/ab")).unwrap();
    fx.files.mkdir("/ab", 0o755, true, 0, 0).unwrap();
    assert!(matches!(fx.files.mkdir("/etc/passwd", 0o755, true, 0, 0), Err(FilesError::AlreadyExists { .. })));
    assert!(matches!(fx.files.mkdir("/", 0o755, false, 0, 0), Err(FilesError::AlreadyExists { .. })));
    assert_eq!(fx.files.mkdir("/", 0o755, true, 0, 0).unwrap().kind, FileKind::Dir);
}

#[test]
fn remove_files_links_and_trees() {
    let fx = Fixture::new();
    write(&fx, "/tmp/t/x/y/file", b"1", &WriteOptions::default()).unwrap();
    write(&fx, "/tmp/t/top", b"2", &WriteOptions::default()).unwrap();
    // Symlinks inside the tree point at a host directory and at a sandbox file: never followed.
    symlink(&fx.host, fx.host_path("/tmp/t/x/to-host")).unwrap();
    symlink("/etc", fx.host_path("/tmp/t/to-etc")).unwrap();
    symlink("/etc/passwd", fx.host_path("/tmp/plink")).unwrap();

    fx.files.remove("/tmp/plink", false).unwrap();
    assert!(fx.host_path("/etc/passwd").exists());
    assert!(matches!(fx.files.remove("/tmp/t", false), Err(FilesError::DirectoryNotEmpty { .. })));
    fx.files.remove("/tmp/t", true).unwrap();
    assert!(!fx.host_path("/tmp/t").exists());
    assert!(fx.host_path("/etc/passwd").exists());
    fx.files.mkdir("/tmp/empty", 0o755, false, 0, 0).unwrap();
    fx.files.remove("/tmp/empty", false).unwrap();
    assert!(matches!(fx.files.remove("/tmp/empty", false), Err(FilesError::NotFound { .. })));
    assert!(matches!(fx.files.remove("/", true), Err(FilesError::InvalidPath { .. })));
    assert!(matches!(fx.files.remove("/..", true), Err(FilesError::PathEscapesRoot { .. })));
    fx.assert_host_untouched();
}

#[test]
fn paths_that_climb_above_root_or_are_malformed_are_refused_by_every_operation() {
    let fx = Fixture::new();
    for path in ["/../../etc/passwd", "../x", "/tmp/../../host/secret"] {
        let escapes = |r: Result<(), FilesError>| matches!(r, Err(FilesError::PathEscapesRoot { .. }));
        assert!(escapes(fx.files.open_read(path).map(drop)), "{path}");
        assert!(escapes(write(&fx, path, b"x", &WriteOptions::default()).map(drop)), "{path}");
        assert!(escapes(fx.files.stat(path).map(drop)), "{path}");
        assert!(escapes(fx.files.list(path).map(drop)), "{path}");
        assert!(escapes(fx.files.mkdir(path, 0o755, true, 0, 0).map(drop)), "{path}");
        assert!(escapes(fx.files.remove(path, true)), "{path}");
        assert!(escapes(fx.files.extract_tar(path, &mut &[][..]).map(drop)), "{path}");
        assert!(escapes(fx.files.write_tar(path, &mut Vec::new())), "{path}");
    }
    for path in ["", "/tmp/a\0b"] {
        assert!(matches!(fx.files.stat(path), Err(FilesError::InvalidPath { .. })), "{path:?}");
    }
    let err = fx.files.stat("../x").unwrap_err();
    assert_eq!(err.code(), "path_escapes_root");
    assert!(!err.to_string().contains(fx.root.to_str().unwrap()), "a host path leaked: {err}");
    fx.assert_host_untouched();
}

#[test]
fn hostile_symlinks_resolve_inside_the_sandbox() {
    let fx = Fixture::new();
    let secret = fx.host.join("secret");
    let tmp = fx.host_path("/tmp");
    // Absolute host path, `..` chains climbing out of the root directory on the host, and a
    // symlinked directory pointing at a host directory.
    symlink(&secret, tmp.join("abs")).unwrap();
    symlink("../../host/secret", tmp.join("rel")).unwrap();
    symlink("/../../../../host/secret", tmp.join("dotdot")).unwrap();
    symlink("../../../../../../../..", tmp.join("up")).unwrap();
    symlink(&fx.host, tmp.join("hostdir")).unwrap();
    // A decoy at the place `rel` and `dotdot` name inside the sandbox.
    fs::create_dir_all(fx.host_path("/host")).unwrap();
    fs::write(fx.host_path("/host/secret"), b"sandbox decoy").unwrap();

    assert!(matches!(fx.files.open_read("/tmp/abs"), Err(FilesError::NotFound { .. })));
    assert_eq!(read_all(&fx, "/tmp/rel"), b"sandbox decoy");
    assert_eq!(read_all(&fx, "/tmp/dotdot"), b"sandbox decoy");
    assert_eq!(read_all(&fx, "/tmp/up/host/secret"), b"sandbox decoy");
    assert_eq!(read_all(&fx, "/tmp/up/etc/passwd"), b"root:x:0:0::/root:/bin/sh\n");
    assert!(matches!(fx.files.list("/tmp/hostdir"), Err(FilesError::NotFound { .. })));
    assert!(matches!(fx.files.stat("/tmp/hostdir/secret"), Err(FilesError::NotFound { .. })));
    assert!(matches!(fx.files.remove("/tmp/hostdir/secret", false), Err(FilesError::NotFound { .. })));

    // Creating through a symlinked directory creates inside the sandbox.
    write(&fx, "/tmp/up/host/new", b"inside", &WriteOptions::default()).unwrap();
    assert_eq!(fs::read(fx.host_path("/host/new")).unwrap(), b"inside");
    // The link dangles inside the sandbox: as for a sandbox process, nothing can be created through it
    // until its target exists there.
    let dangling =
        |r: Result<(), FilesError>| matches!(r, Err(FilesError::NotFound { path }) if path == "/tmp/hostdir");
    assert!(dangling(write(&fx, "/tmp/hostdir/planted", b"x", &WriteOptions::default()).map(drop)));
    assert!(dangling(fx.files.mkdir("/tmp/hostdir/newdir", 0o755, true, 0, 0).map(drop)));
    let host_in_sandbox = fx.root.join(fx.host.strip_prefix("/").unwrap());
    fs::create_dir_all(&host_in_sandbox).unwrap();
    write(&fx, "/tmp/hostdir/planted", b"inside", &WriteOptions::default()).unwrap();
    assert_eq!(fs::read(host_in_sandbox.join("planted")).unwrap(), b"inside");
    let mut tar = Vec::new();
    fx.files.write_tar("/tmp/hostdir", &mut tar).unwrap();
    assert!(!String::from_utf8_lossy(&tar).contains("host secret"));
    fx.assert_host_untouched();
}

#[test]
fn umask_does_not_change_requested_modes() {
    let fx = Fixture::new();
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let file = write(&fx, "/tmp/f", b"", &WriteOptions { mode: 0o666, ..WriteOptions::default() });
    let dir = fx.files.mkdir("/tmp/d", 0o777, false, 0, 0);
    nix::sys::stat::umask(old);
    assert_eq!(file.unwrap().mode, 0o666);
    assert_eq!(dir.unwrap().mode, 0o777);
    assert_eq!(fs::metadata(fx.host_path("/tmp/f")).unwrap().permissions().mode() & 0o777, 0o666);
}

#[test]
fn secret_of_the_host_is_never_reachable_by_reading() {
    let fx = Fixture::new();
    // The same file by every spelling an attacker might try.
    let host_secret = fx.host.join("secret");
    let spellings = [host_secret.to_str().unwrap().to_owned(), "/../host/secret".into(), "host/secret".into()];
    for path in &spellings {
        match fx.files.open_read(path) {
            Ok((mut f, _)) => {
                let mut data = Vec::new();
                f.read_to_end(&mut data).unwrap();
                assert_ne!(data, HOST_SECRET, "{path} reached the host file");
            }
            Err(e) => {
                assert!(matches!(e, FilesError::NotFound { .. } | FilesError::PathEscapesRoot { .. }), "{path}: {e}");
            }
        }
    }
}
