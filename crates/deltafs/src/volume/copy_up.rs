//! Moving a file's bytes into the writable layer before they change: chunks copied up from the
//! layers below, pack slots of small files, and the block counts that follow them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::errno::Errno;

use crate::node::{Content, Ino, LayerId, CHUNK_SIZE, PACK_SLOT};

use super::extents::allocated_blocks;
use super::extents::file_blocks;
use super::{errno_of, OpResult, State, Volume};

impl Volume {
    /// Copies up the chunks `chunks` of a file that is not packed (except bytes in `overwritten`)
    /// and returns the writable layer's data file.
    pub(super) fn copy_up(
        &self,
        st: &mut State,
        ino: Ino,
        content: &mut Content,
        chunks: std::ops::Range<u64>,
        overwritten: (u64, u64),
    ) -> OpResult<Arc<File>> {
        let layer = st.layer.id;
        let out = self.own_data_file(st, ino, content)?;
        let mut released = 0;
        for chunk in chunks {
            released += self.copy_up_chunk(ino, layer, content, chunk, overwritten)?;
        }
        Self::release_blocks(st, ino, content, released);
        Ok(out)
    }

    /// Makes chunk `chunk` of the file live in the writable layer, copying the data (not the
    /// holes) of its current bytes unless `overwritten` covers them all. Returns the blocks the
    /// chunk held in the layers below, which the file no longer uses.
    pub(super) fn copy_up_chunk(
        &self,
        ino: Ino,
        layer: LayerId,
        content: &mut Content,
        chunk: u64,
        overwritten: (u64, u64),
    ) -> OpResult<u64> {
        if content.chunk_in(chunk, layer) {
            return Ok(0);
        }
        let start = chunk * CHUNK_SIZE;
        let end = start + CHUNK_SIZE;
        let released = self.allocated_in(ino, content, (start, end), |_| true)?;
        let copy_end = end.min(content.size);
        if start < copy_end && !(overwritten.0 <= start && overwritten.1 >= copy_end) {
            self.copy_data(ino, content, (start, copy_end), &*self.data_file(layer, ino)?, 0)?;
        }
        content.chunks.insert(chunk, layer);
        Ok(released)
    }

    /// Chunks touched by `len` bytes at `offset` (none for an empty range).
    pub(super) fn chunks_of(offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        offset / CHUNK_SIZE..(offset + len - 1) / CHUNK_SIZE + 1
    }

    /// The writable layer's data file of `ino`, about to change: its lagging block count is started
    /// (see `lag`) and packed contents are moved into it (the file outgrows its slot, or an operation
    /// needs a file of its own). The packed bytes count as the data file's growth from then on.
    pub(super) fn own_data_file(&self, st: &mut State, ino: Ino, content: &mut Content) -> OpResult<Arc<File>> {
        let out = self.lag(st, ino)?;
        if content.pack_slot().is_none() {
            return Ok(out);
        }
        let layer = st.layer.id;
        self.copy_data(ino, content, (0, content.size), &out, 0)?;
        // A data file left by an earlier, larger version of the file: cut its tail.
        out.set_len(content.size).map_err(|e| errno_of(&e))?;
        Self::release_slot(st, content);
        *content = Content { size: content.size, ..Content::in_layer(layer) };
        Ok(out)
    }

    /// The writable layer's data file of `ino`, about to change. It holds only this file's bytes
    /// in this layer, so the file's block count grows with it: caught up lazily (see
    /// `layer_blocks`), from its `st_blocks` now.
    pub(super) fn lag(&self, st: &mut State, ino: Ino) -> OpResult<Arc<File>> {
        let out = self.data_file(st.layer.id, ino)?;
        if let std::collections::hash_map::Entry::Vacant(lagging) = st.layer_blocks.entry(ino) {
            lagging.insert(file_blocks(&out)?);
        }
        Ok(out)
    }

    /// Takes `released` blocks (held in layers below by parts the file no longer reads from them)
    /// off the file's count: now, or when a lagging count catches up.
    pub(super) fn release_blocks(st: &mut State, ino: Ino, content: &mut Content, released: u64) {
        match st.layer_blocks.get_mut(&ino) {
            Some(base) => *base += released,
            None => content.blocks = content.blocks.saturating_sub(released),
        }
    }

    /// Whether a file of `content` that will be `size` bytes long keeps (or gets) its bytes in a
    /// pack slot: it fits, and it has no data file in the writable layer yet.
    pub(super) fn packs(st: &State, content: &Content, size: u64) -> bool {
        size <= PACK_SLOT && (content.size == 0 || !content.chunk_in(0, st.layer.id))
    }

    /// Makes packed contents live in a slot of the writable layer (copying the data of a frozen
    /// layer's slot, or of wherever a small file's bytes are) and returns the slot.
    pub(super) fn own_slot(&self, st: &mut State, ino: Ino, content: &mut Content) -> OpResult<u64> {
        let layer = st.layer.id;
        if let Some((l, slot)) = content.pack_slot() {
            if l == layer {
                return Ok(slot);
            }
        }
        let (slot, reused) = st.layer.pack.alloc();
        // A reused slot must read as zeros (and hold no blocks) where the file has no data.
        if reused {
            self.clear_slot(st, slot, (0, PACK_SLOT))?;
        }
        // Whatever held the contents before (a data file, an image file, a frozen layer's slot) no
        // longer counts: the slot alone does (an empty file's slot holds nothing).
        st.layer_blocks.remove(&ino);
        let blocks = if content.size == 0 {
            0
        } else {
            self.copy_data(ino, content, (0, content.size), &*self.pack_file(st)?, slot)?;
            self.slot_blocks(st, slot)?
        };
        *content = Content::packed(layer, slot, content.size, blocks);
        Ok(slot)
    }

    /// Gives a packed file's slot back to the writable layer if the slot is the layer's (slots of
    /// frozen layers belong to their checkpoints). Returns whether the contents were packed.
    pub(super) fn release_slot(st: &mut State, content: &Content) -> bool {
        match content.pack_slot() {
            Some((layer, slot)) => {
                if layer == st.layer.id {
                    st.layer.pack.free(slot);
                }
                true
            }
            None => false,
        }
    }

    /// Makes `[from, to)` of a slot of the writable layer's pack read as zeros, keeping the slot's
    /// block allocated only if it still holds bytes of the file, as a truncate does on the store's
    /// filesystem (a filesystem that cannot punch holes gets zeros written).
    pub(super) fn clear_slot(&self, st: &State, slot: u64, (from, to): (u64, u64)) -> OpResult<()> {
        use rustix::fs::FallocateFlags;
        if from >= to {
            return Ok(());
        }
        let pack = self.pack_file(st)?;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&*pack, punch, slot + from, to - from) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::OPNOTSUPP) => {
                pack.write_all_at(&vec![0u8; (to - from) as usize], slot + from).map_err(|e| errno_of(&e))
            }
            Err(e) => Err(Errno::from_raw(e.raw_os_error())),
        }
    }

    /// 512-byte blocks holding data in a slot of the writable layer's pack: packed contents' count.
    pub(super) fn slot_blocks(&self, st: &State, slot: u64) -> OpResult<u64> {
        allocated_blocks(&*self.pack_file(st)?, slot, slot + PACK_SLOT, self.block_size).map_err(|e| errno_of(&e))
    }
}
