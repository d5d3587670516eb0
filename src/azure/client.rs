//! The SDK's clients for one blob, with vhdkit's retry settings, a count
//! of tries (for the report's retries), and errors turned into
//! [`AzureError`]s that name what happened and never carry the signature.

use super::{AzureError, AzureErrorKind, BlobUrl};
use crate::error::{Error, Result};
use azure_core::error::ErrorKind;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{
    ClientOptions, Context, ExponentialRetryOptions, Request, RetryOptions, StatusCode,
};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, BlobType, HttpRange,
    PageBlobClientListPageRangesOptions,
};
use azure_storage_blob::{BlobClient, BlobClientOptions, PageBlobClient, PageBlobClientOptions};
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Retries of one request: throttling (429, 503), server errors (500,
/// 502, 504), 408, timeouts and dropped connections, with exponential
/// backoff from 200 ms up to 10 s between tries and 2 minutes in all.
pub(crate) const MAX_RETRIES: u32 = 8;

/// Bytes of the blob whose page ranges are listed by one request (and its
/// continuation pages).
const SEGMENT: u64 = 32 << 30;

/// How long one try may take in all, by default: a ceiling, not the
/// usual limit (the HTTP client gives up after 20 s without a connection
/// and 60 s without an answer's bytes), high enough for a 4 MiB request on
/// a slow uplink shared by all the requests in flight.
pub(crate) const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Retry and timeout settings of a blob's requests.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tuning {
    pub timeout: std::time::Duration,
    pub retries: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            timeout: DEFAULT_TIMEOUT,
            retries: MAX_RETRIES,
        }
    }
}

/// Counts every try that reaches the transport (first tries and retries),
/// and gives each a time limit.
#[derive(Debug)]
struct CountTries(Arc<AtomicU64>, std::time::Duration);

#[async_trait::async_trait]
impl Policy for CountTries {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        self.0.fetch_add(1, Ordering::Relaxed);
        let limit = self.1;
        let answer = match tokio::time::timeout(limit, next[0].send(ctx, request, &next[1..])).await
        {
            Ok(a) => a,
            // An I/O error: the retry policy tries again.
            Err(_) => Err(azure_core::Error::with_message(
                ErrorKind::Io,
                format!("timed out: no answer within {:.1} s", limit.as_secs_f64()),
            )),
        };
        match answer {
            // A refused connection, a name that does not resolve and a
            // failed TLS handshake do not pass with retries: they are made
            // final here (the retry policy retries transport errors).
            Err(e) if matches!(e.kind(), ErrorKind::Connection | ErrorKind::Io) && is_final(&e) => {
                Err(azure_core::Error::with_message(
                    ErrorKind::Other,
                    chain_text(&e),
                ))
            }
            other => other,
        }
    }
}

/// A blob's clients, and the counts behind the report.
pub(crate) struct Blob {
    pub url: BlobUrl,
    pub blob: BlobClient,
    pub page: PageBlobClient,
    tries: Arc<AtomicU64>,
    calls: AtomicU64,
}

/// What [`Blob::properties`] found.
pub(crate) struct Properties {
    pub page_blob: bool,
    pub len: u64,
}

fn client_options(tries: &Arc<AtomicU64>, t: Tuning) -> ClientOptions {
    ClientOptions {
        per_try_policies: vec![Arc::new(CountTries(tries.clone(), t.timeout))],
        retry: RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: t.retries,
            max_total_elapsed: azure_core::time::Duration::seconds(120),
            max_delay: azure_core::time::Duration::seconds(10),
        }),
        ..Default::default()
    }
}

impl Blob {
    pub fn new(url: &BlobUrl, t: Tuning) -> Result<Blob> {
        let tries = Arc::new(AtomicU64::new(0));
        let bad = |e: azure_core::Error| {
            AzureError::error(AzureErrorKind::InvalidUrl, url.to_string(), e.to_string())
        };
        let blob = BlobClient::new(
            url.secret_url().clone(),
            None,
            Some(BlobClientOptions {
                client_options: client_options(&tries, t),
                ..Default::default()
            }),
        )
        .map_err(bad)?;
        let page = PageBlobClient::new(
            url.secret_url().clone(),
            None,
            Some(PageBlobClientOptions {
                client_options: client_options(&tries, t),
                ..Default::default()
            }),
        )
        .map_err(bad)?;
        Ok(Blob {
            url: url.clone(),
            blob,
            page,
            tries,
            calls: AtomicU64::new(0),
        })
    }

