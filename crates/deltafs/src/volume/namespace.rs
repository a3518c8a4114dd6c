//! The namespace: lookups, directory listings, creating, linking, unlinking and renaming.

use std::ffi::{OsStr, OsString};
use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use imbl::OrdMap;
use nix::errno::Errno;

use crate::journal::Record;
use crate::node::{Attr, Content, Ino, Kind, Node, Time};

use super::backing::Backing;
use super::handles::ORPHAN_GRACE;
use super::{insert_bounded, journal_node, Caller, OpResult, State, Volume};

/// Readdir offsets 1 and 2 are `.` and `..`; entries' cookies are above.
pub(crate) const FIRST_COOKIE: u64 = 3;

const NAME_MAX: usize = 255;

/// Directory listings in cookie order kept for reuse (a large directory is read in many requests).
const LISTINGS_MAX: usize = 64;

/// A directory's entries by name.
pub(super) type DirEntries = OrdMap<OsString, Ino>;

/// A directory's entries as (readdir cookie, name, inode, file type), in cookie order.
pub(crate) type Listing = Arc<Vec<(u64, OsString, Ino, u32)>>;

/// The readdir offset of entry `name`: a hash of the name, so it stays valid while the entry exists
/// whatever else changes in the directory. A listing read in several requests then neither skips
/// nor repeats an entry that stays (POSIX leaves only entries added or removed meanwhile open).
/// Two names of one directory with the same 62-bit hash (odds about n²/2⁶³) would make a listing
/// resumed between them skip the second.
fn cookie(name: &OsStr) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    name.as_bytes().hash(&mut h);
    (h.finish() >> 2) + FIRST_COOKIE
}

