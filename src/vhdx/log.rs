//! The VHDX log ([MS-VHDX] 2.3): finding the active sequence of entries
//! and replaying it into an in-memory overlay of the file. The input is
//! never written.

use super::format::{checksum_with_zero_field, le32, le64, Guid, Header, LOG_SECTOR};
use super::VhdxStructure;
use crate::error::{Error, Result, Structure};
use std::collections::BTreeMap;

/// Sectors of the file as the replayed log leaves them: zeroed ranges and
/// 4 KiB data sectors, non-overlapping, keyed by their start.
#[derive(Clone, Debug, Default)]
pub(crate) struct Overlay {
    pieces: BTreeMap<u64, Piece>,
}

#[derive(Clone, Debug)]
struct Piece {
    end: u64,
    /// `None`: zeros; `Some`: exactly `end - start` bytes.
    data: Option<Box<[u8]>>,
}

impl Overlay {
    pub(crate) fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Writes `start..end` (zeros when `data` is `None`), over whatever the
    /// overlay held there.
    pub(crate) fn write(&mut self, start: u64, end: u64, data: Option<Box<[u8]>>) {
        if start >= end {
            return;
        }
        // Pieces that overlap start..end: the one starting before `start`
        // (if it reaches past it) and those starting inside.
        let mut hit: Vec<u64> = Vec::new();
        if let Some((&s, p)) = self.pieces.range(..start).next_back() {
            if p.end > start {
                hit.push(s);
            }
        }
        hit.extend(self.pieces.range(start..end).map(|(&s, _)| s));
        for s in hit {
            let Some(p) = self.pieces.remove(&s) else {
                continue;
            };
            if s < start {
                let keep = p.data.as_ref().map(|d| d[..(start - s) as usize].into());
                self.pieces.insert(
                    s,
                    Piece {
                        end: start,
                        data: keep,
                    },
                );
            }
            if p.end > end {
                let keep = p.data.as_ref().map(|d| d[(end - s) as usize..].into());
                self.pieces.insert(
                    end,
                    Piece {
                        end: p.end,
                        data: keep,
                    },
                );
            }
        }
        self.pieces.insert(start, Piece { end, data });
    }

    /// True when the overlay holds any byte of `start..end`.
    pub(crate) fn touches(&self, start: u64, end: u64) -> bool {
        self.pieces
            .range(..end)
            .next_back()
            .is_some_and(|(_, p)| p.end > start)
            || self.pieces.range(start..end).next().is_some()
    }

    /// Lays the overlay over `buf`, which holds the file from `offset`.
    pub(crate) fn apply(&self, buf: &mut [u8], offset: u64) {
        let end = offset.saturating_add(buf.len() as u64);
        for (&s, p) in self.pieces.range(..end).rev() {
            if p.end <= offset {
                break;
            }
            let a = s.max(offset);
            let b = p.end.min(end);
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match &p.data {
                None => dst.fill(0),
                Some(d) => dst.copy_from_slice(&d[(a - s) as usize..(b - s) as usize]),
            }
        }
    }
}

/// What replaying the log did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReplay {
    /// Entries replayed (the active sequence, tail to head).
    pub entries: u64,
    /// Sequence number of the first entry replayed (the tail).
    pub first_sequence: u64,
    /// Sequence number of the last entry replayed (the head).
    pub last_sequence: u64,
    /// Offset in the log of the tail entry.
    pub tail_offset: u64,
    /// 4 KiB data sectors written.
    pub data_sectors: u64,
    /// Bytes zeroed by zero descriptors.
    pub zeroed_bytes: u64,
    /// The file's length after replay: the larger of its length and the
    /// entries' last file offset. Beyond the real end it reads as zeros.
    pub file_length: u64,
}

/// One descriptor of a valid entry.
#[derive(Clone, Debug)]
enum Descriptor {
    Zero { offset: u64, length: u64 },
    Data { offset: u64, sector: Box<[u8]> },
}

#[derive(Clone, Debug)]
struct Entry {
    /// First sector, as an index into the log.
    start: u64,
    sectors: u64,
    sequence: u64,
    tail: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    descriptors: Vec<Descriptor>,
}

fn entry_err(log_offset: u64, field: &'static str, at: u64, found: String, exp: String) -> Error {
    Error::corrupt(
        Structure::Vhdx(VhdxStructure::LogEntry(log_offset)),
        field,
        at,
        found,
        exp,
    )
}

/// The log, read into memory, seen as a circular buffer of 4 KiB sectors.
struct Ring<'a> {
    bytes: &'a [u8],
    n: u64,
}

impl Ring<'_> {
    fn sector(&self, i: u64) -> &[u8] {
        let i = (i % self.n) as usize * LOG_SECTOR as usize;
        &self.bytes[i..i + LOG_SECTOR as usize]
    }
}