    /// Requests made (each counted once however often it was tried).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Tries beyond the first of each request.
    pub fn retries(&self) -> u64 {
        self.tries
            .load(Ordering::Relaxed)
            .saturating_sub(self.calls())
    }

    fn call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The error for `e`, met while doing `what`.
    pub fn error(&self, what: &str, e: azure_core::Error) -> Error {
        map_error(&self.url, what, &e)
    }

    /// The blob's type and length; `None` when it does not exist.
    pub async fn properties(&self) -> Result<Option<Properties>> {
        self.call();
        match self.blob.get_properties(None).await {
            Ok(r) => {
                let len = r
                    .content_length()
                    .map_err(|e| self.error("reading the blob's properties", e))?
                    .unwrap_or(0);
                let page_blob = matches!(
                    r.blob_type()
                        .map_err(|e| self.error("reading the blob's properties", e))?,
                    Some(BlobType::PageBlob)
                );
                Ok(Some(Properties { page_blob, len }))
            }
            Err(e) if e.http_status() == Some(StatusCode::NotFound) => {
                // A HEAD answer has no body: the error code, when the
                // service sends one, is in a header. A missing container
                // is found out when the blob is created.
                match error_code(&e).as_deref() {
                    Some("ContainerNotFound") => {
                        Err(self.error("reading the blob's properties", e))
                    }
                    _ => Ok(None),
                }
            }
            Err(e) => Err(self.error("reading the blob's properties", e)),
        }
    }

    pub async fn create(&self, len: u64) -> Result<()> {
        self.call();
        self.page
            .create(len, None)
            .await
            .map_err(|e| self.error("creating the page blob", e))?;
        Ok(())
    }

    pub async fn delete(&self) -> Result<()> {
        self.call();
        self.blob
            .delete(None)
            .await
            .map_err(|e| self.error("deleting the blob", e))?;
        Ok(())
    }

    pub async fn resize(&self, len: u64) -> Result<(), azure_core::Error> {
        self.call();
        self.page.resize(len, None).await?;
        Ok(())
    }

    pub async fn put_pages(&self, offset: u64, data: azure_core::Bytes) -> Result<()> {
        self.call();
        let len = data.len() as u64;
        self.page
            .upload_pages(data.into(), len, HttpRange::new(offset, len), None)
            .await
            .map_err(|e| self.error("writing pages", e))?;
        Ok(())
    }

    pub async fn clear_pages(&self, offset: u64, len: u64) -> Result<()> {
        self.call();
        self.page
            .clear_pages(HttpRange::new(offset, len), None)
            .await
            .map_err(|e| self.error("clearing pages", e))?;
        Ok(())
    }

    /// The page ranges holding data in a blob of `len` bytes, merged, in
    /// order. Listed a segment of the blob at a time (32 GiB), each in
    /// pages of results: a fragmented multi-TiB blob is listed in requests
    /// the service answers in time.
    pub async fn page_ranges(&self, len: u64) -> Result<Vec<(u64, u64)>> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut start = 0;
        while start < len {
            let n = SEGMENT.min(len - start);
            self.page_ranges_in(start, n, &mut out).await?;
            start += n;
        }
        out.sort_unstable();
        let mut merged = Vec::with_capacity(out.len());
        for (s, e) in out {
            push_range(&mut merged, s, e);
        }
        Ok(merged)
    }

    async fn page_ranges_in(&self, start: u64, n: u64, out: &mut Vec<(u64, u64)>) -> Result<()> {
        let what = "listing the page ranges";
        let mut pages = self
            .page
            .list_page_ranges(Some(PageBlobClientListPageRangesOptions {
                range: Some(HttpRange::new(start, n)),
                ..Default::default()
            }))
            .map_err(|e| self.error(what, e))?;
        loop {
            self.call();
            let Some(page) = pages.next().await else {
                // The last call found no page.
                self.calls.fetch_sub(1, Ordering::Relaxed);
                break;
            };
            let list = page
                .map_err(|e| self.error(what, e))?
                .into_model()
                .map_err(|e| self.error(what, e))?;
            for r in list.page_ranges {
                let (Some(s), Some(e)) = (r.start, r.end) else {
                    continue;
                };
                let (Ok(s), Ok(e)) = (u64::try_from(s), u64::try_from(e)) else {
                    continue;
                };
                // Clipped to the segment asked for.
                push_range(out, s.max(start), (e + 1).min(start + n));
            }
        }
        Ok(())
    }

    /// `len` bytes at `offset`, read with one ranged GET.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let what = "reading the blob";
        self.call();
        let r = self
            .blob
            .download(Some(BlobClientDownloadOptions {
                range: Some(HttpRange::new(offset, len)),
                parallel: std::num::NonZero::new(1),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.error(what, e))?;
        let bytes = r.body.collect().await.map_err(|e| self.error(what, e))?;
        if bytes.len() as u64 != len {
            return Err(AzureError::error(
                AzureErrorKind::Service,
                self.url.to_string(),
                format!(
                    "{what}: asked for {len} bytes at offset {offset}, got {}",
                    bytes.len()
                ),
            ));
        }
        Ok(bytes.to_vec())
    }
}

