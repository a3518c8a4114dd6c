//! The host files holding DeltaFS files' bytes (image files, layers' data and pack files): the
//! cache of their descriptors, and reading and copying through them.

use std::fs::File;
use std::hash::Hash;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::node::{Content, Ino, LayerId, Region, Source};
use crate::store::{data_path, open_data_rw, pack_path};

use super::extents::{allocated_blocks, read_at_most, DataExtents};
use super::{errno_of, insert_bounded, OpResult, State, Volume};

/// Open backing files kept for reuse (each READ or WRITE would otherwise open one).
const FILE_CACHE_MAX: usize = 256;

/// A file on the host holding bytes of DeltaFS files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Backing {
    Image(u16, Arc<str>),
    /// The data file of an inode in a layer.
    Data(LayerId, Ino),
    /// A layer's pack file (shared by its small files).
    Pack(LayerId),
}

impl Backing {
    /// The backing file of `source` for inode `ino`, and the backing file's offset of the file's byte 0.
    fn of(source: &Source, ino: Ino) -> (Backing, u64) {
        match source {
            Source::Image(layer, rel) => (Backing::Image(*layer, rel.clone()), 0),
            Source::Layer(id) => (Backing::Data(*id, ino), 0),
            Source::Packed(id, slot) => (Backing::Pack(*id), *slot),
        }
    }
}

/// Backing file descriptors by (backing file, opened for writing).
pub(super) type FileKey = (Backing, bool);

impl Volume {
    fn backing_path(&self, backing: &Backing) -> PathBuf {
        match backing {
            Backing::Image(layer, rel) => self.images[usize::from(*layer)].join(&**rel),
            Backing::Data(id, ino) => data_path(&self.store.layer_dir(*id), *ino),
            Backing::Pack(id) => pack_path(&self.store.layer_dir(*id)),
        }
    }

    /// An open backing file (from the cache, or opened and cached).
    fn backing_file(&self, backing: &Backing, writable: bool) -> io::Result<Arc<File>> {
        let key = (backing.clone(), writable);
        if let Some(f) = self.files.lock().get(&key) {
            return Ok(f.clone());
        }
        let path = self.backing_path(backing);
        let f = Arc::new(if writable { open_data_rw(&path)? } else { File::open(&path)? });
        insert_bounded(&mut self.files.lock(), FILE_CACHE_MAX, key, f.clone());
        Ok(f)
    }

    /// The open backing file of a region and the offset in it of the file's byte 0 (None: the
    /// region reads as zeros, or its file was never written).
    pub(super) fn region_file(&self, ino: Ino, region: &Region) -> OpResult<Option<(Arc<File>, u64)>> {
        let Some(source) = &region.source else {
            return Ok(None);
        };
        let (backing, delta) = Backing::of(source, ino);
        match self.backing_file(&backing, false) {
            Ok(f) => Ok(Some((f, delta))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(errno_of(&e)),
        }
    }

    /// The writable data file of `ino` in layer `layer`.
    pub(super) fn data_file(&self, layer: LayerId, ino: Ino) -> OpResult<Arc<File>> {
        self.backing_file(&Backing::Data(layer, ino), true).map_err(|e| errno_of(&e))
    }

    /// The writable layer's pack file.
    pub(super) fn pack_file(&self, st: &State) -> OpResult<Arc<File>> {
        self.backing_file(&Backing::Pack(st.layer.id), true).map_err(|e| errno_of(&e))
    }

    /// Reads `[offset, offset+buf.len())` of the file into `buf` (already clipped to the size).
    pub(super) fn read_content(&self, ino: Ino, content: &Content, offset: u64, buf: &mut [u8]) -> OpResult<()> {
        for region in content.regions(offset, offset + buf.len() as u64) {
            let out = &mut buf[(region.start - offset) as usize..(region.end - offset) as usize];
            let got = match self.region_file(ino, &region)? {
                Some((f, delta)) => read_at_most(&f, out, delta + region.start)?,
                None => 0,
            };
            out[got..].fill(0);
        }
        Ok(())
    }

    /// Writes the data (not the holes) of `[from, to)` of the contents to `out` at `at + offset`.
    pub(super) fn copy_data(
        &self,
        ino: Ino,
        content: &Content,
        (from, to): (u64, u64),
        out: &File,
        at: u64,
    ) -> OpResult<()> {
        for region in content.regions(from, to) {
            let Some((f, delta)) = self.region_file(ino, &region)? else {
                continue;
            };
            for extent in DataExtents::new(&f, delta + region.start, delta + region.end, self.block_size) {
                let (start, end) = extent.map_err(|e| errno_of(&e))?;
                // Bytes past the backing file's end (none inside a data extent) stay zeros.
                let mut buf = vec![0u8; (end - start) as usize];
                read_at_most(&f, &mut buf, start)?;
                out.write_all_at(&buf, at + start - delta).map_err(|e| errno_of(&e))?;
            }
        }
        Ok(())
    }

    /// 512-byte blocks allocated in the backing files of `content`'s regions within `[from, to)`
    /// that `which` selects (a block counts in the region holding its first byte).
    pub(super) fn allocated_in(
        &self,
        ino: Ino,
        content: &Content,
        (from, to): (u64, u64),
        which: impl Fn(&Region) -> bool,
    ) -> OpResult<u64> {
        let mut blocks = 0;
        for region in content.regions(from, to).iter().filter(|r| which(r)) {
            if let Some((f, delta)) = self.region_file(ino, region)? {
                let (start, end) = (delta + region.start, delta.saturating_add(region.end));
                blocks += allocated_blocks(&f, start, end, self.block_size).map_err(|e| errno_of(&e))?;
            }
        }
        Ok(blocks)
    }
}
