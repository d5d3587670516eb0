//! A page blob as a destination of [`crate::walk::copy`]: the data runs
//! the walk hands over are gathered into Put Page requests of at most
//! 4 MiB, which run in parallel on the upload's runtime.
//!
//! The walk hands runs over in no promised order (chunks are read by
//! several workers, each going forward through its share of a window), so
//! requests are grown several at a time: a run joins the open request that
//! ends just before it (or, arriving first, the one that starts just after
//! it). A zero gap between two runs is sent only by the rule of the
//! upload's module docs (at most 64 KiB, saving a request, zeros within
//! 1/16 of the request's data), and only where the source is zero: the
//! sink is given a way to ask, since a gap between two runs handed over
//! may hold data still to come (sent as zeros, it could land after that
//! data, both requests being in flight at once). A request is sent once
//! it is full, when the open requests hold more than [`OPEN_BYTES`] (the
//! least recently grown first), or at the end. Memory: [`OPEN_BYTES`] and
//! one run, besides the requests in flight.

use super::upload::{Uploader, GAP_RATIO, MAX_GAP, MAX_REQUEST};
use crate::error::{Error, Result};
use crate::ondisk::SECTOR;
use crate::walk::Sink;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

/// Bytes held in requests being grown: 16 MiB. A request waiting for the
/// run just before it (the last of another worker's share) must outlive
/// the small requests made meanwhile; with 8 or 16 MiB the scattered test
/// disks make as many requests as when runs came in order (with four
/// requests open at most, 3 to 6 % more).
pub(crate) const OPEN_BYTES: u64 = 4 * MAX_REQUEST;

/// A request being grown: its bytes (data and merged zero gaps).
struct Open {
    buf: Vec<u8>,
    data: u64,
    zeros: u64,
    /// When it last grew (a count of runs added; unique).
    touched: u64,
}

/// True when merging `join` bytes of a run of `rest` into the request
/// before it saves a request: what is left of the run then needs fewer
/// requests of its own.
fn saves(rest: u64, join: u64) -> bool {
    rest.div_ceil(MAX_REQUEST) > (rest - join).div_ceil(MAX_REQUEST)
}

/// The open requests, by their start.
pub(crate) struct Requests {
    open: BTreeMap<u64, Open>,
    /// The open requests' starts by when they last grew.
    lru: BTreeMap<u64, u64>,
    /// Bytes held in `open`.
    bytes: u64,
    budget: u64,
    tick: u64,
    /// Zero bytes merged into requests (sent although zero).
    pub(crate) merged_zeros: u64,
}

/// Receives a finished request: its start and bytes.
type Emit<'a> = dyn FnMut(u64, Vec<u8>) -> Result<()> + 'a;

/// True when the source's bytes at a virtual offset, for a length, are
/// all zero.
pub(crate) type Zero<'a> = dyn Fn(u64, u64) -> Result<bool> + Sync + 'a;

/// Data handed over twice: not from the walk, and never sent twice.
fn overlap(at: u64) -> Error {
    Error::invalid_option(
        "offset",
        at,
        format!("data at virtual offset {at} overlaps data already handed over"),
    )
}

impl Requests {
    /// Requests grown while they hold at most `budget` bytes in all.
    pub(crate) fn new(budget: u64) -> Self {
        Requests {
            open: BTreeMap::new(),
            lru: BTreeMap::new(),
            bytes: 0,
            budget,
            tick: 0,
            merged_zeros: 0,
        }
    }

    fn take(&mut self, start: u64) -> Option<Open> {
        let o = self.open.remove(&start)?;
        self.lru.remove(&o.touched);
        self.bytes -= o.buf.len() as u64;
        Some(o)
    }

    fn put(&mut self, start: u64, o: Open) {
        self.lru.insert(o.touched, start);
        self.bytes += o.buf.len() as u64;
        self.open.insert(start, o);
    }