/// Appends `[s, e)` to sorted ranges, merging it with the last when they
/// touch or overlap.
pub(crate) fn push_range(v: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    if s >= e {
        return;
    }
    if let Some(last) = v.last_mut() {
        if s <= last.1 && s >= last.0 {
            last.1 = last.1.max(e);
            return;
        }
    }
    v.push((s, e));
}

fn error_code(e: &azure_core::Error) -> Option<String> {
    match e.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.clone(),
        _ => None,
    }
}

/// A transport error that retrying cannot fix.
fn is_final(e: &azure_core::Error) -> bool {
    let l = chain_text(e).to_ascii_lowercase();
    is_tls(&l)
        || l.contains("connection refused")
        || l.contains("dns error")
        || l.contains("failed to lookup")
        || l.contains("name or service not known")
}

fn is_tls(lower: &str) -> bool {
    [
        "certificate",
        "tls",
        "handshake",
        "corrupt message",
        "invalidcontenttype",
        "alert",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// Every message of an error's chain, joined.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The error for an SDK error met while doing `what`, in the words the
/// user needs: 403 is a refused SAS, 404 names what is missing, transport
/// failures say whether the host was unreachable, TLS failed or time ran
/// out. The message is redacted (the SDK's may quote the URL).
pub(crate) fn map_error(url: &BlobUrl, what: &str, e: &azure_core::Error) -> Error {
    let detail = chain_text(e);
    let (kind, message) = match (e.http_status(), e.kind()) {
        (Some(StatusCode::Forbidden), _) => (
            AzureErrorKind::Refused,
            format!(
                "{what}: the SAS was refused (403{}): it has expired, its signature is wrong, or \
                 it lacks a permission this needs (r to read; c and w to write)",
                error_code(e).map(|c| format!(" {c}")).unwrap_or_default()
            ),
        ),
        (Some(StatusCode::NotFound), _) => {
            let msg = match error_code(e).as_deref() {
                Some("ContainerNotFound") => {
                    format!("{what}: container {:?} not found", url.container())
                }
                Some("BlobNotFound") | None => format!(
                    "{what}: blob {:?} not found in container {:?}",
                    url.blob(),
                    url.container()
                ),
                Some(other) => format!("{what}: not found (404 {other})"),
            };
            (AzureErrorKind::NotFound, msg)
        }
        (Some(status), _) => (
            AzureErrorKind::Service,
            format!(
                "{what}: the service answered {} {}{}",
                u16::from(status),
                status.canonical_reason(),
                error_code(e).map(|c| format!(" ({c})")).unwrap_or_default()
            ),
        ),
        (None, _) => {
            let l = detail.to_ascii_lowercase();
            if is_tls(&l) {
                (
                    AzureErrorKind::Tls,
                    format!(
                        "{what}: TLS failure talking to {} (certificates are verified): {detail}",
                        url.host()
                    ),
                )
            } else if l.contains("timed out") || l.contains("timeout") {
                (
                    AzureErrorKind::Timeout,
                    format!("{what}: timed out talking to {}: {detail}", url.host()),
                )
            } else if matches!(e.kind(), ErrorKind::Connection)
                || l.contains("connection refused")
                || l.contains("connect")
                || l.contains("dns")
                || l.contains("resolve")
            {
                (
                    AzureErrorKind::Unreachable,
                    format!("{what}: cannot reach {}: {detail}", url.host()),
                )
            } else {
                (
                    AzureErrorKind::Service,
                    format!("{what}: {detail} (after up to {MAX_RETRIES} retries)"),
                )
            }
        }
    };
    AzureError::error(kind, url.to_string(), message)
}
