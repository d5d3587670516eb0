//! Azure page blobs as a destination and a source: upload any image as a
//! fixed VHD sending only its data ([`upload`]); open a blob as an image
//! ([`open`]) that fetches only the ranges holding data.
//!
//! Behind the `azure` cargo feature. The blob is reached through the
//! official Azure SDK for Rust (`azure_storage_blob`, with `azure_core`'s
//! retry policy) on a tokio runtime owned by each call; the functions here
//! are blocking.
//!
//! Authentication is the SAS in the URL (or none, for public blobs). The
//! signature never appears in an error or a report: URLs are shown with
//! `sig=` redacted, and every message from the HTTP stack is redacted too.

mod client;
mod download;
mod sink;
mod source;
mod upload;
mod url;

pub use self::download::{check, open, open_counted, CountedImage};
pub use self::source::{BlobSource, FetchCounter};
pub use self::upload::{blob_size, upload, upload_stream, UploadOptions, UploadReport};
pub use self::url::{is_url, redact, BlobUrl};

use std::fmt;

/// What went wrong with a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AzureErrorKind {
    /// The URL is not a usable blob URL.
    InvalidUrl,
    /// Plain HTTP to a host that is not a loopback address (the SAS would
    /// travel unencrypted), and plain HTTP was not allowed.
    PlainHttp,
    /// 403: the SAS was refused (expired, wrong signature, a permission missing).
    Refused,
    /// 404: the container or the blob does not exist.
    NotFound,
    /// The host could not be reached (name resolution, connection refused).
    Unreachable,
    /// The TLS handshake failed (certificate not valid for the host, ...).
    Tls,
    /// The service did not answer in time.
    Timeout,
    /// The blob exists and was not written.
    Exists,
    /// The blob has the wrong size and could not be resized.
    WrongSize {
        /// The size the blob must have, in bytes.
        needed: u64,
    },
    /// The blob's contents after the upload are not what was sent.
    Verify,
    /// The upload was cancelled; the blob is left without a footer.
    Interrupted,
    /// Any other answer of the service, or a transport error that retries
    /// did not overcome.
    Service,
}

/// An error about a blob: the blob's URL (signature redacted) and what
/// happened, in words.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AzureError {
    /// What went wrong.
    pub kind: AzureErrorKind,
    /// The URL, with the SAS signature redacted.
    pub url: String,
    /// What happened (redacted too).
    pub message: String,
}

impl AzureError {
    pub(crate) fn error(kind: AzureErrorKind, url: String, message: String) -> crate::Error {
        crate::Error::Azure(Box::new(AzureError {
            kind,
            url: redact(&url),
            message: redact(&message),
        }))
    }
}

impl fmt::Display for AzureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.url, self.message)
    }
}

impl std::error::Error for AzureError {}
