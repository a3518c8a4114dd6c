//! Reading and changing file contents: read, seek, write, truncate, fallocate.

use std::os::unix::fs::FileExt;

use nix::errno::Errno;

use crate::node::{Content, Ino, Kind, Region, Source, Time, CHUNK_SIZE, PACK_SLOT};

use super::attrs::killed_suidgid;
use super::extents::DataExtents;
use super::{errno_of, OpResult, State, Volume};

/// Size/time changes of written files are journaled in batches of this many files (or at release,
/// fsync, checkpoint), which also bounds what a checkpoint has to write.
const PENDING_MAX: usize = 256;

/// The bytes a file had before a truncation emptied it, kept for a moment while it stays empty.
///
/// While a SETATTR that shrinks a file is in flight the kernel keeps the old `i_size`
/// (`FUSE_I_SIZE_UNSTABLE`). A READ it sends meanwhile that the server answers after truncating
/// comes back short; the kernel zero-fills the page and the reader gets the old length of NUL
/// bytes, a state the file never had. Once the kernel has applied the truncation to 0 it sends no
/// READ for the file (it reads nothing past `i_size`), so a READ of a file that is still empty is
/// such a racing one: it gets the old bytes, as a read just before the truncation would have. The
/// inode's cached pages are then dropped ([`Volume::set_raced_reads`]): a reader that read the old
/// size before the truncation but inserted its page after the kernel truncated the cache would
/// otherwise leave the old bytes cached past the end of the file.
#[derive(Debug)]
pub(super) struct Emptied {
    bytes: Vec<u8>,
    at: std::time::Instant,
}

/// Files up to this size keep their bytes in [`Emptied`] when truncated to 0.
const EMPTIED_MAX: u64 = 64 * 1024;

/// How long, and for how many files, [`Emptied`] bytes are kept: racing READs come within
/// microseconds of the truncation.
const EMPTIED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

const EMPTIED_FILES: usize = 64;

impl Volume {
    /// `cached`: a read through the page cache (not `O_DIRECT`), which the kernel sends only below
    /// the size it knows (see [`Emptied`]).
    pub fn read(&self, ino: Ino, offset: u64, size: u32, cached: bool) -> OpResult<Vec<u8>> {
        let st = self.state.read();
        let Kind::File(content) = &st.node(ino).map_err(|_| Errno::ESTALE)?.kind else {
            return Err(Errno::EISDIR);
        };
        if offset >= content.size {
            let old = st.emptied.get(&ino).filter(|e| cached && e.at.elapsed() < EMPTIED_FOR);
            return Ok(match old {
                Some(e) if content.size == 0 && offset < e.bytes.len() as u64 => {
                    if let Some(raced) = &*self.raced_reads.lock() {
                        let _ = raced.send(ino);
                    }
                    e.bytes[offset as usize..(offset + u64::from(size)).min(e.bytes.len() as u64) as usize].to_vec()
                }
                _ => Vec::new(),
            });
        }
        let len = (content.size - offset).min(u64::from(size)) as usize;
        let mut buf = vec![0u8; len];
        self.read_content(ino, content, offset, &mut buf)?;
        Ok(buf)
    }

