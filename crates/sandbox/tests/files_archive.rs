//! Tar upload and download through the files API: round trips and hostile archives.

mod files_support;
#[path = "image_support/mod.rs"]
mod image_support;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;

use files_support::{host_id, snapshot, Fixture, MAP};
use image_support::{compress, Comp, Meta, TarBuilder};
use sandbox::files::{FilesError, WriteOptions};
use tar::EntryType;

fn extract(fx: &Fixture, dest: &str, tar: &[u8]) -> Result<sandbox::files::ExtractStats, FilesError> {
    fx.files.extract_tar(dest, &mut &tar[..])
}

/// A tree with every kind of entry an archive can carry, owners across the range, special modes,
/// names longer than a tar header holds, and hard links.
fn build_tree(fx: &Fixture) {
    let w = |path: &str, data: &[u8], mode: u32, uid: u32| {
        let opts = WriteOptions { mode, uid, gid: uid + 1, ..WriteOptions::default() };
        fx.files.write(path, &mut &data[..], &opts).unwrap();
    };
    w("/src/a.txt", b"alpha\n", 0o644, 0);
    w("/src/bin/tool", b"#!/bin/sh\necho hi\n", 0o4755, 0);
    w("/src/empty", b"", 0o600, 1000);
    w("/src/big.bin", &(0..300_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>(), 0o640, 65000);
    let long = format!("/src/{}/{}", "d".repeat(120), "f".repeat(150));
    w(&long, b"long name\n", 0o644, 5);
    fx.files.mkdir("/src/private", 0o2770, false, 1000, 1000).unwrap();
    fx.files.mkdir("/src/sticky", 0o1777, false, 0, 0).unwrap();
    let src = fx.host_path("/src");
    symlink("a.txt", src.join("rel-link")).unwrap();
    symlink("/etc/passwd", src.join("abs-link")).unwrap();
    symlink("../../../../..", src.join("up-link")).unwrap();
    for link in ["rel-link", "abs-link", "up-link"] {
        std::os::unix::fs::lchown(src.join(link), Some(host_id(9)), Some(host_id(10))).unwrap();
    }
    fs::hard_link(src.join("a.txt"), src.join("bin/a-hardlink")).unwrap();
    nix::unistd::mkfifo(&src.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o620)).unwrap();
    std::os::unix::fs::lchown(src.join("fifo"), Some(host_id(3)), Some(host_id(4))).unwrap();
    let name = std::ffi::OsStr::from_bytes(b"latin1-\xe9");
    fs::write(src.join(name), b"not utf-8 name").unwrap();
    std::os::unix::fs::lchown(src.join(name), Some(host_id(0)), Some(host_id(0))).unwrap();
    // Directory mtimes last, after their contents exist.
    let old = nix::sys::time::TimeSpec::new(1_600_000_000, 0);
    for dir in ["/src/private", "/src/bin", "/src"] {
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &fx.host_path(dir),
            &old,
            &old,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

#[test]
fn directory_round_trip_gives_an_identical_tree() {
    let fx = Fixture::new();
    build_tree(&fx);
    let mut tar = Vec::new();
    fx.files.write_tar("/src", &mut tar).unwrap();
    let stats = extract(&fx, "/copy", &tar).unwrap();
    assert_eq!(
        (stats.files, stats.dirs, stats.symlinks, stats.hardlinks, stats.fifos, stats.ids_out_of_range),
        (6, 5, 3, 1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(snapshot(&fx.host_path("/src")), snapshot(&fx.host_path("/copy")));

    // Again through gzip and zstd.
    for (comp, dest) in [(Comp::Gzip, "/copy-gz"), (Comp::Zstd, "/copy-zst")] {
        extract(&fx, dest, &compress(&tar, comp)).unwrap();
        assert_eq!(snapshot(&fx.host_path("/src")), snapshot(&fx.host_path(dest)), "{comp:?}");
    }
    // Over an existing copy, every entry is replaced and the destination keeps its own metadata.
    fs::write(fx.host_path("/copy/a.txt"), b"changed").unwrap();
    fs::remove_file(fx.host_path("/copy/rel-link")).unwrap();
    fs::set_permissions(fx.host_path("/copy"), fs::Permissions::from_mode(0o700)).unwrap();
    extract(&fx, "/copy", &tar).unwrap();
    let mut copy = snapshot(&fx.host_path("/copy"));
    let mut src = snapshot(&fx.host_path("/src"));
    let (copy_root, src_root) = (copy.remove(Path::new("")).unwrap(), src.remove(Path::new("")).unwrap());
    assert_eq!(copy_root.mode, 0o700);
    assert_ne!(src_root.mode, 0o700);
    assert_eq!(src, copy);
}

#[test]
fn single_file_round_trip() {
    let fx = Fixture::new();
    let opts = WriteOptions { mode: 0o751, uid: 42, gid: 43, ..WriteOptions::default() };
    fx.files.write("/data/report.csv", &mut &b"a,b\n1,2\n"[..], &opts).unwrap();
    let mut tar = Vec::new();
    fx.files.write_tar("/data/report.csv", &mut tar).unwrap();
    let stats = extract(&fx, "/elsewhere", &tar).unwrap();
    assert_eq!((stats.files, stats.bytes), (1, 8));
    let copy = fs::metadata(fx.host_path("/elsewhere/report.csv")).unwrap();
    let orig = fs::metadata(fx.host_path("/data/report.csv")).unwrap();
    assert_eq!(
        (copy.uid(), copy.gid(), copy.mode(), copy.mtime()),
        (host_id(42), host_id(43), orig.mode(), orig.mtime())
    );
    assert_eq!(fs::read(fx.host_path("/elsewhere/report.csv")).unwrap(), b"a,b\n1,2\n");
}

#[test]
fn write_tar_of_what_does_not_exist_is_an_error_and_writes_nothing() {
    let fx = Fixture::new();
    let mut out = Vec::new();
    assert!(matches!(fx.files.write_tar("/nope", &mut out), Err(FilesError::NotFound { .. })));
    assert!(out.is_empty());
}

#[test]
fn owners_map_into_the_sandbox_and_foreign_ids_become_root() {
    let fx = Fixture::new();
    let meta = |uid, gid, mode| Meta { uid, gid, mode, ..Meta::default() };
    let tar = TarBuilder::new()
        .file_with("user-file", b"u", &meta(1000, 1001, 0o6755), &[])
        .file_with("foreign", b"f", &meta(u64::from(MAP.count) + 5, 4_000_000_000, 0o644), &[])
        .dir_with("dir", &meta(7, 8, 0o750))
        .finish();
    let stats = extract(&fx, "/up", &tar).unwrap();
    assert_eq!(stats.ids_out_of_range, 2);
    let owner = |path: &str| {
        let m = fs::symlink_metadata(fx.host_path(path)).unwrap();
        (m.uid(), m.gid(), m.mode() & 0o7777)
    };
    assert_eq!(owner("/up/user-file"), (host_id(1000), host_id(1001), 0o6755));
    assert_eq!(owner("/up/foreign"), (host_id(0), host_id(0), 0o644));
    assert_eq!(owner("/up/dir"), (host_id(7), host_id(8), 0o750));
    // Missing parents of entries and the destination itself belong to the sandbox's root.
    assert_eq!(owner("/up"), (host_id(0), host_id(0), 0o755));
}

#[test]
fn entries_climbing_out_are_refused_and_absolute_names_stay_inside() {
    let fx = Fixture::new();
    let err = extract(&fx, "/dest", &TarBuilder::new().file("ok", b"1").file("../escape", b"x").finish()).unwrap_err();
    assert!(matches!(&err, FilesError::ArchiveEntry { entry, .. } if entry == "../escape"), "{err:?}");
    assert_eq!(err.code(), "archive_entry_refused");
    assert!(!fx.host_path("/escape").exists());
    for name in ["a/../../x", "/../../../host/secret"] {
        assert!(matches!(
            extract(&fx, "/dest", &TarBuilder::new().file(name, b"x").finish()),
            Err(FilesError::ArchiveEntry { .. })
        ));
    }
    extract(&fx, "/dest", &TarBuilder::new().file("/etc/abs", b"abs").finish()).unwrap();
    assert_eq!(fs::read(fx.host_path("/dest/etc/abs")).unwrap(), b"abs");
    fx.assert_host_untouched();
}

#[test]
fn nothing_is_written_through_a_symlink_the_archive_created() {
    let fx = Fixture::new();
    let host_dir = fx.host.to_str().unwrap().to_owned();
    for (target, attack) in
        [(host_dir.as_str(), "link/pwned"), ("../../../../..", "link/host/pwned"), ("/etc", "link/passwd")]
    {
        let tar = TarBuilder::new().symlink("link", target).file(attack, b"pwned").finish();
        let err = extract(&fx, "/dest", &tar).unwrap_err();
        assert!(matches!(&err, FilesError::ArchiveEntry { entry, .. } if entry == attack), "{err:?}");
    }
    // The same through a hard link to the archive's symlink.
    let tar = TarBuilder::new().symlink("link", "/etc").hardlink("hl", "link").file("hl/passwd", b"pwned").finish();
    assert!(matches!(extract(&fx, "/dest2", &tar), Err(FilesError::ArchiveEntry { .. })));
    assert_eq!(fs::read(fx.host_path("/etc/passwd")).unwrap(), b"root:x:0:0::/root:/bin/sh\n");
    fx.assert_host_untouched();

    // A symlink replaced by a later entry of the same name is not created; a valid one is, last.
    let tar = TarBuilder::new()
        .symlink("l1", "/etc")
        .file("l1", b"file wins")
        .symlink("l2", "/etc/passwd")
        .hardlink("l2-hard", "l2")
        .finish();
    let stats = extract(&fx, "/dest3", &tar).unwrap();
    assert_eq!((stats.symlinks, stats.hardlinks), (1, 1));
    assert_eq!(fs::read(fx.host_path("/dest3/l1")).unwrap(), b"file wins");
    assert_eq!(fs::read_link(fx.host_path("/dest3/l2")).unwrap().to_str(), Some("/etc/passwd"));
    let l2 = fs::symlink_metadata(fx.host_path("/dest3/l2")).unwrap();
    let l2_hard = fs::symlink_metadata(fx.host_path("/dest3/l2-hard")).unwrap();
    assert_eq!((l2.ino(), l2.uid()), (l2_hard.ino(), host_id(0)));
}

#[test]
fn files_replace_existing_links_instead_of_writing_through_them() {
    let fx = Fixture::new();
    fs::create_dir_all(fx.host_path("/dest")).unwrap();
    symlink(fx.host.join("secret"), fx.host_path("/dest/victim")).unwrap();
    fs::hard_link(fx.host_path("/etc/passwd"), fx.host_path("/dest/passwd-hardlink")).unwrap();
    let tar = TarBuilder::new().file("victim", b"replaced").file("passwd-hardlink", b"replaced too").finish();
    extract(&fx, "/dest", &tar).unwrap();
    assert_eq!(fs::read(fx.host_path("/dest/victim")).unwrap(), b"replaced");
    assert_eq!(fs::read(fx.host_path("/etc/passwd")).unwrap(), b"root:x:0:0::/root:/bin/sh\n");
    fx.assert_host_untouched();
}

#[test]
fn hard_links_must_stay_beneath_the_destination() {
    let fx = Fixture::new();
    fs::create_dir_all(fx.host_path("/dest")).unwrap();
    // The sandbox's own absolute symlink out of the destination.
    symlink("/etc", fx.host_path("/dest/etc-link")).unwrap();
    let tar = TarBuilder::new().hardlink("stolen", "etc-link/passwd").finish();
    let err = extract(&fx, "/dest", &tar).unwrap_err();
    assert!(matches!(&err, FilesError::ArchiveEntry { reason, .. } if reason.contains("outside")), "{err:?}");
    assert!(!fx.host_path("/dest/stolen").exists());
    let tar = TarBuilder::new().hardlink("stolen", "../etc/passwd").finish();
    assert!(matches!(extract(&fx, "/dest", &tar), Err(FilesError::ArchiveEntry { .. })));
    assert_eq!(fs::metadata(fx.host_path("/etc/passwd")).unwrap().nlink(), 1);
}

#[test]
fn existing_symlinks_to_directories_are_followed_inside_the_sandbox() {
    let fx = Fixture::new();
    // A merged-/usr root: /lib -> usr/lib. An archive written on a system without it lists lib/.
    fs::create_dir_all(fx.host_path("/usr/lib")).unwrap();
    symlink("usr/lib", fx.host_path("/lib")).unwrap();
    let before = fs::metadata(fx.host_path("/usr/lib")).unwrap().mode();
    let tar = TarBuilder::new()
        .dir_with("lib", &Meta { mode: 0o700, ..Meta::default() })
        .file("lib/libx.so", b"elf")
        .finish();
    extract(&fx, "/", &tar).unwrap();
    assert!(fs::symlink_metadata(fx.host_path("/lib")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read(fx.host_path("/usr/lib/libx.so")).unwrap(), b"elf");
    assert_eq!(fs::metadata(fx.host_path("/usr/lib")).unwrap().mode(), before);
    // A sandbox symlink to a host path resolves inside the sandbox: the entry lands there or fails.
    symlink(&fx.host, fx.host_path("/hostlink")).unwrap();
    let tar = TarBuilder::new().file("hostlink/planted", b"x").finish();
    assert!(matches!(extract(&fx, "/", &tar), Err(FilesError::NotFound { .. })));
    fx.assert_host_untouched();
}

#[test]
fn devices_are_skipped_and_fifos_created() {
    let fx = Fixture::new();
    let meta = Meta { mode: 0o666, ..Meta::default() };
    let tar = TarBuilder::new()
        .node("disk", EntryType::Block, 8, 0, &meta)
        .node("mem", EntryType::Char, 1, 1, &meta)
        .node("pipe", EntryType::Fifo, 0, 0, &Meta { mode: 0o640, uid: 2, ..Meta::default() })
        .finish();
    let stats = extract(&fx, "/dev-test", &tar).unwrap();
    assert_eq!((stats.skipped_devices, stats.fifos), (2, 1));
    assert!(!fx.host_path("/dev-test/disk").exists() && !fx.host_path("/dev-test/mem").exists());
    let pipe = fs::symlink_metadata(fx.host_path("/dev-test/pipe")).unwrap();
    assert_eq!((pipe.mode() & 0o7777, pipe.uid()), (0o640, host_id(2)));
}

#[test]
fn truncated_or_garbage_archives_are_refused_without_half_files() {
    let fx = Fixture::new();
    let data = vec![b'z'; 100_000];
    let tar = TarBuilder::new().file("first", b"ok").file("big", &data).finish();
    // Cut inside the data of "big".
    let cut = &tar[..tar.len() - 60_000];
    let err = extract(&fx, "/cut", cut).unwrap_err();
    assert!(matches!(err, FilesError::BadArchive { .. }), "{err:?}");
    assert!(!fx.host_path("/cut/big").exists());
    let leftovers: Vec<_> = fs::read_dir(fx.host_path("/cut")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, ["first"]);

    let err = extract(&fx, "/garbage", &[b'x'; 1024]).unwrap_err();
    assert!(matches!(err, FilesError::BadArchive { .. }), "{err:?}");
    assert!(matches!(extract(&fx, "/etc/passwd", &tar), Err(FilesError::NotADirectory { .. })));
}
