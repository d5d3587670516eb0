//! Upload: any image into a page blob holding a fixed VHD, data only.
//!
//! An image is walked by the engine every conversion uses
//! ([`crate::walk::copy`], zero extents skipped without being read, data
//! scanned for zero pages at 4 KiB) into a page-blob sink (sink.rs); a
//! stream is read and scanned here. Data runs are gathered into Put Page
//! requests of at most 4 MiB. A zero gap between two runs is sent only
//! when merging it saves a request (the next run, or what is left of it
//! after the part that fits, then needs fewer requests of its own), and
//! only while it is cheap: the gap is at most 64 KiB, the request stays
//! within 4 MiB, and the zero bytes of a request stay within 1/16 of its
//! data bytes — so at worst 6.25 % more bytes are
//! sent than the image holds data, and in practice (filesystem layouts)
//! almost none. Requests run in parallel, each holding its buffer: memory
//! is about `parallel` × 4 MiB, and for an image 16 MiB more in requests
//! being gathered. The footer is written last, so an interrupted upload is
//! never a valid VHD.

use super::client::{push_range, Blob};
use super::sink::PageBlobSink;
use super::{AzureError, AzureErrorKind, BlobUrl};
use crate::convert::Progress;
use crate::error::{Error, Result};
use crate::image::{Image, OpenOptions};
use crate::ondisk::{DiskType, Footer, FOOTER_SIZE, SECTOR};
use crate::walk::{self, CancelToken, Control, Event};
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The largest Put Page request.
pub const MAX_REQUEST: u64 = 4 << 20;
/// The largest zero gap merged into a request.
pub const MAX_GAP: u64 = 64 << 10;
/// Zero bytes of a request stay within 1/`GAP_RATIO` of its data bytes.
pub const GAP_RATIO: u64 = 16;
/// Requests in flight by default. Measured on the emulator on loopback
/// (see docs): beyond 8 nothing is gained, below it the round trips show.
pub const DEFAULT_PARALLEL: usize = 8;

/// How to upload.
#[derive(Clone)]
pub struct UploadOptions {
    pub(crate) exact_size: bool,
    pub(crate) overwrite: bool,
    pub(crate) resume: bool,
    pub(crate) parallel: usize,
    pub(crate) size: Option<u64>,
    pub(crate) timeout: Duration,
    pub(crate) retries: u32,
    pub(crate) open: OpenOptions,
    pub(crate) progress: Option<Arc<dyn Progress>>,
    pub(crate) cancel: Option<Arc<AtomicBool>>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            exact_size: false,
            overwrite: false,
            resume: false,
            parallel: DEFAULT_PARALLEL,
            size: None,
            timeout: super::client::DEFAULT_TIMEOUT,
            retries: super::client::MAX_RETRIES,
            open: OpenOptions::default(),
            progress: None,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for UploadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadOptions")
            .field("exact_size", &self.exact_size)
            .field("overwrite", &self.overwrite)
            .field("resume", &self.resume)
            .field("parallel", &self.parallel)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl UploadOptions {
    /// Defaults: size rounded up to a whole MiB, an existing blob refused
    /// (except an empty page blob of exactly the needed size), 8 requests
    /// in flight.
    pub fn new() -> Self {
        Self::default()
    }
    /// Keep the virtual size as it is (rounded up to a whole sector only)
    /// instead of rounding it up to a whole MiB.
    pub fn exact_size(mut self, yes: bool) -> Self {
        self.exact_size = yes;
        self
    }
    /// Replace an existing blob: resized if needed, stale pages cleared.
    pub fn overwrite(mut self, yes: bool) -> Self {
        self.overwrite = yes;
        self
    }
    /// Continue an interrupted upload into the same blob: what is there is
    /// read back and compared, only what is missing or differs is sent.
    pub fn resume(mut self, yes: bool) -> Self {
        self.resume = yes;
        self
    }
    /// Requests in flight (at least 1).
    pub fn parallel(mut self, n: usize) -> Self {
        self.parallel = n;
        self
    }
    /// The virtual size of a streamed input, when known in advance.
    pub fn virtual_size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }
    /// How long one try of a request may take in all (default 10 minutes;
    /// besides, the HTTP client gives up after 20 s without a connection and
    /// 60 s without an answer's bytes); a try that times out is retried.
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    /// Retries of a request after throttling, server errors, timeouts and
    /// dropped connections (default 8, with exponential backoff from 200 ms
    /// to 10 s between tries, at most 2 minutes in all).
    pub fn max_retries(mut self, n: u32) -> Self {
        self.retries = n;
        self
    }
    fn tuning(&self) -> super::client::Tuning {
        super::client::Tuning {
            timeout: self.timeout,
            retries: self.retries,
        }
    }
    /// How to open the input.
    pub fn open_options(mut self, o: OpenOptions) -> Self {
        self.open = o;
        self
    }
    /// Receives progress: virtual bytes done, and bytes sent.
    pub fn progress(mut self, p: Arc<dyn Progress>) -> Self {
        self.progress = Some(p);
        self
    }
    /// Stops the upload when set (the blob is left without a footer).
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
}