    /// Adds the data `d` at virtual offset `s` (a range no earlier call
    /// covered); `emit` receives the requests finished. A zero gap is
    /// merged only where `zero` finds the source's bytes zero: runs come in
    /// no promised order, so a gap between two runs handed over may hold
    /// data still to come. After an error the requests are left as they
    /// are (the upload fails).
    pub(crate) fn add(
        &mut self,
        mut s: u64,
        mut d: &[u8],
        zero: &Zero<'_>,
        emit: &mut Emit<'_>,
    ) -> Result<()> {
        while !d.is_empty() {
            self.tick += 1;
            let rest = d.len() as u64;
            let mut joined = None;
            let before = self.open.range(..=s).next_back().map(|(&k, _)| k);
            if let Some((k, mut o)) = before.and_then(|k| Some((k, self.take(k)?))) {
                let len = o.buf.len() as u64;
                let end = k + len;
                let room = MAX_REQUEST - len;
                let gap = s.saturating_sub(end);
                if end > s {
                    return Err(overlap(s));
                }
                let join = if gap == 0 {
                    // Contiguous: the request takes what fits.
                    rest.min(room)
                } else {
                    let join = rest.min(room.saturating_sub(gap));
                    let ok = gap <= MAX_GAP
                        && gap < room
                        && join > 0
                        && saves(rest, join)
                        && (o.zeros + gap) * GAP_RATIO <= o.data + join
                        && zero(end, gap)?;
                    if ok {
                        join
                    } else {
                        0
                    }
                };
                if join > 0 {
                    o.buf.resize((len + gap) as usize, 0);
                    o.buf.extend_from_slice(&d[..join as usize]);
                    o.data += join;
                    o.zeros += gap;
                    self.merged_zeros += gap;
                    joined = Some((k, o, join));
                } else {
                    self.put(k, o);
                }
            }
            let (start, mut o, took) = match joined {
                Some(j) => j,
                None => {
                    let take = rest.min(MAX_REQUEST);
                    if self.open.range(s..s + take).next().is_some() {
                        return Err(overlap(s));
                    }
                    let o = Open {
                        buf: d[..take as usize].to_vec(),
                        data: take,
                        zeros: 0,
                        touched: 0,
                    };
                    (s, o, take)
                }
            };
            o.touched = self.tick;
            s += took;
            d = &d[took as usize..];
            let o = self.join_next(start, o, zero)?;
            if o.buf.len() as u64 == MAX_REQUEST {
                emit(start, o.buf)?;
            } else {
                self.put(start, o);
            }
        }
        while self.bytes > self.budget {
            let Some((_, &k)) = self.lru.iter().next() else {
                break;
            };
            if let Some(o) = self.take(k) {
                emit(k, o.buf)?;
            }
        }
        Ok(())
    }

    /// Merges into `o`, the request at `start` (taken out), the open one
    /// after it, when the two fit in one request and the gap between them
    /// may be sent.
    fn join_next(&mut self, start: u64, mut o: Open, zero: &Zero<'_>) -> Result<Open> {
        let end = start + o.buf.len() as u64;
        let Some((&next, q)) = self.open.range(start + 1..).next() else {
            return Ok(o);
        };
        if next < end {
            return Err(overlap(next));
        }
        let gap = next - end;
        let fits = o.buf.len() as u64 + gap + q.buf.len() as u64 <= MAX_REQUEST;
        let cheap = gap == 0
            || (gap <= MAX_GAP && (o.zeros + q.zeros + gap) * GAP_RATIO <= o.data + q.data);
        if !(fits && cheap) || (gap > 0 && !zero(end, gap)?) {
            return Ok(o);
        }
        if let Some(q) = self.take(next) {
            o.buf.resize(o.buf.len() + gap as usize, 0);
            o.buf.extend_from_slice(&q.buf);
            o.data += q.data;
            o.zeros += q.zeros + gap;
            self.merged_zeros += gap;
        }
        Ok(o)
    }

    /// Hands over every open request, in order.
    pub(crate) fn finish(&mut self, emit: &mut Emit<'_>) -> Result<()> {
        self.lru.clear();
        self.bytes = 0;
        for (k, o) in std::mem::take(&mut self.open) {
            emit(k, o.buf)?;
        }
        Ok(())
    }
}

struct State {
    up: Uploader,
    requests: Requests,
}

/// The page blob an upload writes, as a [`Sink`]: data runs become Put
/// Page requests (zero pages are never handed over, so never sent).
pub(crate) struct PageBlobSink<'a> {
    state: Mutex<State>,
    /// Whether a zero gap between two runs is zero in the source.
    zero: &'a Zero<'a>,
}

/// Sends one finished request: its end rounded up to a sector (a raw
/// input's last partial sector is padded with zeros).
fn send(up: &mut Uploader, start: u64, mut buf: Vec<u8>) -> Result<()> {
    let end = (start + buf.len() as u64).div_ceil(SECTOR) * SECTOR;
    buf.resize((end - start) as usize, 0);
    // The walk advances the progress; the uploader counts what is sent.
    up.dispatch(start, buf, 0)
}

