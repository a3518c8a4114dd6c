//! Sandbox paths, normalised lexically before the kernel sees them.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use super::FilesError;

/// An absolute path inside the sandbox, as components that are never empty, `.` or `..`.
/// The root is the empty list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SandboxPath(Vec<OsString>);

impl SandboxPath {
    /// Parses a path given by an API caller. A relative path is taken from `/`. `..` is applied
    /// lexically (before any symlink is resolved); one that climbs above `/` is refused rather than
    /// clamped, because it shows the caller meant a host path.
    pub(crate) fn parse(path: &str) -> Result<SandboxPath, FilesError> {
        let invalid = |reason| FilesError::InvalidPath { path: path.to_owned(), reason };
        if path.is_empty() {
            return Err(invalid("the path is empty"));
        }
        if path.contains('\0') {
            return Err(invalid("the path contains a NUL byte"));
        }
        let mut comps = Vec::new();
        for comp in path.split('/') {
            match comp {
                "" | "." => {}
                ".." => {
                    if comps.pop().is_none() {
                        return Err(FilesError::PathEscapesRoot { path: path.to_owned() });
                    }
                }
                name => comps.push(OsString::from(name)),
            }
        }
        Ok(SandboxPath(comps))
    }

    /// `self` joined with the name of an archive entry (relative; a leading `/` is dropped as GNU
    /// tar does). Archive names may not contain `..` at all: an archive has no business naming
    /// anything but its own tree.
    pub(crate) fn join_archive_name(&self, name: &[u8]) -> Result<SandboxPath, &'static str> {
        if name.contains(&0) {
            return Err("its name contains a NUL byte");
        }
        let mut joined = self.clone();
        for comp in name.split(|b| *b == b'/') {
            match comp {
                b"" | b"." => {}
                b".." => return Err("its name contains `..`"),
                comp => joined.0.push(OsStr::from_bytes(comp).to_owned()),
            }
        }
        Ok(joined)
    }

    pub(crate) fn child(&self, name: &OsStr) -> SandboxPath {
        let mut child = self.clone();
        child.0.push(name.to_owned());
        child
    }

    /// The parent directory and the last component; `None` for the root.
    pub(crate) fn split_last(&self) -> Option<(SandboxPath, &OsStr)> {
        let (last, parent) = self.0.split_last()?;
        Some((SandboxPath(parent.to_vec()), last.as_os_str()))
    }

    /// The ancestors of `self` that are longer than `base`, shortest first, without `self`.
    pub(crate) fn ancestors_below(&self, base: &SandboxPath) -> impl Iterator<Item = SandboxPath> + '_ {
        (base.0.len() + 1..self.0.len()).map(|len| SandboxPath(self.0[..len].to_vec()))
    }

    /// The last component; `/` for the root.
    pub(crate) fn file_name(&self) -> String {
        self.0.last().map_or_else(|| "/".to_owned(), |name| name.to_string_lossy().into_owned())
    }

    /// The path for `openat2(RESOLVE_IN_ROOT)` from the root's descriptor.
    pub(crate) fn relative(&self) -> PathBuf {
        if self.0.is_empty() {
            return PathBuf::from(".");
        }
        self.0.iter().collect()
    }

    /// The path without its leading `/`, as archive entry names are written (`./` for the root).
    pub(crate) fn archive_name(&self, is_dir: bool) -> PathBuf {
        if self.0.is_empty() {
            return PathBuf::from("./");
        }
        let mut name = self.relative().into_os_string().into_vec();
        if is_dir {
            name.push(b'/');
        }
        PathBuf::from(OsString::from_vec(name))
    }

    /// The path relative to `base`, which must be a prefix of it.
    pub(crate) fn strip_prefix(&self, base: &SandboxPath) -> SandboxPath {
        SandboxPath(self.0[base.0.len().min(self.0.len())..].to_vec())
    }
}

impl fmt::Display for SandboxPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("/");
        }
        for comp in &self.0 {
            write!(f, "/{}", comp.to_string_lossy())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(path: &str) -> String {
        SandboxPath::parse(path).unwrap().to_string()
    }

    #[test]
    fn normalises_lexically() {
        assert_eq!(parsed("/etc/passwd"), "/etc/passwd");
        assert_eq!(parsed("//etc/./x/../passwd/"), "/etc/passwd");
        assert_eq!(parsed("/"), "/");
        assert_eq!(parsed("/a/.."), "/");
        assert_eq!(parsed("tmp/x"), "/tmp/x");
    }

    #[test]
    fn refuses_climbing_above_root() {
        for path in ["/../../etc/passwd", "../x", "/a/../../b", ".."] {
            assert!(matches!(SandboxPath::parse(path), Err(FilesError::PathEscapesRoot { .. })), "{path} was accepted");
        }
    }

    #[test]
    fn refuses_empty_and_nul() {
        assert!(matches!(SandboxPath::parse(""), Err(FilesError::InvalidPath { .. })));
        assert!(matches!(SandboxPath::parse("/a\0b"), Err(FilesError::InvalidPath { .. })));
    }

    #[test]
    fn archive_names_never_climb() {
        let dest = SandboxPath::parse("/dest").unwrap();
        assert_eq!(dest.join_archive_name(b"/abs/./x").unwrap().to_string(), "/dest/abs/x");
        assert_eq!(dest.join_archive_name(b"./").unwrap(), dest);
        dest.join_archive_name(b"a/../b").unwrap_err();
        dest.join_archive_name(b"../x").unwrap_err();
    }

    #[test]
    fn archive_name_of_root_and_dirs() {
        let root = SandboxPath::parse("/").unwrap();
        assert_eq!(root.archive_name(true), PathBuf::from("./"));
        let sub = SandboxPath::parse("/a/b").unwrap().strip_prefix(&SandboxPath::parse("/a").unwrap());
        assert_eq!(sub.archive_name(true), PathBuf::from("b/"));
        assert_eq!(sub.archive_name(false), PathBuf::from("b"));
    }
}