/// What an upload did.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct UploadReport {
    /// The virtual size of the uploaded VHD.
    pub virtual_size: u64,
    /// The blob's length: the virtual size and the 512-byte footer.
    pub blob_size: u64,
    /// The input's virtual size, when the output's was rounded up from it.
    pub rounded_from: Option<u64>,
    /// Bytes sent in Put Page requests (data, merged zero gaps, footer).
    pub bytes_sent: u64,
    /// Virtual bytes not sent because they are zero.
    pub bytes_skipped: u64,
    /// Bytes found already in place by a resumed upload, not sent again.
    pub bytes_kept: u64,
    /// Requests made to the service, each counted once.
    pub requests: u64,
    /// Tries beyond the first (throttling, server errors, dropped connections).
    pub retries: u64,
    /// Stale page ranges cleared (an overwritten or resumed blob).
    pub ranges_cleared: u64,
    /// Page ranges the blob holds at the end (listed and checked).
    pub page_ranges: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// The size a blob must have to hold `img` as a fixed VHD: the virtual
/// size rounded up to a whole MiB (or, `exact`, to a whole sector) plus
/// the 512-byte footer. The value for a managed disk's upload size.
pub fn blob_size(virtual_size: u64, exact: bool) -> u64 {
    vhd_size(virtual_size, exact) + FOOTER_SIZE as u64
}

fn vhd_size(virtual_size: u64, exact: bool) -> u64 {
    if exact {
        virtual_size.div_ceil(SECTOR) * SECTOR
    } else {
        crate::write::azure_size(virtual_size)
    }
}

fn footer_bytes(size: u64) -> [u8; FOOTER_SIZE] {
    crate::write::new_footer(DiskType::Fixed, size)
        .with_checksum()
        .to_bytes()
}

/// State shared by the workers.
struct Shared {
    blob: Blob,
    sent: AtomicU64,
    kept: AtomicU64,
    failed: AtomicBool,
    error: Mutex<Option<Error>>,
    progress: Option<Arc<dyn Progress>>,
    /// Ranges of the blob that held data before (a resumed or overwritten
    /// blob), merged, in order.
    existing: Vec<(u64, u64)>,
    resume: bool,
}

impl Shared {
    fn fail(&self, e: Error) {
        let mut g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(e);
        }
        self.failed.store(true, Ordering::SeqCst);
    }

    /// True when the blob held pages over the whole of `[s, e)` before.
    fn covered(&self, s: u64, e: u64) -> bool {
        let i = self.existing.partition_point(|r| r.1 <= s);
        self.existing.get(i).is_some_and(|r| r.0 <= s && r.1 >= e)
    }

    /// Sends one request (or, resuming, checks it is already there).
    async fn send(&self, offset: u64, data: Vec<u8>, virtual_len: u64) {
        if self.failed.load(Ordering::SeqCst) {
            return;
        }
        let end = offset + data.len() as u64;
        if self.resume && self.covered(offset, end) {
            match self.blob.read(offset, data.len() as u64).await {
                Ok(there) if there == data => {
                    self.kept.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some(p) = &self.progress {
                        p.advance(virtual_len);
                    }
                    return;
                }
                Ok(_) => {}
                Err(e) => return self.fail(e),
            }
        }
        let n = data.len() as u64;
        match self
            .blob
            .put_pages(offset, azure_core::Bytes::from(data))
            .await
        {
            Ok(()) => {
                self.sent.fetch_add(n, Ordering::Relaxed);
                if let Some(p) = &self.progress {
                    p.written(n);
                    p.advance(virtual_len);
                }
            }
            Err(e) => self.fail(e),
        }
    }
}