impl<'a> PageBlobSink<'a> {
    /// A sink sending through `up`; `zero` tells whether a range of the
    /// source is zero (a gap merged into a request must be).
    pub(crate) fn new(up: Uploader, zero: &'a Zero<'a>) -> Self {
        PageBlobSink {
            zero,
            state: Mutex::new(State {
                up,
                requests: Requests::new(OPEN_BYTES),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves at worst a request not
        // sent: the upload then fails anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the requests still open; returns the uploader (requests may
    /// still be in flight) and the zero bytes merged into requests.
    pub(crate) fn finish(self) -> (Uploader, Result<u64>) {
        let State {
            mut up,
            mut requests,
        } = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let r = requests.finish(&mut |start, buf| send(&mut up, start, buf));
        (up, r.map(|()| requests.merged_zeros))
    }
}

impl PageBlobSink<'_> {
    /// The uploader, the requests still open dropped (after a failed walk).
    pub(crate) fn into_uploader(self) -> Uploader {
        self.state
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .up
    }
}

impl Sink for PageBlobSink<'_> {
    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut g = self.state();
        let State { up, requests } = &mut *g;
        up.check()?;
        requests.add(offset, data, self.zero, &mut |start, buf| {
            send(up, start, buf)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gap is zero (the runs given are all the data).
    fn all_zero(_: u64, _: u64) -> Result<bool> {
        Ok(true)
    }

    /// The requests made of `runs` (start, end) handed over in the order
    /// given, with at most `budget` bytes in requests being grown.
    fn plan(runs: &[(u64, u64)], budget: u64) -> Vec<(u64, u64)> {
        let mut r = Requests::new(budget);
        let mut out = Vec::new();
        let mut emit = |s: u64, b: Vec<u8>| -> Result<()> {
            out.push((s, s + b.len() as u64));
            Ok(())
        };
        for &(s, e) in runs {
            r.add(s, &vec![1u8; (e - s) as usize], &all_zero, &mut emit)
                .unwrap();
        }
        r.finish(&mut emit).unwrap();
        out.sort_unstable();
        out
    }

    const K: u64 = 1024;
    const M: u64 = 1 << 20;

    #[test]
    fn contiguous_chunks_make_full_requests_in_any_order() {
        // 16 MiB of data in 2 MiB chunks: four 4 MiB requests, whether the
        // chunks come in order or interleaved from two workers.
        let chunks: Vec<(u64, u64)> = (0..8).map(|i| (i * 2 * M, (i + 1) * 2 * M)).collect();
        let want: Vec<(u64, u64)> = (0..4).map(|i| (i * 4 * M, (i + 1) * 4 * M)).collect();
        assert_eq!(plan(&chunks, OPEN_BYTES), want);
        let interleaved: Vec<(u64, u64)> = [0, 4, 1, 5, 2, 6, 3, 7]
            .iter()
            .map(|&i| chunks[i])
            .collect();
        assert_eq!(plan(&interleaved, OPEN_BYTES), want);
        // Backwards: each chunk joins the request after it.
        let backwards: Vec<(u64, u64)> = chunks.iter().rev().copied().collect();
        assert_eq!(plan(&backwards, OPEN_BYTES), want);
    }

    #[test]
    fn gaps_are_merged_by_the_stated_rule() {
        // A 4 KiB gap between 64 KiB runs: 4 / 128 < 1/16, merged, in
        // either order.
        let runs = [(0, 64 * K), (68 * K, 132 * K)];
        assert_eq!(plan(&runs, OPEN_BYTES), vec![(0, 132 * K)]);
        assert_eq!(plan(&[runs[1], runs[0]], OPEN_BYTES), vec![(0, 132 * K)]);
        // A 4 KiB gap between 4 KiB runs: too many zeros for the data.
        assert_eq!(plan(&[(0, 4 * K), (8 * K, 12 * K)], OPEN_BYTES).len(), 2);
        // A gap over 64 KiB is never merged.
        assert_eq!(
            plan(&[(0, 3 * M), (3 * M + 68 * K, 4 * M)], OPEN_BYTES).len(),
            2
        );
        // Merging would not save a request: the gap stays unsent.
        assert_eq!(
            plan(&[(0, M), (M + 4 * K, 5 * M + 4 * K)], OPEN_BYTES),
            vec![(0, M), (M + 4 * K, 5 * M + 4 * K)]
        );
    }

    /// The requests made of `source`'s runs handed over in the order given,
    /// gaps checked against `source`: no two overlap, and together they
    /// hold `source`.
    fn assemble(source: &[u8], runs: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let zero = |at: u64, len: u64| -> Result<bool> {
            let r = at as usize..(at + len) as usize;
            Ok(source[r].iter().all(|&b| b == 0))
        };
        let mut r = Requests::new(OPEN_BYTES);
        let mut got = vec![0u8; source.len()];
        let mut reqs = Vec::new();
        let mut emit = |s: u64, b: Vec<u8>| -> Result<()> {
            got[s as usize..s as usize + b.len()].copy_from_slice(&b);
            reqs.push((s, s + b.len() as u64));
            Ok(())
        };
        for &(s, e) in runs {
            r.add(s, &source[s as usize..e as usize], &zero, &mut emit)
                .unwrap();
        }
        r.finish(&mut emit).unwrap();
        reqs.sort_unstable();
        assert!(reqs.windows(2).all(|w| w[0].1 <= w[1].0), "{reqs:?}");
        assert!(got == source, "the requests do not hold the source");
        reqs
    }

    #[test]
    fn a_gap_whose_data_is_still_to_come_is_not_sent_as_zeros() {
        // Data everywhere in 0..132 KiB, handed over out of order: the gap
        // 64..68 KiB between the first two runs holds data that comes
        // last. It is not merged as zeros; once it comes, the three make
        // one request.
        let source: Vec<u8> = (0..132 * K).map(|i| (i % 251) as u8 | 1).collect();
        let runs = [(0, 64 * K), (68 * K, 132 * K), (64 * K, 68 * K)];
        assert_eq!(assemble(&source, &runs), vec![(0, 132 * K)]);
        // The same disk with that gap zero in the source: merged at once.
        let mut holed = source.clone();
        holed[64 * K as usize..68 * K as usize].fill(0);
        assert_eq!(
            assemble(&holed, &runs[..2]),
            vec![(0, 132 * K)],
            "a zero gap is merged"
        );
    }

    #[test]
    fn data_handed_over_twice_is_refused() {
        let mut r = Requests::new(OPEN_BYTES);
        let mut emit = |_: u64, _: Vec<u8>| -> Result<()> { Ok(()) };
        r.add(0, &[1u8; 8192], &all_zero, &mut emit).unwrap();
        assert!(r.add(4096, &[1u8; 4096], &all_zero, &mut emit).is_err());
        r.add(M, &[1u8; 4096], &all_zero, &mut emit).unwrap();
        assert!(r.add(M - 512, &[1u8; 1024], &all_zero, &mut emit).is_err());
    }

    #[test]
    fn no_request_exceeds_4_mib_and_every_byte_is_in_one() {
        // Scattered runs, handed over by two interleaved workers, with a
        // small budget: requests stay few, within 4 MiB, zeros within
        // 1/16 of the data.
        let runs: Vec<(u64, u64)> = (0..200u64)
            .map(|i| (i * 100 * K, i * 100 * K + 96 * K))
            .collect();
        let (a, b) = runs.split_at(100);
        let mixed: Vec<(u64, u64)> = a.iter().zip(b).flat_map(|(x, y)| [*x, *y]).collect();
        for order in [&runs, &mixed] {
            crate::azure::upload::tests::assert_requests_fit(&plan(order, M), &runs);
        }
    }

    #[test]
    fn too_many_open_bytes_send_the_least_recently_grown() {
        // Runs far apart, 4 KiB held at most: each is sent as soon as the
        // next arrives, and the bytes are those handed over.
        let mut r = Requests::new(4096);
        let out = std::cell::RefCell::new(Vec::new());
        let mut emit = |s: u64, b: Vec<u8>| -> Result<()> {
            out.borrow_mut().push((s, b));
            Ok(())
        };
        r.add(0, &[7u8; 4096], &all_zero, &mut emit).unwrap();
        assert!(out.borrow().is_empty());
        r.add(M, &[8u8; 4096], &all_zero, &mut emit).unwrap();
        assert_eq!(out.borrow().len(), 1);
        r.add(2 * M, &[9u8; 512], &all_zero, &mut emit).unwrap();
        r.finish(&mut emit).unwrap();
        let got: Vec<(u64, usize, u8)> = out
            .borrow()
            .iter()
            .map(|(s, b)| (*s, b.len(), b[0]))
            .collect();
        assert_eq!(got, vec![(0, 4096, 7), (M, 4096, 8), (2 * M, 512, 9)]);
    }
}