    /// `lseek(SEEK_DATA)` (`data`) or `lseek(SEEK_HOLE)` from `offset`, answered from the backing
    /// files as the store's filesystem answers for a file of the same data: whole blocks are data
    /// or holes; ENXIO for an offset outside the file or no data after it; the end of the file
    /// counts as a hole.
    pub fn seek(&self, ino: Ino, offset: i64, data: bool) -> OpResult<u64> {
        let st = self.state.read();
        let Kind::File(content) = &st.node(ino).map_err(|_| Errno::ESTALE)?.kind else {
            return Err(Errno::EINVAL);
        };
        let offset = u64::try_from(offset).map_err(|_| Errno::ENXIO)?;
        if offset >= content.size {
            return Err(Errno::ENXIO);
        }
        // From the start of the block holding `offset`: data before `offset` in that block makes
        // the whole block data.
        let block_start = offset - offset % self.block_size;
        for region in content.regions(block_start, content.size) {
            let extent = match self.region_file(ino, &region)? {
                Some((f, delta)) => DataExtents::new(&f, delta + region.start, delta + region.end, self.block_size)
                    .next()
                    .transpose()
                    .map_err(|e| errno_of(&e))?
                    .map(|(from, to)| (from - delta, to - delta)),
                None => None,
            };
            let found = match (data, extent) {
                (true, extent) => extent.map(|(start, _)| start),
                (false, Some((start, end))) if start == region.start => Some(end),
                (false, _) => Some(region.start),
            };
            // Data ending mid-block (at the end of a backing file or of a truncated base) fills
            // its block, as on the store's filesystem. (Regions with backing files start on block
            // boundaries, so this never moves a hole past data.)
            let found = if data { found } else { found.map(|hole| hole.next_multiple_of(self.block_size)) };
            if let Some(pos) = found.filter(|pos| *pos < region.end) {
                return Ok(pos.max(offset));
            }
        }
        if data {
            Err(Errno::ENXIO)
        } else {
            Ok(content.size)
        }
    }

    /// Changes the contents of file `ino` under the write lock: runs `f` with the state and the
    /// contents, stores the new contents and updates ctime (and mtime), clearing set-user/group-ID
    /// if `kill_suidgid`.
    fn modify_content(
        &self,
        ino: Ino,
        (mtime, kill_suidgid): (bool, bool),
        f: impl FnOnce(&mut State, &mut Content) -> OpResult<()>,
    ) -> OpResult<()> {
        let mut st = self.state.write();
        st.room_to_add()?;
        let Kind::File(mut content) = st.node(ino).map_err(|_| Errno::ESTALE)?.kind.clone() else {
            return Err(Errno::EISDIR);
        };
        f(&mut st, &mut content)?;
        let now = Time::now();
        let n = st.tree.get_mut(ino).expect("checked");
        n.kind = Kind::File(content);
        n.attr.ctime = now;
        if mtime {
            n.attr.mtime = now;
        }
        if kill_suidgid {
            n.attr.mode = killed_suidgid(n.attr.mode);
        }
        st.pending.insert(ino);
        if st.usage.is_some() {
            // The quota's count must see the blocks this change allocated before the next one.
            self.sync_blocks(&mut st, ino);
        }
        if st.pending.len() > PENDING_MAX {
            self.flush_pending(&mut st, None)?;
        }
        Ok(())
    }

    pub fn write(&self, ino: Ino, offset: u64, data: &[u8], kill_suidgid: bool) -> OpResult<u32> {
        let end = offset + data.len() as u64;
        self.modify_content(ino, (true, kill_suidgid), |st, content| {
            self.reserve_range(st, ino, content, (offset, end))?;
            let size = content.size.max(end);
            if Self::packs(st, content, size) {
                let slot = self.own_slot(st, ino, content)?;
                self.pack_file(st)?.write_all_at(data, slot + offset).map_err(|e| errno_of(&e))?;
                content.size = size;
                // A slot is one block: once it holds data, writes allocate nothing more.
                if content.blocks < PACK_SLOT / 512 {
                    content.blocks = self.slot_blocks(st, slot)?;
                }
                return Ok(());
            }
            let out = self.copy_up(st, ino, content, Self::chunks_of(offset, data.len() as u64), (offset, end))?;
            out.write_all_at(data, offset).map_err(|e| errno_of(&e))?;
            content.size = size;
            Ok(())
        })?;
        Ok(data.len() as u32)
    }