/// A request being grown: `[start, end)`, its data and zero bytes.
#[derive(Clone, Copy)]
struct Pending {
    start: u64,
    end: u64,
    data: u64,
    zeros: u64,
}

/// Coalesces data runs into requests (the rule in the module docs).
#[derive(Default)]
struct Coalescer {
    cur: Option<Pending>,
    /// Zero bytes merged into requests (sent although zero).
    merged_zeros: u64,
}

impl Coalescer {
    /// Adds the data run `[s, e)`; `emit` receives finished requests.
    fn data(
        &mut self,
        mut s: u64,
        e: u64,
        emit: &mut dyn FnMut(Pending) -> Result<()>,
    ) -> Result<()> {
        while s < e {
            if let Some(mut c) = self.cur {
                let gap = s - c.end;
                let room = MAX_REQUEST - (c.end - c.start);
                let rest = e - s;
                let join = rest.min(room.saturating_sub(gap));
                // Merging saves a request only when the rest of the run then
                // needs fewer requests of its own.
                let saves = rest.div_ceil(MAX_REQUEST) > (rest - join).div_ceil(MAX_REQUEST);
                if gap <= MAX_GAP
                    && gap < room
                    && join > 0
                    && saves
                    && (c.zeros + gap) * GAP_RATIO <= c.data + join
                {
                    c.end = s + join;
                    c.data += join;
                    c.zeros += gap;
                    self.merged_zeros += gap;
                    s += join;
                    if c.end - c.start == MAX_REQUEST {
                        self.cur = None;
                        emit(c)?;
                    } else {
                        self.cur = Some(c);
                    }
                    continue;
                }
                self.cur = None;
                emit(c)?;
            }
            let take = (e - s).min(MAX_REQUEST);
            let c = Pending {
                start: s,
                end: s + take,
                data: take,
                zeros: 0,
            };
            s += take;
            if take == MAX_REQUEST {
                emit(c)?;
            } else {
                self.cur = Some(c);
            }
        }
        Ok(())
    }

    fn finish(&mut self, emit: &mut dyn FnMut(Pending) -> Result<()>) -> Result<()> {
        if let Some(c) = self.cur.take() {
            emit(c)?;
        }
        Ok(())
    }
}

/// Hands requests to workers on its runtime, at most `parallel` at once.
pub(crate) struct Uploader {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    sem: Arc<Semaphore>,
    parallel: usize,
    cancel: Option<Arc<AtomicBool>>,
    /// Every range sent or kept, merged: checked against the page ranges.
    planned: Vec<(u64, u64)>,
    skipped: u64,
}

impl Uploader {
    /// Doubles the blob's capacity for data (`cap`, the footer not counted)
    /// until the sectors of `end` bytes fit, after the requests in flight.
    fn grow(&mut self, cap: &mut u64, end: u64) -> Result<()> {
        while end.div_ceil(SECTOR) * SECTOR > *cap {
            let new_cap = *cap * 2;
            self.drain();
            self.rt
                .block_on(self.shared.blob.resize(new_cap + FOOTER_SIZE as u64))
                .map_err(|e| self.shared.blob.error("growing the page blob", e))?;
            *cap = new_cap;
        }
        Ok(())
    }
    /// Hands the request `[start, start + data.len())` to a worker, waiting
    /// for a free one first (this bounds memory).
    /// `virtual_len` virtual bytes are done once it is sent (0 where the
    /// caller's walk counts them).
    pub(crate) fn dispatch(&mut self, start: u64, data: Vec<u8>, virtual_len: u64) -> Result<()> {
        self.check()?;
        push_range(&mut self.planned, start, start + data.len() as u64);
        // The semaphore is never closed, so acquiring cannot fail; were it
        // closed, the request would simply run without a permit.
        let permit = self.rt.block_on(self.sem.clone().acquire_owned()).ok();
        let shared = self.shared.clone();
        self.rt.spawn(async move {
            shared.send(start, data, virtual_len).await;
            drop(permit);
        });
        Ok(())
    }

