//! Fixtures for the files API tests: a directory tree standing in for a sandbox's root next to
//! "host" files that must stay out of reach, a process in its own mount namespace with a tmpfs,
//! and a snapshot of a tree for comparisons.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sandbox::files::SandboxRoot;
use sandbox::userns::IdMap;
use sha2::{Digest, Sha256};

/// The id map of every test sandbox: sandbox id N is host id 3_000_000 + N.
pub const MAP: IdMap = IdMap { host_base: 3_000_000, count: 65536 };

pub fn host_id(sandbox_id: u32) -> u32 {
    MAP.host_base + sandbox_id
}

/// `dir/root` is the sandbox's root; `dir/host` holds host files that must never be reached.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub host: PathBuf,
    pub files: SandboxRoot,
}

pub const HOST_SECRET: &[u8] = b"host secret\n";

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new().prefix("deltabox-files-").tempdir().unwrap();
        let root = dir.path().join("root");
        let host = dir.path().join("host");
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("tmp")).unwrap();
        fs::create_dir_all(&host).unwrap();
        fs::write(host.join("secret"), HOST_SECRET).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        for path in [&root, &root.join("etc"), &root.join("tmp"), &root.join("etc/passwd")] {
            std::os::unix::fs::lchown(path, Some(host_id(0)), Some(host_id(0))).unwrap();
        }
        let files = SandboxRoot::open(&root, MAP).unwrap();
        Fixture { dir, root, host, files }
    }

    /// The host path of the sandbox path `path`.
    pub fn host_path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The host's secret, unchanged.
    pub fn assert_host_untouched(&self) {
        assert_eq!(fs::read(self.host.join("secret")).unwrap(), HOST_SECRET);
        let names: Vec<_> = fs::read_dir(&self.host).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["secret"], "something was created in the host directory");
    }
}

/// A process in its own user namespace (with [`MAP`], as a sandbox) and mount namespace, running as
/// the namespace's root, with a tmpfs of `size` mounted at `mount_point` (a directory that also
/// exists, empty, in the host's namespace). The tmpfs belongs to the user namespace, as a sandbox's
/// /tmp does. Killed when dropped.
pub struct MountNsProcess {
    child: Child,
}

impl MountNsProcess {
    /// Returns `None` (with a printed reason) when user or mount namespaces are not available.
    pub fn start(mount_point: &Path, size: &str) -> Option<MountNsProcess> {
        let mut child = Command::new("unshare")
            .args(["--user", "--mount", "--propagation", "private", "sleep", "1000"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) must be installed");
        let pid = child.id();
        let own_userns = fs::read_link("/proc/self/ns/user").unwrap();
        // unshare(1) runs `sleep` once its namespaces exist; until then the process shares ours.
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                testing::skip(format!("cannot create user and mount namespaces here ({status}): {stderr}"));
                return None;
            }
            if fs::read_link(format!("/proc/{pid}/ns/user")).is_ok_and(|ns| ns != own_userns) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let process = MountNsProcess { child };
        MAP.write_for(pid as i32).unwrap();
        // Mount as the namespace's root, so the tmpfs belongs to its user namespace.
        let output = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "--user", "--mount", "--setuid", "0", "--setgid", "0"])
            .args(["mount", "-t", "tmpfs", "-o", &format!("size={size},mode=0755"), "deltabox-test"])
            .arg(mount_point)
            .output()
            .unwrap();
        assert!(output.status.success(), "mount failed: {}", String::from_utf8_lossy(&output.stderr));
        Some(process)
    }

    /// `/proc/<pid>/root`: the process's root, with the mounts of its namespace.
    pub fn root_dir(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.child.id()))
    }
}

impl Drop for MountNsProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a tree looks like, path by path, as the sandbox sees it through the files API's rules:
/// kind, permission bits, owner, size, content, link target, mtime (seconds), and which paths share
/// an inode (hard links, as the index of the first path of the group).
#[derive(Debug, PartialEq)]
pub struct Node {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// SHA-256 of a regular file's content.
    pub content: Option<String>,
    pub link_target: Option<PathBuf>,
    pub mtime: i64,
    pub linked_with: Option<PathBuf>,
}

pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    let mut inodes = BTreeMap::new();
    walk(dir, dir, &mut nodes, &mut inodes);
    nodes
}

fn walk(base: &Path, path: &Path, nodes: &mut BTreeMap<PathBuf, Node>, inodes: &mut BTreeMap<u64, PathBuf>) {
    let meta = fs::symlink_metadata(path).unwrap();
    let rel = path.strip_prefix(base).unwrap().to_owned();
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_file() {
        "file"
    } else {
        "other"
    };
    let linked_with =
        (!ft.is_dir() && meta.nlink() > 1).then(|| inodes.entry(meta.ino()).or_insert(rel.clone()).clone());
    nodes.insert(
        rel,
        Node {
            kind,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            content: ft.is_file().then(|| hex::encode(Sha256::digest(fs::read(path).unwrap()))),
            link_target: ft.is_symlink().then(|| fs::read_link(path).unwrap()),
            mtime: meta.mtime(),
            linked_with,
        },
    );
    if ft.is_dir() {
        let mut children: Vec<_> = fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        children.sort();
        for child in children {
            walk(base, &child, nodes, inodes);
        }
    }
}
