//! What an extracted layer looks like (overlayfs whiteouts and opaque dirs, checked through a real
//! overlay mount; owners, modes, times, links, device nodes, xattrs), and the store's guarantees:
//! dedup, digest verification, crash leftovers, concurrent imports, removal.

mod image_support;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use image_support::*;
use sandbox::image::{Digest, ImageError, LayerStore, Progress, SourceFormat};
use tar::EntryType;

/// A v2 `security.capability` value granting CAP_NET_RAW (bit 13), effective.
const CAP_NET_RAW: [u8; 20] = [0x01, 0, 0, 0x02, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let len = rustix::fs::lgetxattr_query(path, name).ok()?;
    let mut buf = vec![0; len];
    let n = rustix::fs::lgetxattr(path, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn is_whiteout(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// A read-only overlay of `lowers` (top first), unmounted on drop.
struct Overlay(PathBuf);

impl Overlay {
    fn mount(lowers: &[PathBuf], target: &Path) -> Option<Overlay> {
        let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems.contains("overlay") {
            testing::skip("this kernel has no overlayfs");
            return None;
        }
        fs::create_dir_all(target).unwrap();
        let lowerdir: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let status = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={}", lowerdir.join(":")))
            .arg(target)
            .status()
            .unwrap();
        assert!(status.success(), "mounting the overlay failed");
        Some(Overlay(target.to_owned()))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn assert_store_clean(store_root: &Path, store: &LayerStore) {
    assert!(store.layers().unwrap().is_empty(), "no layer may appear");
    assert_eq!(names(&store_root.join("tmp")), Vec::<String>::new(), "a failed import leaves nothing in tmp/");
}

#[test]
fn whiteouts_and_opaque_dirs_in_overlay_format() {
    let dir = scratch("whiteouts");
    let lower = TarBuilder::new()
        .dir("a/")
        .file("a/x", b"x")
        .file("a/y", b"y")
        .dir("b/")
        .file("b/z", b"z")
        .file("f", b"f")
        .file("keep", b"keep")
        .finish();
    let upper = TarBuilder::new()
        .dir("a/")
        .file("a/.wh.x", b"")
        .dir("b/")
        .file("b/.wh..wh..opq", b"")
        .file("b/new", b"new")
        .file(".wh.f", b"")
        .file(".wh..wh.plnk", b"")
        .finish();
    OciLayout::single(&dir.path().join("layout"), &[layer(&lower, Comp::Gzip), layer(&upper, Comp::Gzip)]);
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &dir.path().join("layout"));
    let low = store.layer_path(&image.layers[0].diff_id);
    let top = store.layer_path(&image.layers[1].diff_id);

    assert!(is_whiteout(&top.join("a/x")), "a/.wh.x became a 0/0 char device");
    assert!(is_whiteout(&top.join("f")));
    assert!(!top.join("a/.wh.x").exists() && !top.join(".wh..wh.plnk").exists());
    assert_eq!(xattr(&top.join("b"), "trusted.overlay.opaque").as_deref(), Some(&b"y"[..]));
    assert_eq!(xattr(&top.join("a"), "trusted.overlay.opaque"), None);

    let Some(_overlay) = Overlay::mount(&[top, low], &dir.path().join("merged")) else {
        return;
    };
    let merged = dir.path().join("merged");
    assert_eq!(names(&merged), ["a", "b", "keep"]);
    assert_eq!(names(&merged.join("a")), ["y"]);
    assert_eq!(names(&merged.join("b")), ["new"], "opaque b hides the lower b/z");
    assert_eq!(fs::read(merged.join("keep")).unwrap(), b"keep");
}

#[test]
fn owners_modes_times_links_nodes_and_xattrs_are_kept() {
    let dir = scratch("metadata");
    let owned = |mode| Meta { mode, uid: 1234, gid: 5678, mtime: 1_600_000_000 };
    let tar = TarBuilder::new()
        .dir_with("sticky/", &owned(0o1777))
        .dir_with("sgid/", &owned(0o2775))
        .dir("bin/")
        .file_with(
            "bin/ping",
            b"ELF",
            &owned(0o4755),
            &[
                ("security.capability", &CAP_NET_RAW[..]),
                ("user.origin", b"test"),
                // Forged overlayfs metadata is dropped.
                ("trusted.overlay.redirect", b"/etc"),
            ],
        )
        .hardlink("bin/ping6", "bin/ping")
        .symlink("bin/p", "ping")
        .node("dev/null", EntryType::Char, 1, 3, &owned(0o666))
        .node("dev/loop9", EntryType::Block, 7, 9, &owned(0o660))
        .node("run/fifo", EntryType::Fifo, 0, 0, &owned(0o600))
        .finish();
    let path = dir.path().join("rootfs.tar");
    fs::write(&path, &tar).unwrap();
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &path);
    let root = store.layer_path(&image.layers[0].diff_id);

    let meta = |p: &str| fs::symlink_metadata(root.join(p)).unwrap();
    let ping = meta("bin/ping");
    assert_eq!((ping.uid(), ping.gid()), (1234, 5678), "numeric ids kept, not remapped");
    assert_eq!(ping.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(ping.mtime(), 1_600_000_000);
    assert_eq!(
        xattr(&root.join("bin/ping"), "security.capability").as_deref(),
        Some(&CAP_NET_RAW[..]),
        "file capability survives chown/chmod"
    );
    assert_eq!(xattr(&root.join("bin/ping"), "user.origin").as_deref(), Some(&b"test"[..]));
    assert_eq!(xattr(&root.join("bin/ping"), "trusted.overlay.redirect"), None);
    assert_eq!(meta("bin/ping6").ino(), ping.ino(), "hardlink shares the inode");
    assert_eq!(ping.nlink(), 2);
    assert_eq!(fs::read_link(root.join("bin/p")).unwrap(), Path::new("ping"));

    assert_eq!(meta("sticky").mode() & 0o7777, 0o1777);
    assert_eq!(meta("sgid").mode() & 0o7777, 0o2775);
    assert_eq!(meta("sticky").uid(), 1234);
    assert_eq!(meta("sticky").mtime(), 1_600_000_000, "directory mtimes are set after their children");

    let null = meta("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(null.mode() & 0o7777, 0o666);
    let loop9 = meta("dev/loop9");
    assert!(loop9.file_type().is_block_device());
    assert_eq!(loop9.rdev(), rustix::fs::makedev(7, 9));
    assert!(meta("run/fifo").file_type().is_fifo());
    assert_eq!(meta("run").mode() & 0o7777, 0o755, "implicit parents are 0755");
}

#[test]
fn rootfs_directory_is_one_deterministic_layer() {
    let dir = scratch("rootfs-dir");
    let src = dir.path().join("rootfs");
    fs::create_dir_all(src.join("usr/bin")).unwrap();
    fs::create_dir_all(src.join("tmp")).unwrap();
    fs::set_permissions(src.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(src.join("usr/bin/tool"), b"tool").unwrap();
    fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o4711)).unwrap();
    rustix::fs::lsetxattr(
        src.join("usr/bin/tool"),
        "security.capability",
        &CAP_NET_RAW,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::hard_link(src.join("usr/bin/tool"), src.join("usr/bin/tool2")).unwrap();
    std::os::unix::fs::symlink("usr/bin", src.join("bin")).unwrap();
    std::os::unix::fs::lchown(src.join("bin"), Some(42), Some(43)).unwrap();
    std::os::unix::fs::chown(src.join("usr/bin/tool"), Some(7), Some(8)).unwrap();
    // chown clears the capability and setuid; set them again.
    fs::set_permissions(src.join("usr/bin/tool"), fs::Permissions::from_mode(0o4711)).unwrap();
    rustix::fs::lsetxattr(
        src.join("usr/bin/tool"),
        "security.capability",
        &CAP_NET_RAW,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    let long_name = "n".repeat(150);
    fs::write(src.join(&long_name), b"long").unwrap();

    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let image = import(&store, &src);
    assert_eq!(image.format, SourceFormat::RootfsDir);
    let root = store.layer_path(&image.layers[0].diff_id);
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!((tool.uid(), tool.gid(), tool.mode() & 0o7777), (7, 8, 0o4711));
    assert_eq!(tool.ino(), fs::metadata(root.join("usr/bin/tool2")).unwrap().ino());
    assert_eq!(xattr(&root.join("usr/bin/tool"), "security.capability").as_deref(), Some(&CAP_NET_RAW[..]));
    let bin = fs::symlink_metadata(root.join("bin")).unwrap();
    assert_eq!((bin.uid(), bin.gid()), (42, 43));
    assert_eq!(fs::read_link(root.join("bin")).unwrap(), Path::new("usr/bin"));
    assert_eq!(fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert!(fs::symlink_metadata(root.join("fifo")).unwrap().file_type().is_fifo());
    assert_eq!(fs::read(root.join(&long_name)).unwrap(), b"long");

    // The same tree streams to the same bytes: a second import finds the same diff_id.
    let again = import(&store, &src);
    assert_eq!(again.layers, image.layers);
    assert_eq!(store.layers().unwrap().len(), 1);
}

#[test]
fn shared_layers_are_stored_once() {
    let dir = scratch("dedup");
    let base = layer(&TarBuilder::new().dir("etc/").file("etc/os", b"base").finish(), Comp::Gzip);
    let a = layer(&TarBuilder::new().file("a", b"a").finish(), Comp::Gzip);
    let b = layer(&TarBuilder::new().file("b", b"b").finish(), Comp::Zstd);
    OciLayout::single(&dir.path().join("A"), &[base.clone(), a]);
    OciLayout::single(&dir.path().join("B"), &[base.clone(), b]);
    let store = LayerStore::open(&dir.path().join("store")).unwrap();

    let image_a = import(&store, &dir.path().join("A"));
    let base_id: Digest = base.diff_id.parse().unwrap();
    let base_ino = fs::metadata(store.layer_path(&base_id).join("etc/os")).unwrap().ino();

    let mut reports: Vec<Progress> = Vec::new();
    let image_b = store.import(&dir.path().join("B"), &mut |p| reports.push(p)).unwrap();
    assert_eq!(image_a.layers[0], image_b.layers[0]);
    assert_eq!(store.layers().unwrap().len(), 3, "base + a + b");
    assert_eq!(
        fs::metadata(store.layer_path(&base_id).join("etc/os")).unwrap().ino(),
        base_ino,
        "the shared layer was not extracted again"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.done_bytes, last.total_bytes);
    assert!(reports.windows(2).all(|w| w[0].done_bytes <= w[1].done_bytes));
}

#[test]
fn digest_mismatches_are_refused() {
    let tar = TarBuilder::new().file("data", b"original").finish();
    let blob_path = |layout: &Path, l: &Layer| layout.join("blobs/sha256").join(sha256_hex(&l.blob));

    // A layer blob that is not what its descriptor says.
    let dir = scratch("digest-blob");
    let l = layer(&tar, Comp::None);
    let layout = OciLayout::single(&dir.path().join("layout"), std::slice::from_ref(&l));
    let tampered = String::from_utf8_lossy(&l.blob).replace("original", "tampered");
    fs::write(blob_path(&layout.dir, &l), tampered.as_bytes()).unwrap();
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let err = store.import(&layout.dir, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, ImageError::Layer { source, .. }
            if matches!(**source, ImageError::DigestMismatch { .. })),
        "{}",
        chain(&err)
    );
    assert_store_clean(&dir.path().join("store"), &store);

    // A config whose diff_id does not match the layer's uncompressed tar.
    let dir = scratch("digest-diffid");
    let l = layer(&tar, Comp::Gzip);
    let wrong = Layer { diff_id: format!("sha256:{}", sha256_hex(b"something else")), ..l };
    OciLayout::single(&dir.path().join("layout"), &[wrong]);
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let err = store.import(&dir.path().join("layout"), &mut |_| {}).unwrap_err();
    assert!(chain(&err).contains("diff_id in the image config"), "{}", chain(&err));
    assert_store_clean(&dir.path().join("store"), &store);

    // A manifest blob changed after the index was written.
    let dir = scratch("digest-manifest");
    let layout = OciLayout::single(&dir.path().join("layout"), &[layer(&tar, Comp::Gzip)]);
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.dir.join("index.json")).unwrap()).unwrap();
    let manifest = layout.dir.join("blobs/sha256").join(&index["manifests"][0]["digest"].as_str().unwrap()[7..]);
    let mut bytes = fs::read(&manifest).unwrap();
    bytes.push(b' ');
    fs::write(&manifest, bytes).unwrap();
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let err = store.import(&layout.dir, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{}", chain(&err));
}

#[test]
fn hostile_layer_paths_never_leave_the_layer() {
    let dir = scratch("hostile");
    let outside = dir.path().join("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), b"secret").unwrap();
    let out = outside.display().to_string();

    let refused: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", TarBuilder::new().file("../escape", b"x").finish()),
        ("nested dotdot", TarBuilder::new().dir("a/").file("a/../../escape", b"x").finish()),
        ("through an absolute symlink", TarBuilder::new().symlink("link", &out).file("link/pwned", b"x").finish()),
        (
            "through a relative symlink",
            TarBuilder::new().symlink("up", "../../../../../../../..").file(&format!("up{out}/pwned"), b"x").finish(),
        ),
        ("directory through a symlink", TarBuilder::new().symlink("link", &out).dir("link/sub/").finish()),
        ("hardlink with dotdot", TarBuilder::new().hardlink("hl", "../outside/secret").finish()),
        ("hardlink through a symlink", TarBuilder::new().symlink("link", &out).hardlink("hl", "link/secret").finish()),
        ("whiteout through a symlink", TarBuilder::new().symlink("link", &out).file("link/.wh.secret", b"").finish()),
        (
            "opaque marker through a symlink",
            TarBuilder::new().symlink("link", &out).file("link/.wh..wh..opq", b"").finish(),
        ),
        ("whiteout of ..", TarBuilder::new().file(".wh...", b"").finish()),
    ];
    for (case, tar) in refused {
        let store_root = dir.path().join("store");
        let store = LayerStore::open(&store_root).unwrap();
        let path = dir.path().join("layer.tar");
        fs::write(&path, &tar).unwrap();
        let err = store.import(&path, &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{case}: {}", chain(&err));
        assert_eq!(names(&outside), ["secret"], "{case}: wrote outside");
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"secret");
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1, "{case}");
        assert_eq!(xattr(&outside, "trusted.overlay.opaque"), None);
        assert_store_clean(&store_root, &store);
        assert!(!dir.path().join("escape").exists() && !dir.path().join("store/escape").exists());
    }

    // An absolute name lands inside the layer; an absolute hardlink target resolves inside it too
    // (and, missing there, fails) instead of linking a host file.
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let path = dir.path().join("abs.tar");
    fs::write(&path, TarBuilder::new().file(&format!("{out}/abs"), b"inside").finish()).unwrap();
    let image = import(&store, &path);
    let root = store.layer_path(&image.layers[0].diff_id);
    assert_eq!(fs::read(root.join(out.trim_start_matches('/')).join("abs")).unwrap(), b"inside");
    assert!(!outside.join("abs").exists());

    fs::write(&path, TarBuilder::new().hardlink("hl", &format!("{out}/secret")).finish()).unwrap();
    let err = store.import(&path, &mut |_| {}).unwrap_err();
    assert!(matches!(err, ImageError::Extract { .. }), "{}", chain(&err));
    assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
}

#[test]
fn open_removes_crash_leftovers_but_not_running_imports() {
    let dir = scratch("leftovers");
    let root = dir.path().join("store");
    let store = LayerStore::open(&root).unwrap();
    assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
    // What a crash mid-import leaves: a half-extracted layer (with an unreadable dir, which root
    // removes anyway), a half-written sidecar whose layer never appeared, a stray file.
    let crashed = root.join("tmp/work-crashed/layer-0/usr/lib");
    fs::create_dir_all(&crashed).unwrap();
    fs::write(crashed.join("half"), b"half").unwrap();
    fs::set_permissions(crashed.parent().unwrap(), fs::Permissions::from_mode(0o0)).unwrap();
    fs::write(root.join("tmp/stray"), b"").unwrap();
    let orphan = root.join(format!("layers/{}.json", sha256_hex(b"orphan")));
    fs::write(&orphan, b"{}").unwrap();
    // A running import holds a lock on its work dir.
    let running = root.join("tmp/work-running");
    fs::create_dir(&running).unwrap();
    let lock = fs::File::open(&running).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    assert!(store.layers().unwrap().is_empty(), "staged layers are not visible");

    drop(store);
    let store = LayerStore::open(&root).unwrap();
    assert_eq!(names(&root.join("tmp")), ["work-running"]);
    assert!(!orphan.exists());
    assert!(store.layers().unwrap().is_empty());
    drop(lock);
}

#[test]
fn concurrent_imports_of_the_same_image() {
    let dir = scratch("concurrent");
    let files: Vec<(String, Vec<u8>)> = (0..200).map(|i| (format!("d{}/f{i}", i % 10), vec![i as u8; 4096])).collect();
    let tar = files.iter().fold(TarBuilder::new(), |b, (name, data)| b.file(name, data)).finish();
    OciLayout::single(&dir.path().join("layout"), &[layer(&tar, Comp::Gzip)]);
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(|| store.import(&dir.path().join("layout"), &mut |_| {}))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = results[0].as_ref().unwrap();
    for r in &results {
        assert_eq!(r.as_ref().unwrap(), first);
    }
    assert_eq!(store.layers().unwrap().len(), 1);
    let root = store.layer_path(&first.layers[0].diff_id);
    for (name, data) in &files {
        assert_eq!(&fs::read(root.join(name)).unwrap(), data);
    }
    assert_eq!(names(&dir.path().join("store/tmp")), Vec::<String>::new());
}

#[test]
fn remove_layer_removes_it_whole() {
    let dir = scratch("remove");
    let path = dir.path().join("rootfs.tar");
    fs::write(&path, TarBuilder::new().file("x", b"x").finish()).unwrap();
    let store = LayerStore::open(&dir.path().join("store")).unwrap();
    let id = import(&store, &path).layers[0].diff_id;
    store.remove_layer(&id).unwrap();
    assert!(store.layers().unwrap().is_empty());
    assert_eq!(names(&dir.path().join("store/layers")), Vec::<String>::new());
    assert_eq!(names(&dir.path().join("store/tmp")), Vec::<String>::new());
    assert!(matches!(store.remove_layer(&id), Err(ImageError::LayerNotFound { .. })));
    // And it can be imported again.
    assert_eq!(import(&store, &path).layers[0].diff_id, id);
}