    /// The cancellation asked for, or the failure of a request so far.
    pub(crate) fn check(&self) -> Result<()> {
        if self
            .cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::SeqCst))
            || crate::walk::cancel_requested()
        {
            return Err(self.interrupted());
        }
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.take_error());
        }
        Ok(())
    }

    fn interrupted(&self) -> Error {
        AzureError::error(
            AzureErrorKind::Interrupted,
            self.shared.blob.url.to_string(),
            "interrupted: the blob holds part of the image and no footer, so it is not a valid \
             VHD; a resumed upload continues it"
                .into(),
        )
    }

    /// Waits for every request in flight.
    fn drain(&self) {
        let n = u32::try_from(self.parallel).unwrap_or(u32::MAX);
        // Never closed (see dispatch): all permits back means nothing in flight.
        let all = self
            .rt
            .block_on(self.sem.clone().acquire_many_owned(n))
            .ok();
        drop(all);
    }

    fn take_error(&self) -> Error {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(Error::Interrupted)
    }

    fn advance(&self, n: u64) {
        if let Some(p) = &self.shared.progress {
            p.advance(n);
        }
    }
}

/// Prepares the blob for an upload of `len` bytes: creates it, or checks
/// that an existing one may be written (and with `overwrite` resizes it
/// when needed). Returns the page ranges it holds (to compare when
/// resuming, to clear when stale).
async fn prepare(blob: &Blob, len: u64, opts: &UploadOptions) -> Result<Vec<(u64, u64)>> {
    let url = blob.url.to_string();
    let props = blob.properties().await?;
    let Some(p) = props else {
        if opts.resume {
            return Err(AzureError::error(
                AzureErrorKind::NotFound,
                url,
                "no blob to resume an upload into".into(),
            ));
        }
        blob.create(len).await?;
        return Ok(Vec::new());
    };
    if !p.page_blob {
        if opts.overwrite {
            blob.delete().await?;
            blob.create(len).await?;
            return Ok(Vec::new());
        }
        return Err(AzureError::error(
            AzureErrorKind::Exists,
            url,
            format!(
                "a blob of {} bytes that is not a page blob exists and was left as it is",
                p.len
            ),
        ));
    }
    if p.len != len && (opts.resume || opts.overwrite) {
        if opts.resume && !opts.overwrite {
            return Err(AzureError::error(
                AzureErrorKind::WrongSize { needed: len },
                url,
                format!(
                    "the page blob is {} bytes, this upload needs exactly {len}: it is not an \
                     interrupted upload of this image",
                    p.len
                ),
            ));
        }
        if let Err(e) = blob.resize(len).await {
            let cause = super::client::map_error(&blob.url, "resizing the page blob", &e);
            return Err(AzureError::error(
                AzureErrorKind::WrongSize { needed: len },
                url,
                format!(
                    "the page blob is {} bytes and could not be resized ({}); it must be exactly \
                     {len} bytes",
                    p.len,
                    match &cause {
                        Error::Azure(a) => a.message.clone(),
                        other => other.to_string(),
                    }
                ),
            ));
        }
    }
    // Resized above when it had another size and may be rewritten.
    let now = if opts.resume || opts.overwrite {
        len
    } else {
        p.len
    };
    let ranges = blob.page_ranges(now).await?;
    if opts.resume || opts.overwrite {
        return Ok(ranges);
    }
    if p.len == len && ranges.is_empty() {
        // What `az disk create --for-upload` leaves: written into.
        return Ok(ranges);
    }
    let what = if ranges.is_empty() {
        "an empty page blob".to_string()
    } else {
        "a page blob holding data".to_string()
    };
    let size_note = if p.len == len {
        String::new()
    } else {
        format!(" (an empty one of exactly {len} bytes would be written into)")
    };
    Err(AzureError::error(
        AzureErrorKind::Exists,
        url,
        format!(
            "{what} of {} bytes exists and was left as it is{size_note}",
            p.len
        ),
    ))
}

