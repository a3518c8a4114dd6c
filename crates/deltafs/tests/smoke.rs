mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::*;

#[test]
fn basic_file_operations_on_a_mount() {
    if !fuse_available() {
        return;
    }
    let fx = Fixture::new();
    let base = fx.base(|d| {
        std::fs::write(d.join("hello"), b"hello world").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a"), b"aaa").unwrap();
    });
    let m = fx.mount(base, "m");
    let root = m.mountpoint().to_owned();
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello world");
    assert_eq!(std::fs::read(root.join("sub/a")).unwrap(), b"aaa");
    std::fs::write(root.join("new"), b"fresh").unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("hello"))
        .unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    f.write_all(b"WORLD").unwrap();
    drop(f);
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello WORLD");
    std::fs::rename(root.join("sub"), root.join("moved")).unwrap();
    assert_eq!(std::fs::read(root.join("moved/a")).unwrap(), b"aaa");
    std::fs::hard_link(root.join("new"), root.join("new2")).unwrap();
    std::os::unix::fs::symlink("new", root.join("link")).unwrap();
    let mut s = String::new();
    std::fs::File::open(root.join("link"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    assert_eq!(s, "fresh");
    std::fs::remove_file(root.join("new")).unwrap();
    assert_eq!(std::fs::read(root.join("new2")).unwrap(), b"fresh");
    let cp = m.checkpoint().unwrap();
    std::fs::write(root.join("hello"), b"changed").unwrap();
    std::fs::remove_dir_all(root.join("moved")).unwrap();
    m.rollback(cp).unwrap();
    assert_eq!(std::fs::read(root.join("hello")).unwrap(), b"hello WORLD");
    assert_eq!(std::fs::read(root.join("moved/a")).unwrap(), b"aaa");
    m.unmount().unwrap();
}