impl Volume {
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> OpResult<Option<(Ino, Node)>> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let st = self.state.read();
        let Some(&ino) = st.dir_entries(parent)?.get(name) else {
            return Ok(None);
        };
        let Some(node) = st.tree.get(ino) else {
            return Ok(None);
        };
        Ok(Some((ino, self.shown(&st, ino, node)?)))
    }

    pub fn readlink(&self, ino: Ino) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        match &st.node(ino)?.kind {
            Kind::Symlink(t) => Ok(t.clone()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// The entries of directory `dir` in cookie order, and the index of the first one after
    /// readdir offset `offset`.
    pub fn listing(&self, dir: Ino, offset: u64) -> OpResult<(Listing, usize)> {
        let st = self.state.read();
        let entries = st.dir_entries(dir)?;
        let cached = self.listings.lock().get(&dir).filter(|(e, _)| e.ptr_eq(entries)).map(|(_, l)| l.clone());
        let listing = match cached {
            Some(l) => l,
            None => {
                let type_of = |ino: &Ino| st.tree.get(*ino).map_or(0, |n| n.attr.mode & libc::S_IFMT);
                let mut v: Vec<(u64, OsString, Ino, u32)> =
                    entries.iter().map(|(name, ino)| (cookie(name), name.clone(), *ino, type_of(ino))).collect();
                v.sort_unstable_by_key(|e| e.0);
                let l = Arc::new(v);
                insert_bounded(&mut self.listings.lock(), LISTINGS_MAX, dir, (entries.clone(), l.clone()));
                l
            }
        };
        let start = listing.partition_point(|e| e.0 <= offset);
        Ok((listing, start))
    }

    fn check_new_name(st: &State, parent: Ino, name: &OsStr) -> OpResult<()> {
        if name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let entries = st.dir_entries(parent)?;
        if entries.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        Ok(())
    }

    /// Creates an inode named `name` in `parent`. `mode` includes the file type.
    pub fn create_node(
        &self,
        caller: Caller,
        parent: Ino,
        name: &OsStr,
        mode: u32,
        rdev: u64,
        symlink: Option<&[u8]>,
    ) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        st.room_to_add()?;
        Self::check_new_name(&st, parent, name)?;
        let now = Time::now();
        let parent_node = st.node(parent)?.clone();
        let mut gid = caller.gid;
        let mut mode = mode;
        if parent_node.attr.mode & libc::S_ISGID != 0 {
            gid = parent_node.attr.gid;
            if mode & libc::S_IFMT == libc::S_IFDIR {
                mode |= libc::S_ISGID;
            }
        }
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::File(Content::in_layer(st.layer.id)),
            libc::S_IFDIR => Kind::Dir(OrdMap::new()),
            libc::S_IFLNK => Kind::Symlink(symlink.ok_or(Errno::EINVAL)?.to_vec()),
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => Kind::Special,
            _ => return Err(Errno::EINVAL),
        };
        let is_dir = matches!(kind, Kind::Dir(_));
        let node = Node {
            attr: Attr {
                mode,
                uid: caller.uid,
                gid,
                nlink: if is_dir { 2 } else { 1 },
                rdev,
                atime: now,
                mtime: now,
                ctime: now,
            },
            xattrs: OrdMap::new(),
            kind,
        };
        self.reserve_inode(&st)?;
        let growth = Self::entry_growth(&st, parent)?;
        self.reserve(&mut st, node.charged_blocks() + growth)?;
        let ino = st.tree.alloc_ino();
        st.tree.nodes.insert(ino, Arc::new(node.clone()));
        Self::add_entry(&mut st, parent, name, ino, &node, is_dir)?;
        Ok((ino, node))
    }

    /// Enters `ino` (whose new state is `node`) as `name` in `parent`, updates the parent's times
    /// (and link count for a subdirectory) and journals the three changes.
    fn add_entry(st: &mut State, parent: Ino, name: &OsStr, ino: Ino, node: &Node, subdir: bool) -> OpResult<()> {
        let now = node.attr.ctime;
        let p = st.tree.get_mut(parent).expect("parent checked");
        if let Kind::Dir(entries) = &mut p.kind {
            entries.insert(name.to_owned(), ino);
        }
        p.attr.mtime = now;
        p.attr.ctime = now;
        if subdir {
            p.attr.nlink += 1;
        }
        let parent_rec = journal_node(parent, p);
        st.log(&[
            journal_node(ino, node),
            Record::Entry { dir: parent, name: name.to_owned(), ino: Some(ino) },
            parent_rec,
        ])
    }

    pub fn link(&self, ino: Ino, parent: Ino, name: &OsStr) -> OpResult<(Ino, Node)> {
        let mut st = self.state.write();
        st.room_to_add()?;
        Self::check_new_name(&st, parent, name)?;
        if st.node(ino)?.is_dir() {
            return Err(Errno::EPERM);
        }
        let growth = Self::entry_growth(&st, parent)?;
        self.reserve(&mut st, growth)?;
        let n = st.tree.get_mut(ino).expect("checked");
        n.attr.nlink += 1;
        n.attr.ctime = Time::now();
        let node = n.clone();
        Self::add_entry(&mut st, parent, name, ino, &node, false)?;
        Ok((ino, self.shown(&st, ino, &node)?))
    }

    /// Drops one name of `ino`; frees the inode when no name and no kernel reference is left.
    fn drop_link(&self, st: &mut State, ino: Ino, now: Time, records: &mut Vec<Record>) {
        let held = self.lookups.lock().contains_key(&ino);
        let Some(n) = st.tree.get_mut(ino) else {
            return;
        };
        n.attr.ctime = now;
        if n.is_dir() {
            n.attr.nlink = 0;
        } else {
            n.attr.nlink = n.attr.nlink.saturating_sub(1);
        }
        if n.attr.nlink == 0 && !held {
            self.free_inode(st, ino, records);
        } else {
            if n.attr.nlink == 0 {
                let mut orphaned = self.orphaned.lock();
                orphaned.retain(|_, at| at.elapsed() < ORPHAN_GRACE);
                orphaned.insert(ino, std::time::Instant::now());
            }
            records.push(journal_node(ino, n));
        }
    }

    pub(super) fn free_inode(&self, st: &mut State, ino: Ino, records: &mut Vec<Record>) {
        if let Some(node) = st.tree.nodes.remove(&ino) {
            if let Kind::File(content) = &node.kind {
                self.files.lock().retain(|(b, _), _| !matches!(b, Backing::Data(_, i) if *i == ino));
                // Only this layer's copy goes: frozen layers keep theirs for their checkpoints.
                if !Self::release_slot(st, content) {
                    let _ = std::fs::remove_file(st.layer.data_path(ino));
                }
            }
        }
        st.pending.remove(&ino);
        st.layer_blocks.remove(&ino);
        records.push(Record::Remove { ino });
    }

    pub fn unlink(&self, parent: Ino, name: &OsStr, dir: bool) -> OpResult<()> {
        let mut st = self.state.write();
        let ino = *st.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let target = st.node(ino)?;
        match (dir, target.entries()) {
            (true, None) => return Err(Errno::ENOTDIR),
            (true, Some(e)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
            (false, Some(_)) => return Err(Errno::EISDIR),
            _ => {}
        }
        let now = Time::now();
        let p = st.tree.get_mut(parent).expect("checked");
        if let Kind::Dir(entries) = &mut p.kind {
            entries.remove(name);
        }
        p.attr.mtime = now;
        p.attr.ctime = now;
        if dir {
            p.attr.nlink -= 1;
        }
        let mut records =
            vec![Record::Entry { dir: parent, name: name.to_owned(), ino: None }, journal_node(parent, p)];
        self.drop_link(&mut st, ino, now, &mut records);
        st.log(&records)
    }

    pub fn rename(&self, parent: Ino, name: &OsStr, new_parent: Ino, new_name: &OsStr, flags: u32) -> OpResult<()> {
        if new_name.len() > NAME_MAX {
            return Err(Errno::ENAMETOOLONG);
        }
        let mut st = self.state.write();
        st.room_to_add()?;
        let src = *st.dir_entries(parent)?.get(name).ok_or(Errno::ENOENT)?;
        let dst = st.dir_entries(new_parent)?.get(new_name).copied();
        let src_dir = st.node(src)?.is_dir();
        if dst.is_none() && new_parent != parent {
            let growth = Self::entry_growth(&st, new_parent)?;
            self.reserve(&mut st, growth)?;
        }
        let now = Time::now();
        let mut records = Vec::new();
        let set_entry = |st: &mut State, dir: Ino, name: &OsStr, ino: Option<Ino>, records: &mut Vec<Record>| {
            let d = st.tree.get_mut(dir).expect("directory checked");
            if let Kind::Dir(entries) = &mut d.kind {
                match ino {
                    Some(i) => entries.insert(name.to_owned(), i),
                    None => entries.remove(name),
                };
            }
            d.attr.mtime = now;
            d.attr.ctime = now;
            records.push(Record::Entry { dir, name: name.to_owned(), ino });
        };
        let adjust_nlink = |st: &mut State, dir: Ino, delta: i32| {
            let d = st.tree.get_mut(dir).expect("directory checked");
            d.attr.nlink = (d.attr.nlink as i32 + delta) as u32;
        };
        if flags & libc::RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or(Errno::ENOENT)?;
            let dst_dir = st.node(dst)?.is_dir();
            set_entry(&mut st, parent, name, Some(dst), &mut records);
            set_entry(&mut st, new_parent, new_name, Some(src), &mut records);
            if parent != new_parent && src_dir != dst_dir {
                let d = if src_dir { 1 } else { -1 };
                adjust_nlink(&mut st, new_parent, d);
                adjust_nlink(&mut st, parent, -d);
            }
            for ino in [src, dst] {
                st.tree.get_mut(ino).expect("exists").attr.ctime = now;
            }
        } else {
            if flags & libc::RENAME_NOREPLACE != 0 && dst.is_some() {
                return Err(Errno::EEXIST);
            }
            if flags & libc::RENAME_WHITEOUT != 0 {
                return Err(Errno::EINVAL);
            }
            if dst == Some(src) {
                return Ok(());
            }
            if let Some(dst) = dst {
                let d = st.node(dst)?;
                match (src_dir, d.entries()) {
                    (true, None) => return Err(Errno::ENOTDIR),
                    (false, Some(_)) => return Err(Errno::EISDIR),
                    (true, Some(e)) if !e.is_empty() => return Err(Errno::ENOTEMPTY),
                    _ => {}
                }
                if src_dir {
                    adjust_nlink(&mut st, new_parent, -1);
                }
                self.drop_link(&mut st, dst, now, &mut records);
            }
            set_entry(&mut st, parent, name, None, &mut records);
            set_entry(&mut st, new_parent, new_name, Some(src), &mut records);
            if src_dir && parent != new_parent {
                adjust_nlink(&mut st, parent, -1);
                adjust_nlink(&mut st, new_parent, 1);
            }
            st.tree.get_mut(src).expect("exists").attr.ctime = now;
        }
        let mut touched = vec![parent, new_parent, src];
        touched.extend(dst);
        touched.dedup();
        for ino in touched {
            if let Some(n) = st.tree.get(ino) {
                records.push(journal_node(ino, n));
            }
        }
        st.log(&records)
    }
}