/// The I/O runtime of one upload or one blob source: two worker threads.
pub(crate) fn new_runtime(url: &BlobUrl) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| {
            AzureError::error(
                AzureErrorKind::Service,
                url.to_string(),
                format!("starting the I/O runtime: {e}"),
            )
        })
}

fn start(url: &BlobUrl, len: u64, opts: &UploadOptions) -> Result<Uploader> {
    if opts.parallel == 0 {
        return Err(Error::invalid_option(
            "parallel",
            0,
            "parallel requests must be at least 1",
        ));
    }
    let rt = new_runtime(url)?;
    let blob = Blob::new(url, opts.tuning())?;
    let existing = rt.block_on(prepare(&blob, len, opts))?;
    let shared = Arc::new(Shared {
        blob,
        sent: AtomicU64::new(0),
        kept: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        progress: opts.progress.clone(),
        existing,
        resume: opts.resume,
    });
    // A footer left by an earlier upload goes first: until the new one is
    // written, the blob is not a valid VHD.
    let footer_at = len - FOOTER_SIZE as u64;
    if shared.existing.iter().any(|r| r.0 < len && r.1 > footer_at) {
        rt.block_on(shared.blob.clear_pages(footer_at, FOOTER_SIZE as u64))?;
    }
    Ok(Uploader {
        rt,
        shared,
        sem: Arc::new(Semaphore::new(opts.parallel)),
        parallel: opts.parallel,
        cancel: opts.cancel.clone(),
        planned: Vec::new(),
        skipped: 0,
    })
}

/// After the data: stale ranges cleared, the footer written, the page
/// ranges listed and checked against what was sent.
fn finish(
    mut up: Uploader,
    size: u64,
    rounded_from: Option<u64>,
    started: Instant,
) -> Result<UploadReport> {
    up.drain();
    if up.shared.failed.load(Ordering::SeqCst) {
        return Err(up.take_error());
    }
    let len = size + FOOTER_SIZE as u64;
    let shared = up.shared.clone();
    // Requests are handed out in no promised order: the ranges, in order
    // and merged.
    let mut planned = std::mem::take(&mut up.planned);
    planned.sort_unstable();
    for (s, e) in planned {
        push_range(&mut up.planned, s, e);
    }
    // Stale pages: held before, not part of the new image.
    let mut stale = Vec::new();
    let mut j = 0;
    for &(s, e) in &shared.existing {
        let mut pos = s.min(size);
        let e = e.min(size);
        while pos < e {
            while j < up.planned.len() && up.planned[j].1 <= pos {
                j += 1;
            }
            match up.planned.get(j) {
                Some(&(ps, pe)) if ps <= pos => pos = pe.min(e).max(pos),
                Some(&(ps, _)) if ps < e => {
                    stale.push((pos, ps));
                    pos = ps;
                }
                _ => {
                    stale.push((pos, e));
                    pos = e;
                }
            }
        }
    }
    let cleared = stale.len() as u64;
    up.rt.block_on(async {
        for (s, e) in stale {
            shared.blob.clear_pages(s, e - s).await?;
        }
        let footer = footer_bytes(size);
        shared
            .blob
            .put_pages(size, azure_core::Bytes::copy_from_slice(&footer))
            .await?;
        Ok::<(), Error>(())
    })?;
    shared.sent.fetch_add(FOOTER_SIZE as u64, Ordering::Relaxed);
    push_range(&mut up.planned, size, len);
    let ranges = up.rt.block_on(shared.blob.page_ranges(len))?;
    if ranges != up.planned {
        let first = ranges
            .iter()
            .zip(up.planned.iter())
            .position(|(a, b)| a != b)
            .unwrap_or(ranges.len().min(up.planned.len()));
        return Err(AzureError::error(
            AzureErrorKind::Verify,
            shared.blob.url.to_string(),
            format!(
                "after the upload the blob holds {} page ranges where {} were written; first \
                 difference: {:?} against {:?}",
                ranges.len(),
                up.planned.len(),
                ranges.get(first),
                up.planned.get(first)
            ),
        ));
    }
    Ok(UploadReport {
        virtual_size: size,
        blob_size: len,
        rounded_from,
        bytes_sent: shared.sent.load(Ordering::Relaxed),
        bytes_skipped: up.skipped,
        bytes_kept: shared.kept.load(Ordering::Relaxed),
        requests: shared.blob.calls(),
        retries: shared.blob.retries(),
        ranges_cleared: cleared,
        page_ranges: ranges.len() as u64,
        elapsed: started.elapsed(),
    })
}

