//! Blobs as images: open a page or block blob by its URL and read it as
//! any image is read (info, check, map, checksum, compare, convert's input),
//! fetching only the ranges that hold data.

use super::{BlobSource, BlobUrl, FetchCounter};
use crate::error::Result;
use crate::image::{Image, OpenOptions};
use crate::storage::Storage;
use std::path::PathBuf;
use std::sync::Arc;

/// The name an image opened from `url` goes by: the URL, its signature
/// redacted.
fn name(url: &BlobUrl) -> PathBuf {
    PathBuf::from(url.to_string())
}

/// Opens the blob at `url` as an image: a page blob holding a fixed VHD (or
/// raw bytes), or a VHD of any type stored as a block blob. Its properties
/// and page ranges are fetched once; reads are ranged GETs of the ranges
/// that hold data. `Image::path()` is the URL with its signature redacted.
///
/// # Errors
/// [`crate::Error::Azure`] when the blob cannot be reached, does not exist or
/// the SAS is refused; the errors of [`Image::from_storage`] otherwise.
pub fn open(url: &BlobUrl, opts: &OpenOptions) -> Result<Image> {
    open_counted(url, opts).map(|o| o.image)
}

/// An image opened from a blob, with the counter of the blob's traffic.
#[derive(Debug)]
#[non_exhaustive]
pub struct CountedImage {
    /// The image.
    pub image: Image,
    /// The blob's traffic, readable while and after the image is used.
    pub counter: FetchCounter,
}

/// [`open`], with a counter of the blob's traffic (requests, retries,
/// bytes fetched) that can be read while and after the image is used.
///
/// # Errors
/// As [`open`].
pub fn open_counted(url: &BlobUrl, opts: &OpenOptions) -> Result<CountedImage> {
    let src = BlobSource::open(url)?;
    let counter = src.counter();
    let storage: Arc<dyn Storage> = Arc::new(src);
    let img = Image::from_storage_named(storage, &name(url), opts)?;
    Ok(CountedImage {
        image: img,
        counter,
    })
}

/// Checks the image in the blob at `url`, as [`crate::check()`] checks a file.
///
/// # Errors
/// As [`open`] when the blob cannot be read at all; every problem of the
/// image itself is in the report.
pub fn check(url: &BlobUrl, opts: &crate::CheckOptions) -> Result<crate::CheckReport> {
    let src = BlobSource::open(url)?;
    crate::check::check_storage_named(Arc::new(src), &name(url), opts)
}