/// Descriptor sectors for `count` descriptors: the 64-byte header takes the
/// room of two 32-byte descriptors.
fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// Parses and validates the entry whose first sector is `i`; `None` when it
/// is not a valid entry of this log. `next_loge` gives, for each sector, the
/// distance to the next sector (circularly) that starts with `loge`.
fn parse_entry(ring: &Ring, i: u64, log_guid: &Guid, next_loge: &[u64]) -> Option<Entry> {
    let h = ring.sector(i);
    if &h[..4] != b"loge" {
        return None;
    }
    let entry_length = u64::from(le32(h, 8));
    let tail = u64::from(le32(h, 12));
    let sequence = le64(h, 16);
    let count = u64::from(le32(h, 24));
    let log_length = ring.n * LOG_SECTOR;
    if entry_length == 0
        || entry_length % LOG_SECTOR != 0
        || entry_length > log_length
        || sequence == 0
        || Guid::read(h, 32) != *log_guid
        || tail % LOG_SECTOR != 0
        || tail >= log_length
    {
        return None;
    }
    let sectors = entry_length / LOG_SECTOR;
    let dsec = descriptor_sectors(count);
    if dsec > sectors {
        return None;
    }
    // Every sector of a valid entry after the first starts with a
    // descriptor or a data sector signature, never `loge`: an entry that
    // spans another entry's start is not valid. This also keeps the search
    // linear: valid entries never overlap.
    if next_loge[i as usize] < sectors {
        return None;
    }
    // The checksum covers the whole entry, the field taken as zero.
    let mut crc = checksum_with_zero_field(h, 4);
    for k in 1..sectors {
        crc = crc32c::crc32c_append(crc, ring.sector(i + k));
    }
    if crc != le32(h, 4) {
        return None;
    }
    // Descriptors: contiguous from byte 64 of the entry.
    let desc_bytes = |d: u64| -> [u8; 32] {
        let at = 64 + 32 * d;
        let sec = ring.sector(i + at / LOG_SECTOR);
        let o = (at % LOG_SECTOR) as usize;
        let mut a = [0u8; 32];
        a.copy_from_slice(&sec[o..o + 32]);
        a
    };
    let mut descriptors = Vec::new();
    let mut data_sectors = 0u64;
    for d in 0..count {
        let b = desc_bytes(d);
        let offset = le64(&b, 16);
        if le64(&b, 24) != sequence || offset % LOG_SECTOR != 0 {
            return None;
        }
        match &b[..4] {
            b"zero" => {
                let length = le64(&b, 8);
                if length % LOG_SECTOR != 0 {
                    return None;
                }
                descriptors.push(Descriptor::Zero { offset, length });
            }
            b"desc" => {
                let k = dsec + data_sectors;
                if k >= sectors {
                    return None;
                }
                let s = ring.sector(i + k);
                let seq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
                if &s[..4] != b"data" || seq != sequence {
                    return None;
                }
                let mut sector = vec![0u8; LOG_SECTOR as usize].into_boxed_slice();
                sector[..8].copy_from_slice(&b[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..].copy_from_slice(&b[4..8]);
                descriptors.push(Descriptor::Data { offset, sector });
                data_sectors += 1;
            }
            _ => return None,
        }
    }
    Some(Entry {
        start: i,
        sectors,
        sequence,
        tail: tail / LOG_SECTOR,
        flushed_file_offset: le64(h, 48),
        last_file_offset: le64(h, 56),
        descriptors,
    })
}

/// Finds the active sequence in `log` (the log's bytes, `log_offset` its
/// absolute offset) and replays it into `overlay`. `Ok(None)` when there is
/// nothing to replay (a warning is pushed when the header names a log but
/// no valid sequence exists).
pub(crate) fn replay(
    log: &[u8],
    log_offset: u64,
    header: &Header,
    file_len: u64,
    overlay: &mut Overlay,
    warnings: &mut Vec<String>,
) -> Result<Option<LogReplay>> {
    let n = log.len() as u64 / LOG_SECTOR;
    if n == 0 {
        return Ok(None);
    }
    let ring = Ring { bytes: log, n };
    // Distance from each sector to the next one (circularly, itself
    // excluded) that starts with `loge`; n when there is none.
    let is_loge: Vec<bool> = (0..n).map(|i| &ring.sector(i)[..4] == b"loge").collect();
    let mut next_loge = vec![n; n as usize];
    let first = is_loge.iter().position(|&x| x);
    if let Some(first) = first {
        let mut next = first as u64 + n; // the first loge, seen after a wrap
        for i in (0..n).rev() {
            next_loge[i as usize] = next - i;
            if is_loge[i as usize] {
                next = i;
            }
        }
    }
    let mut entries: Vec<Entry> = Vec::new();
    for i in 0..n {
        if is_loge[i as usize] {
            if let Some(e) = parse_entry(&ring, i, &header.log_guid, &next_loge) {
                entries.push(e);
            }
        }
    }
    // Chains: an entry is followed by the entry that starts where it ends,
    // when that one's sequence number is one more.
    let by_start: BTreeMap<u64, usize> = entries
        .iter()
        .enumerate()
        .map(|(k, e)| (e.start, k))
        .collect();
    let next_of = |k: usize| -> Option<usize> {
        let e = &entries[k];
        let j = *by_start.get(&((e.start + e.sectors) % n))?;
        (Some(entries[j].sequence) == e.sequence.checked_add(1)).then_some(j)
    };
    let mut has_prev = vec![false; entries.len()];
    for k in 0..entries.len() {
        if let Some(j) = next_of(k) {
            has_prev[j] = true;
        }
    }
    // The active sequence: of the maximal chains whose head names, as its
    // tail, an entry of the chain, the one with the largest head sequence
    // number; replayed from that tail to the head.
    let mut best: Option<Vec<usize>> = None;
    for k in (0..entries.len()).filter(|&k| !has_prev[k]) {
        let mut chain = vec![k];
        let mut last = k;
        while let Some(j) = next_of(last) {
            chain.push(j);
            last = j;
        }
        let head = &entries[last];
        let Some(pos) = chain.iter().position(|&c| entries[c].start == head.tail) else {
            continue;
        };
        let seq = chain[pos..].to_vec();
        let better = match &best {
            None => true,
            Some(b) => b
                .last()
                .is_none_or(|&l| head.sequence > entries[l].sequence),
        };
        if better {
            best = Some(seq);
        }
    }
    let Some(seq) = best else {
        warnings.push(format!(
            "the header names log {} but the log holds no valid sequence of entries for it; \
             nothing was replayed",
            header.log_guid
        ));
        return Ok(None);
    };
    let Some(&last) = seq.last() else {
        return Ok(None);
    };
    let head = &entries[last];
    let head_at = head.start * LOG_SECTOR;
    if head.flushed_file_offset > file_len {
        return Err(entry_err(
            head_at,
            "flushed file offset",
            log_offset + head_at + 48,
            head.flushed_file_offset.to_string(),
            format!(
                "at most the file's length, {file_len} (the file was cut short after the log \
                 was written: the log cannot be replayed)"
            ),
        ));
    }
    let file_length = seq
        .iter()
        .map(|&k| entries[k].last_file_offset)
        .fold(file_len, u64::max);
    let mut data_sectors = 0;
    let mut zeroed_bytes = 0u64;
    for &k in &seq {
        let e = &entries[k];
        let at = e.start * LOG_SECTOR;
        for (d, desc) in e.descriptors.iter().enumerate() {
            let (offset, length) = match desc {
                Descriptor::Zero { offset, length } => (*offset, *length),
                Descriptor::Data { offset, .. } => (*offset, LOG_SECTOR),
            };
            if offset
                .checked_add(length)
                .is_none_or(|end| end > file_length)
            {
                return Err(entry_err(
                    at,
                    "descriptor file offset",
                    log_offset + at + 64 + 32 * d as u64 + 16,
                    format!("{length} bytes at {offset}"),
                    format!(
                        "a range within the file's length after replay, {file_length} (the log \
                         cannot be replayed)"
                    ),
                ));
            }
            match desc {
                Descriptor::Zero { offset, length } => {
                    overlay.write(*offset, offset + length, None);
                    zeroed_bytes = zeroed_bytes.saturating_add(*length);
                }
                Descriptor::Data { offset, sector } => {
                    overlay.write(*offset, offset + LOG_SECTOR, Some(sector.clone()));
                    data_sectors += 1;
                }
            }
        }
    }
    Ok(Some(LogReplay {
        entries: seq.len() as u64,
        first_sequence: entries[seq[0]].sequence,
        last_sequence: head.sequence,
        tail_offset: entries[seq[0]].start * LOG_SECTOR,
        data_sectors,
        zeroed_bytes,
        file_length,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(o: &Overlay, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![9u8; len];
        o.apply(&mut b, off);
        b
    }

    #[test]
    fn overlay_later_writes_win_and_split_earlier_ones() {
        let mut o = Overlay::default();
        o.write(0, 16384, None);
        o.write(4096, 8192, Some(vec![1u8; 4096].into()));
        o.write(6144, 10240, Some(vec![2u8; 4096].into()));
        let b = read(&o, 0, 20000);
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..6144].iter().all(|&x| x == 1));
        assert!(b[6144..10240].iter().all(|&x| x == 2));
        assert!(b[10240..16384].iter().all(|&x| x == 0));
        assert!(b[16384..].iter().all(|&x| x == 9));
        // A read in the middle of a piece.
        assert_eq!(read(&o, 5000, 2), vec![1, 1]);
        assert!(o.touches(100, 101) && o.touches(16383, 20000));
        assert!(!o.touches(16384, 20000) && !o.touches(0, 0));
        o.write(0, 20480, None);
        assert!(read(&o, 0, 20480).iter().all(|&x| x == 0));
    }
}