/// Uploads the image at `input` (raw, fixed, dynamic or a differencing
/// chain) into the page blob at `url`, as a fixed VHD, sending only its
/// non-zero pages; the footer last. An existing blob is refused unless
/// `overwrite` or `resume`, except an empty page blob of exactly the size
/// needed ([`blob_size`]), which is written into.
///
/// # Errors
/// The input cannot be read; the blob exists; the SAS is refused; the
/// container or blob is missing; the host cannot be reached; retries did
/// not overcome a failure; the page ranges after the upload are not those
/// sent.
pub fn upload(
    input: impl AsRef<Path>,
    url: &BlobUrl,
    opts: &UploadOptions,
) -> Result<UploadReport> {
    let input = input.as_ref();
    let started = Instant::now();
    let img = Image::open_with(input, &opts.open)?;
    let vsize = img.virtual_size();
    let size = vhd_size(vsize, opts.exact_size);
    let rounded_from = (size != vsize).then_some(vsize);
    let len = size + FOOTER_SIZE as u64;
    let up = start(url, len, opts)?;
    if let Some(p) = &opts.progress {
        p.start(size);
    }
    // The walk advances the progress over the disk; the uploader reports
    // the bytes sent as requests finish.
    let progress = |e: Event| {
        if let (Some(p), Event::Advance(n)) = (&opts.progress, e) {
            p.advance(n);
        }
    };
    let token = opts.cancel.clone().map(CancelToken::from_flag);
    let mut ctl = Control::new().progress(&progress);
    if let Some(t) = &token {
        ctl = ctl.cancel(t);
    }
    // A zero gap merged into a request must be zero in the image: runs
    // come in no promised order, so the sink asks.
    let zero = |at: u64, len: u64| -> Result<bool> {
        if len > MAX_GAP {
            return Ok(false);
        }
        let mut b = vec![0u8; len as usize];
        img.read_exact_at(&mut b, at)?;
        Ok(crate::scan::is_zero(&b))
    };
    let sink = PageBlobSink::new(up, &zero);
    let (mut up, walked) = match walk::copy(&img, &sink, true, &ctl) {
        Ok(c) => {
            let (up, merged) = sink.finish();
            (up, merged.map(|m| (c, m)))
        }
        Err(e) => (sink.into_uploader(), Err(e)),
    };
    let (copied, merged_zeros) = match walked {
        Ok(w) => w,
        Err(e) => {
            up.drain();
            return Err(match e {
                Error::Interrupted if up.shared.failed.load(Ordering::SeqCst) => up.take_error(),
                Error::Interrupted => up.interrupted(),
                other => other,
            });
        }
    };
    // Neither sent nor merged into a request: zero, or past the input's end.
    up.skipped = size.saturating_sub(copied.written + merged_zeros);
    if size > vsize {
        up.advance(size - vsize);
    }
    finish(up, size, rounded_from, started)
}