    pub(super) fn truncate(&self, st: &mut State, ino: Ino, size: u64) -> OpResult<()> {
        let Kind::File(mut content) = st.node(ino)?.kind.clone() else {
            return Err(Errno::EISDIR);
        };
        // Best effort: only a read racing this truncation needs them, so failing to read them fails nothing.
        let emptied = (size == 0 && content.size > 0 && content.size <= EMPTIED_MAX)
            .then(|| {
                let mut bytes = vec![0u8; content.size as usize];
                self.read_content(ino, &content, 0, &mut bytes).ok().map(|()| bytes)
            })
            .flatten();
        if content.pack_slot().is_some() && size <= PACK_SLOT {
            let slot = self.own_slot(st, ino, &mut content)?;
            // Bytes past the size read as zeros if the file grows again; an empty file has no block.
            let cleared = if size == 0 { (0, PACK_SLOT) } else { (size, content.size) };
            self.clear_slot(st, slot, cleared)?;
            content.blocks = self.slot_blocks(st, slot)?;
        } else {
            if content.pack_slot().is_some() {
                self.own_data_file(st, ino, &mut content)?;
            }
            self.truncate_unpacked(st, ino, &mut content, size)?;
        }
        content.size = size;
        let now = Time::now();
        let n = st.tree.get_mut(ino).expect("checked");
        n.kind = Kind::File(content);
        n.attr.mtime = now;
        n.attr.ctime = now;
        st.emptied.retain(|i, e| *i != ino && e.at.elapsed() < EMPTIED_FOR);
        if let Some(bytes) = emptied.filter(|_| st.emptied.len() < EMPTIED_FILES) {
            st.emptied.insert(ino, Emptied { bytes, at: std::time::Instant::now() });
        }
        Ok(())
    }

    /// Truncates contents that are not packed. The writable layer's data file is opened (and so
    /// created) only if the file has bytes there or gets its boundary chunk copied up.
    fn truncate_unpacked(&self, st: &mut State, ino: Ino, content: &mut Content, size: u64) -> OpResult<()> {
        let layer = st.layer.id;
        let in_layer = content.base == Some(Source::Layer(layer));
        let mut released = 0;
        if size < content.size && !size.is_multiple_of(CHUNK_SIZE) {
            self.lag(st, ino)?;
            released += self.copy_up_chunk(ino, layer, content, size / CHUNK_SIZE, (0, 0))?;
        }
        // Bytes past the new end in this layer's data file (even of chunks dropped below) must go:
        // a later copy-up writes only data and would leave them showing through its holes.
        let in_data_file = in_layer || content.chunks.values().any(|l| *l == layer);
        if !in_layer {
            // The base's blocks past its new end no longer count (those under chunks never did).
            let base_len = content.base_len.min(size).min(content.size);
            released += self.allocated_in(ino, content, (base_len, content.base_len), |r| r.from_base)?;
            content.base_len = base_len;
        }
        if size < content.size {
            let first_gone = size.div_ceil(CHUNK_SIZE);
            let below = |r: &Region| !r.from_base && r.source != Some(Source::Layer(layer));
            released += self.allocated_in(ino, content, (first_gone * CHUNK_SIZE, u64::MAX), below)?;
            let gone: Vec<u64> = content.chunks.range(first_gone..).map(|(c, _)| *c).collect();
            for c in gone {
                content.chunks.remove(&c);
            }
        }
        if in_data_file {
            self.lag(st, ino)?.set_len(size).map_err(|e| errno_of(&e))?;
        }
        Self::release_blocks(st, ino, content, released);
        Ok(())
    }

    pub fn fallocate(&self, ino: Ino, offset: u64, len: u64, mode: i32, kill_suidgid: bool) -> OpResult<()> {
        use rustix::fs::FallocateFlags;
        let flags = FallocateFlags::from_bits_retain(mode as u32);
        // Punching or zeroing a whole chunk needs none of its old bytes.
        let discarded = flags.intersects(FallocateFlags::PUNCH_HOLE | FallocateFlags::ZERO_RANGE);
        let overwritten = if discarded { (offset, offset.saturating_add(len)) } else { (0, 0) };
        self.modify_content(ino, (mode != 0, kill_suidgid), |st, content| {
            if !flags.contains(FallocateFlags::PUNCH_HOLE) {
                self.reserve_range(st, ino, content, (offset, offset.saturating_add(len)))?;
            }
            let out = self.copy_up(st, ino, content, Self::chunks_of(offset, len), overwritten)?;
            rustix::fs::fallocate(&*out, flags, offset, len).map_err(|e| Errno::from_raw(e.raw_os_error()))?;
            if !flags.contains(FallocateFlags::KEEP_SIZE) {
                content.size = content.size.max(offset + len);
            }
            Ok(())
        })
    }
}
