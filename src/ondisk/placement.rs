//! Where a dynamic VHD's metadata and blocks lie: the header and BAT
//! placement of the files vhdkit writes, BAT sizes, the position of a BAT
//! entry, the first data block, block ↔ offset. The one place this
//! arithmetic is written; everything that writes or edits a dynamic VHD
//! uses it.

use super::{Bat, FOOTER_SIZE, HEADER_SIZE, SECTOR};

/// Where vhdkit writes a new dynamic or differencing VHD's header: right
/// after the footer copy at offset 0 (as qemu-img and Hyper-V do).
pub const HEADER_OFFSET: u64 = FOOTER_SIZE as u64;

/// Where vhdkit writes a new file's BAT: right after the header.
pub const TABLE_OFFSET: u64 = HEADER_OFFSET + HEADER_SIZE as u64;

/// The alignment of block data in the files vhdkit writes (as Hyper-V
/// does), so that zero pages of a block can be holes.
pub const DATA_ALIGN: u64 = 4096;

/// BAT entries in one sector of the table.
pub const ENTRIES_PER_SECTOR: u64 = SECTOR / 4;

/// BAT entries (blocks) needed for `size` bytes in blocks of `block_size`.
pub fn bat_entries(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}

/// Sectors a BAT of `entries` occupies (padded to a whole sector).
pub fn bat_sectors(entries: u64) -> u64 {
    Bat::disk_size(entries) / SECTOR
}

/// Where a BAT of `entries` at `table_offset` ends, padding included.
pub fn bat_end(table_offset: u64, entries: u64) -> u64 {
    table_offset + Bat::disk_size(entries)
}

/// The file offset of entry `block` of a BAT at `table_offset` (also where
/// a table of `block` entries ends, unpadded). Saturating, for the values
/// of a damaged header.
pub fn bat_entry_at(table_offset: u64, block: u64) -> u64 {
    table_offset.saturating_add(block.saturating_mul(4))
}

/// The sector of the table (counted from its start) that holds entry
/// `block`.
pub fn bat_sector_of(block: u64) -> u64 {
    block / ENTRIES_PER_SECTOR
}

/// The file offset of sector `sector` of a BAT at `table_offset`.
pub fn bat_sector_at(table_offset: u64, sector: u64) -> u64 {
    table_offset + sector * SECTOR
}

/// `x` rounded up to a multiple of `align`.
pub fn align_up(x: u64, align: u64) -> u64 {
    x.div_ceil(align) * align
}

/// Where the next block's bitmap goes when the file's content ends at
/// `end`: the first offset at or after `end` that puts the block's data
/// (after its `bitmap_size` bytes of bitmap) on [`DATA_ALIGN`].
pub fn next_block_offset(end: u64, bitmap_size: u64) -> u64 {
    align_up(end + bitmap_size, DATA_ALIGN) - bitmap_size
}

/// The distance between consecutive blocks' bitmaps in the files vhdkit
/// writes: bitmap and data, on [`DATA_ALIGN`].
pub fn block_stride(bitmap_size: u64, block_size: u64) -> u64 {
    align_up(bitmap_size + block_size, DATA_ALIGN)
}

/// The BAT entry (a sector number) of a block whose bitmap is at `offset`;
/// `None` past the format's 32-bit sector numbers. (The inverse is
/// [`super::entry_offset`].)
pub fn offset_entry(offset: u64) -> Option<u32> {
    u32::try_from(offset / SECTOR).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ondisk::entry_offset;

    #[test]
    fn the_layout_qemu_and_hyper_v_write() {
        assert_eq!((HEADER_OFFSET, TABLE_OFFSET), (512, 1536));
        // 5 MiB in 2 MiB blocks: 3 entries, one sector of table.
        assert_eq!(bat_entries(5 << 20, 2 << 20), 3);
        assert_eq!(bat_sectors(3), 1);
        assert_eq!(bat_sectors(128), 1);
        assert_eq!(bat_sectors(129), 2);
        assert_eq!(bat_end(TABLE_OFFSET, 3), 2048);
        assert_eq!(bat_entry_at(TABLE_OFFSET, 2), 1544);
        assert_eq!(bat_entry_at(u64::MAX - 8, u64::MAX), u64::MAX);
        assert_eq!(bat_sector_of(127), 0);
        assert_eq!(bat_sector_of(128), 1);
        assert_eq!(bat_sector_at(TABLE_OFFSET, 1), 2048);
        // 2 MiB blocks: a 512-byte bitmap, data on 4 KiB.
        let first = next_block_offset(2048, 512);
        assert_eq!((first, first + 512), (3584, 4096));
        assert_eq!(block_stride(512, 2 << 20), (2 << 20) + 4096);
        assert_eq!(offset_entry(first).map(entry_offset), Some(first));
        assert_eq!(offset_entry(1 << 41), None);
    }
}