/// Uploads a raw disk or a fixed VHD read from a stream (a pipe), still
/// skipping zero pages. The size is learnt at the end of the stream: the
/// blob grows as data arrives and takes its final size before the footer.
/// A known size ([`UploadOptions::virtual_size`]) or an existing empty page
/// blob fixes it in advance. A stream that ends with a fixed VHD footer
/// whose size matches the bytes before it is a fixed VHD; anything else is
/// a raw disk.
///
/// # Errors
/// As [`upload`]; a stream longer than the size given.
pub fn upload_stream(
    mut input: impl Read,
    url: &BlobUrl,
    opts: &UploadOptions,
) -> Result<UploadReport> {
    let started = Instant::now();
    // Learn a fixed size: given, or the size of an empty page blob there.
    let known = match opts.size {
        Some(s) => Some(vhd_size(s, opts.exact_size)),
        // Resuming, the blob's size is the upload's; otherwise an empty
        // page blob's size is taken (a managed disk cannot be resized).
        None if !opts.overwrite => {
            let rt = new_runtime(url)?;
            let blob = Blob::new(url, opts.tuning())?;
            rt.block_on(blob.properties())?
                .filter(|p| p.page_blob && p.len > FOOTER_SIZE as u64 && p.len % SECTOR == 0)
                .map(|p| p.len - FOOTER_SIZE as u64)
        }
        None => None,
    };
    // Without a known size the blob starts at 1 GiB and doubles as data
    // arrives past it; it gets its final size at the end.
    const GROW_FROM: u64 = 1 << 30;
    let mut cap = known.unwrap_or(GROW_FROM);
    let mut up = start(url, cap + FOOTER_SIZE as u64, opts)?;
    if let Some(p) = &opts.progress {
        p.start(known.unwrap_or(0));
    }
    let mut co = Coalescer::default();
    // Bytes are read in 4 MiB pieces; the last 512 bytes of the stream
    // are held back until the end (they may be a fixed VHD's footer).
    let piece = MAX_REQUEST as usize;
    let mut held: Vec<u8> = Vec::new();
    let mut pos = 0u64; // stream offset of held[0]
    let mut eof = false;
    let mut zeros = 0u64;
    let result: Result<()> = (|| {
        while !eof {
            let mut buf = vec![0u8; piece + FOOTER_SIZE];
            let mut n = 0;
            // Keep what was held back in front.
            let keep = held.len();
            buf[..keep].copy_from_slice(&held);
            n += keep;
            while n < buf.len() {
                match input.read(&mut buf[n..]) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Error::io(Path::new("-"), "read", e)),
                }
            }
            buf.truncate(n);
            let body = n.saturating_sub(FOOTER_SIZE);
            held = buf[body..].to_vec();
            buf.truncate(body);
            if buf.is_empty() {
                continue;
            }
            let end = pos + buf.len() as u64;
            if let Some(k) = known {
                if end > k && !(eof && end == k + FOOTER_SIZE as u64) {
                    return Err(Error::invalid_option(
                        "size",
                        k,
                        format!("the stream is longer than the size of {k} bytes"),
                    ));
                }
            }
            up.grow(&mut cap, end)?;
            let mut runs = Vec::new();
            crate::scan::nonzero_runs(&buf, pos, crate::scan::ZERO_UNIT, &mut runs);
            let mut covered = 0;
            for r in &runs {
                covered += r.end - r.start;
            }
            zeros += buf.len() as u64 - covered;
            up.advance(buf.len() as u64 - covered);
            let base = pos;
            let data = &buf;
            let mut emit = |c: Pending| -> Result<()> {
                let endp = c.end.div_ceil(SECTOR) * SECTOR;
                let mut out = vec![0u8; (endp - c.start) as usize];
                let from = (c.start - base) as usize;
                let to = (c.end - base) as usize;
                out[..to - from].copy_from_slice(&data[from..to]);
                up.dispatch(c.start, out, c.end - c.start)
            };
            for r in runs {
                co.data(r.start, r.end, &mut emit)?;
            }
            // A request never spans two pieces (its bytes would be gone).
            co.finish(&mut emit)?;
            pos = end;
        }
        Ok(())
    })();
    if let Err(e) = result {
        up.drain();
        return Err(match e {
            Error::Interrupted if up.shared.failed.load(Ordering::SeqCst) => up.take_error(),
            other => other,
        });
    }
    // The held-back tail: a fixed VHD's footer, or the raw disk's last bytes.
    let mut vsize = pos;
    let is_footer = held.len() == FOOTER_SIZE && {
        let mut b = [0u8; FOOTER_SIZE];
        b.copy_from_slice(&held);
        Footer::has_cookie(&b)
            && Footer::parse(&b, pos, crate::error::Structure::Footer)
                .is_ok_and(|f| f.disk_type == DiskType::Fixed && f.current_size == pos)
    };
    if !held.is_empty() && !is_footer {
        // Raw bytes: the last of the disk.
        let tail = std::mem::take(&mut held);
        vsize = pos + tail.len() as u64;
        up.grow(&mut cap, vsize)?;
        if !crate::scan::is_zero(&tail) {
            let endp = vsize.div_ceil(SECTOR) * SECTOR;
            let mut out = vec![0u8; (endp - pos) as usize];
            out[..tail.len()].copy_from_slice(&tail);
            up.dispatch(pos, out, tail.len() as u64)?;
        } else {
            zeros += tail.len() as u64;
            up.advance(tail.len() as u64);
        }
    }
    let size = match known {
        Some(k) => k,
        None => vhd_size(vsize, opts.exact_size),
    };
    let rounded_from = (size != vsize).then_some(vsize);
    if let Some(p) = &opts.progress {
        if known.is_none() {
            p.start(size);
        }
    }
    if size > vsize {
        zeros += size - vsize;
        up.advance(size - vsize);
    }
    up.skipped = zeros - co.merged_zeros;
    if size != cap {
        up.drain();
        up.rt
            .block_on(up.shared.blob.resize(size + FOOTER_SIZE as u64))
            .map_err(|e| up.shared.blob.error("resizing the page blob", e))?;
    }
    finish(up, size, rounded_from, started)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn plan(runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut co = Coalescer::default();
        let mut out = Vec::new();
        let mut emit = |c: Pending| -> Result<()> {
            out.push((c.start, c.end));
            Ok(())
        };
        for &(s, e) in runs {
            co.data(s, e, &mut emit).unwrap();
        }
        co.finish(&mut emit).unwrap();
        out
    }

    #[test]
    fn runs_coalesce_into_requests_by_the_stated_rule() {
        const K: u64 = 1024;
        // Far apart: two requests.
        assert_eq!(plan(&[(0, 4 * K), (1 << 20, (1 << 20) + 4 * K)]).len(), 2);
        // A 4 KiB gap between 64 KiB runs: 4 / 128 < 1/16, merged.
        assert_eq!(plan(&[(0, 64 * K), (68 * K, 132 * K)]), vec![(0, 132 * K)]);
        // A 4 KiB gap between 4 KiB runs: too many zeros for the data.
        assert_eq!(plan(&[(0, 4 * K), (8 * K, 12 * K)]).len(), 2);
        // Merging would not save a request: the gap stays unsent.
        assert_eq!(
            plan(&[(0, 1 << 20), ((1 << 20) + 4 * K, (5 << 20) + 4 * K)]),
            vec![(0, 1 << 20), ((1 << 20) + 4 * K, (5 << 20) + 4 * K)]
        );
        // A gap over 64 KiB is never merged.
        assert_eq!(
            plan(&[(0, 3 << 20), ((3 << 20) + 68 * K, 4 << 20)]).len(),
            2
        );
        // A long run is cut at 4 MiB.
        assert_eq!(
            plan(&[(0, 9 << 20)]),
            vec![(0, 4 << 20), (4 << 20, 8 << 20), (8 << 20, 9 << 20)]
        );
        // No request exceeds 4 MiB, and every data byte is in one.
        let runs: Vec<(u64, u64)> = (0..200u64)
            .map(|i| (i * 100 * K, i * 100 * K + 96 * K))
            .collect();
        assert_requests_fit(&plan(&runs), &runs);
    }

    /// What a request plan for `runs` (data ranges, in order) must be:
    /// requests of at most 4 MiB, in order and apart, every data byte in
    /// one, zeros sent at most 1/GAP_RATIO of the data, and far fewer
    /// requests than runs (these runs are close together).
    pub(crate) fn assert_requests_fit(reqs: &[(u64, u64)], runs: &[(u64, u64)]) {
        assert!(reqs.iter().all(|r| r.1 - r.0 <= MAX_REQUEST), "{reqs:?}");
        for &(s, e) in runs {
            assert!(reqs.iter().any(|r| r.0 <= s && r.1 >= e), "{s}..{e}");
        }
        assert!(
            reqs.windows(2).all(|w| w[0].1 <= w[1].0),
            "overlap: {reqs:?}"
        );
        let sent: u64 = reqs.iter().map(|r| r.1 - r.0).sum();
        let data: u64 = runs.iter().map(|r| r.1 - r.0).sum();
        assert!(
            sent * GAP_RATIO <= data * (GAP_RATIO + 1),
            "{sent} for {data}"
        );
        assert!(reqs.len() < runs.len() / 4, "{}", reqs.len());
    }
}
