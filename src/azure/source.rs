//! A blob as a source of positional reads: its length and type fetched
//! once, reads as ranged GETs, and which ranges hold data from Get Page
//! Ranges (listed in segments). Ready to be the storage behind an image.

use super::client::Blob;
use super::{AzureError, AzureErrorKind, BlobUrl};
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// The largest ranged GET one read is cut into.
const MAX_GET: u64 = 4 << 20;

/// A page or block blob read by ranges.
pub struct BlobSource {
    rt: tokio::runtime::Runtime,
    blob: Arc<Blob>,
    fetched: Arc<AtomicU64>,
    len: u64,
    page_blob: bool,
    ranges: OnceLock<Vec<(u64, u64)>>,
}

impl std::fmt::Debug for BlobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobSource")
            .field("url", &self.blob.url)
            .field("len", &self.len)
            .field("page_blob", &self.page_blob)
            .finish_non_exhaustive()
    }
}

impl BlobSource {
    /// Opens the blob at `url`: its properties are fetched once.
    ///
    /// # Errors
    /// The blob does not exist, the SAS is refused, the host cannot be
    /// reached.
    pub fn open(url: &BlobUrl) -> Result<BlobSource> {
        let rt = super::upload::new_runtime(url)?;
        let blob = Blob::new(url, Default::default())?;
        let Some(p) = rt.block_on(blob.properties())? else {
            return Err(AzureError::error(
                AzureErrorKind::NotFound,
                url.to_string(),
                format!(
                    "blob {:?} not found in container {:?}",
                    url.blob(),
                    url.container()
                ),
            ));
        };
        Ok(BlobSource {
            rt,
            blob: Arc::new(blob),
            fetched: Arc::new(AtomicU64::new(0)),
            len: p.len,
            page_blob: p.page_blob,
            ranges: OnceLock::new(),
        })
    }

    /// The blob's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a blob of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True for a page blob (else a block or append blob).
    pub fn is_page_blob(&self) -> bool {
        self.page_blob
    }

    /// The ranges that may hold data, merged, in order: a page blob's page
    /// ranges (listed once, then cached); the whole blob for other blobs.
    /// Everything outside them reads as zeros.
    ///
    /// # Errors
    /// The listing failed.
    pub fn data_ranges(&self) -> Result<&[(u64, u64)]> {
        if let Some(r) = self.ranges.get() {
            return Ok(r);
        }
        let r = if self.page_blob {
            self.rt.block_on(self.blob.page_ranges(self.len))?
        } else if self.len > 0 {
            vec![(0, self.len)]
        } else {
            Vec::new()
        };
        Ok(self.ranges.get_or_init(|| r))
    }

    /// Fills `buf` from `offset`: ranged GETs of at most 4 MiB, issued
    /// together; ranges known to hold no data are not fetched.
    ///
    /// # Errors
    /// A read past the end of the blob; a request that failed after retries.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| {
                AzureError::error(
                    AzureErrorKind::Service,
                    self.blob.url.to_string(),
                    format!(
                        "read of {} bytes at offset {offset} past the end of the blob ({} bytes)",
                        buf.len(),
                        self.len
                    ),
                )
            })?;
        buf.fill(0);
        let mut pieces = Vec::new();
        let ranges = self.data_ranges()?;
        let first = ranges.partition_point(|&(_, e)| e <= offset);
        for &(s, e) in &ranges[first..] {
            if s >= end {
                break;
            }
            let (s, e) = (s.max(offset), e.min(end));
            let mut p = s;
            while p < e {
                let n = (e - p).min(MAX_GET);
                pieces.push((p, n));
                p += n;
            }
        }
        let blob = &self.blob;
        let got = self.rt.block_on(async {
            let futs = pieces.iter().map(|&(p, n)| blob.read(p, n));
            futures::future::try_join_all(futs).await
        })?;
        for ((p, _), bytes) in pieces.iter().zip(got) {
            let at = (p - offset) as usize;
            buf[at..at + bytes.len()].copy_from_slice(&bytes);
            self.fetched
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Requests made so far (each counted once however often it was
    /// tried; [`FetchCounter::retries`] counts the tries beyond the first).
    pub fn requests(&self) -> u64 {
        self.blob.calls()
    }

    /// A counter of this blob's traffic that stays readable after the
    /// source has moved into an image.
    pub fn counter(&self) -> FetchCounter {
        FetchCounter {
            blob: self.blob.clone(),
            fetched: self.fetched.clone(),
        }
    }
}

/// The traffic of a [`BlobSource`]: requests, retries and bytes fetched.
#[derive(Clone)]
pub struct FetchCounter {
    blob: Arc<Blob>,
    fetched: Arc<AtomicU64>,
}

impl std::fmt::Debug for FetchCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchCounter")
            .field("requests", &self.requests())
            .field("retries", &self.retries())
            .field("bytes_fetched", &self.bytes_fetched())
            .finish()
    }
}

impl FetchCounter {
    /// Requests made (each counted once however often it was tried).
    pub fn requests(&self) -> u64 {
        self.blob.calls()
    }
    /// Tries beyond the first of each request.
    pub fn retries(&self) -> u64 {
        self.blob.retries()
    }
    /// Bytes of the blob fetched by ranged GETs.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

/// The storage trait of today's readers: positional reads and a length.
impl crate::io::ReadAt for BlobSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        BlobSource::read_exact_at(self, buf, offset).map_err(Into::into)
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }
}

/// A blob as an image's storage: the page ranges (or the whole of a block
/// blob) are the data hint, so the walk never fetches a page blob's holes.
impl crate::storage::Storage for BlobSource {
    fn data_ranges(&self, start: u64, end: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        let end = end.min(self.len);
        let mut v = Vec::new();
        if start >= end {
            return Ok(v);
        }
        let ranges = BlobSource::data_ranges(self).map_err(std::io::Error::from)?;
        // The first range that ends after `start`.
        let first = ranges.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &ranges[first..] {
            if s >= end {
                break;
            }
            v.push(s.max(start)..e.min(end));
        }
        Ok(v)
    }
}
