//! Uploads to Azure page blobs, against a real Azure Storage emulator
//! (Azurite) that each test starts on a free loopback port, in memory, and
//! stops at its end. Azurite is found in `target/azurite` (where `.ci/run`
//! installs it with npm), through `VHDKIT_AZURITE`, or on the PATH; a test
//! that cannot start it fails saying why.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhdkit::azure::{BlobSource, BlobUrl, UploadOptions};
use vhdkit::{ConvertOptions, Image, Target};

/// The emulator's documented development account and key.
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("VHDKIT_AZURITE") {
        return p.into();
    }
    let prefix = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/azurite");
    let local = prefix.join("node_modules/.bin/azurite-blob");
    if local.exists() {
        return local;
    }
    let on_path = Command::new("azurite-blob")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return "azurite-blob".into();
    }
    // A fresh clone: install it where .ci/run does, once for all the tests
    // (npm is on the machines this project runs on; without it the start
    // below fails saying what to do).
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if !local.exists() {
        eprintln!(
            "azurite is not installed: npm install --prefix {} azurite",
            prefix.display()
        );
        let _ = std::fs::create_dir_all(&prefix);
        let _ = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                "--prefix",
            ])
            .arg(&prefix)
            .arg("azurite")
            .stdout(Stdio::null())
            .status();
    }
    local
}

/// One Azurite blob service, stopped when dropped.
pub struct Azurite {
    child: Child,
    pub port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a loopback port")
        .local_addr()
        .unwrap()
        .port()
}

impl Azurite {
    pub fn start() -> Azurite {
        let bin = azurite_binary();
        for _ in 0..3 {
            let port = free_port();
            let child = Command::new(&bin)
                .args([
                    "--skipApiVersionCheck",
                    "--inMemoryPersistence",
                    "--disableTelemetry",
                    "--silent",
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    &port.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "AZURITE CANNOT BE STARTED: {} ({e}). These tests need the Azure Storage \
                         emulator: `npm install --prefix target/azurite azurite` (as .ci/run \
                         does), or name azurite-blob with VHDKIT_AZURITE",
                        bin.display()
                    )
                });
            let mut a = Azurite { child, port };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    // Listening; creating the container proves it is this
                    // emulator (another one on a reused port already has it).
                    let sas = account_sas("rwdlac", KEY);
                    match a.try_request("PUT", &format!("vhds?restype=container&{sas}"), &[]) {
                        Ok(201) => return a,
                        // Another emulator's port: this one is dropped
                        // (stopped) and another port tried.
                        Ok(409) => break,
                        // Not ready yet, or the port briefly someone else's.
                        Ok(_) | Err(_) => {}
                    }
                }
                if let Ok(Some(status)) = a.child.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = a.child.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    if err.contains("EADDRINUSE") {
                        break; // another port
                    }
                    panic!("AZURITE EXITED at start ({status}): {err}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!(
            "AZURITE DID NOT START listening within 30 s ({})",
            azurite_binary().display()
        );
    }

    /// A SAS for the container `vhds`, all permissions.
    pub fn sas(&self) -> String {
        container_sas("vhds", "racwdl", KEY)
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/{ACCOUNT}", self.port)
    }

    pub fn url(&self, blob: &str) -> String {
        format!("{}/vhds/{blob}?{}", self.base(), self.sas())
    }

    pub fn blob(&self, blob: &str) -> BlobUrl {
        BlobUrl::parse(&self.url(blob), false).unwrap()
    }

    /// A raw HTTP request to the emulator (container creation, blob setup).
    pub fn request(&self, method: &str, path_query: &str, headers: &[(&str, String)]) -> u16 {
        self.try_request(method, path_query, headers)
            .unwrap_or_else(|e| panic!("{method} {path_query}: {e}"))
    }

    /// [`Azurite::request`], with connection failures returned.
    fn try_request(
        &self,
        method: &str,
        path_query: &str,
        headers: &[(&str, String)],
    ) -> std::io::Result<u16> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        let mut req = format!(
            "{method} /{ACCOUNT}/{path_query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-version: \
             2021-08-06\r\nContent-Length: 0\r\nConnection: close\r\n",
            self.port
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        line.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))
    }

    /// Creates an empty page blob of `len` bytes.
    pub fn create_page_blob(&self, name: &str, len: u64) {
        let code = self.request(
            "PUT",
            &format!("vhds/{name}?{}", self.sas()),
            &[
                ("x-ms-blob-type", "PageBlob".into()),
                ("x-ms-blob-content-length", len.to_string()),
            ],
        );
        assert_eq!(code, 201, "creating page blob {name}");
    }

    /// Creates an empty block blob.
    pub fn create_block_blob(&self, name: &str) {
        let code = self.request(
            "PUT",
            &format!("vhds/{name}?{}", self.sas()),
            &[("x-ms-blob-type", "BlockBlob".into())],
        );
        assert_eq!(code, 201, "creating block blob {name}");
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An account SAS for the blob service: HMAC-SHA256 of the string-to-sign
/// (version 2020-12-06 and later) with the account key.
fn account_sas(perms: &str, key: &str) -> String {
    let (sv, ss, srt, se, spr) = (
        "2021-08-06",
        "b",
        "sco",
        "2099-01-01T00:00:00Z",
        "https,http",
    );
    let to_sign = format!("{ACCOUNT}\n{perms}\n{ss}\n{srt}\n\n{se}\n\n{spr}\n{sv}\n\n");
    let sig = sign(&to_sign, key);
    format!("sv={sv}&ss={ss}&srt={srt}&sp={perms}&se={se}&spr={spr}&sig={sig}")
}

/// A service SAS for one container (the emulator takes page blob resizes
/// only with a service SAS).
fn container_sas(container: &str, perms: &str, key: &str) -> String {
    let (sv, se, spr) = ("2021-08-06", "2099-01-01T00:00:00Z", "https,http");
    let to_sign =
        format!("{perms}\n\n{se}\n/blob/{ACCOUNT}/{container}\n\n\n{spr}\n{sv}\nc\n\n\n\n\n\n\n");
    let sig = sign(&to_sign, key);
    format!("sv={sv}&sr=c&sp={perms}&se={se}&spr={spr}&sig={sig}")
}

/// HMAC-SHA256 with the (base64) key, base64 and percent-encoded.
fn sign(to_sign: &str, key: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    sig.chars()
        .map(|c| match c {
            '+' => "%2B".to_string(),
            '/' => "%2F".to_string(),
            '=' => "%3D".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The signature of a SAS (to check it appears nowhere).
fn sig_of(sas: &str) -> String {
    sas.split('&')
        .find_map(|p| p.strip_prefix("sig="))
        .unwrap()
        .to_string()
}

// ------------------------------------------------------------ inputs

/// A raw disk of `len` bytes with data runs of 4 KiB to 300 KiB scattered
/// over it (deterministic), the rest zero.
fn scattered_raw(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut x = seed | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pos = (next() % 65536) as usize & !4095;
    while pos < len {
        let run = ((next() % 75 + 1) * 4096) as usize;
        let end = (pos + run).min(len);
        for (i, b) in v[pos..end].iter_mut().enumerate() {
            *b = ((i as u64).wrapping_mul(31) ^ seed) as u8 | 1;
        }
        pos = end + ((next() % 200) * 4096) as usize;
    }
    v
}

/// The virtual content of an image.
fn content(path: &Path) -> Vec<u8> {
    let img = Image::open(path).unwrap();
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

fn unpack(stored: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(stored);
    let name = stored.strip_suffix(".gz").unwrap_or(stored);
    let out = dir.join(name);
    let mut data = Vec::new();
    let f = std::fs::File::open(&src).unwrap();
    if stored.ends_with(".gz") {
        flate2::read::GzDecoder::new(f)
            .read_to_end(&mut data)
            .unwrap();
    } else {
        BufReader::new(f).read_to_end(&mut data).unwrap();
    }
    std::fs::write(&out, data).unwrap();
    out
}

/// Reads the whole blob back, and checks that it is a fixed VHD of `want`
/// (rounded up to a whole MiB) whose page ranges cover every data page
/// and only merged gaps and the footer besides.
fn check_blob(url: &BlobUrl, want: &[u8], what: &str) {
    let src = BlobSource::open(url).unwrap();
    let size = (want.len() as u64).div_ceil(1 << 20) << 20;
    assert_eq!(src.len(), size + 512, "{what}: blob length");
    assert!(src.is_page_blob(), "{what}: a page blob");
    let mut got = vec![0u8; src.len() as usize];
    src.read_exact_at(&mut got, 0).unwrap();
    let mut padded = want.to_vec();
    padded.resize(size as usize, 0);
    vhdkit_common::assert_same(what, &got[..size as usize], &padded);
    // The footer: a valid fixed VHD of that size.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("back.vhd");
    std::fs::write(&f, &got).unwrap();
    let img = Image::open(&f).unwrap();
    assert_eq!(img.disk_type(), vhdkit::Format::Fixed, "{what}");
    assert_eq!(img.virtual_size(), size, "{what}");
    // Page ranges against the data map.
    let ranges = src.data_ranges().unwrap().to_vec();
    assert_eq!(ranges.last().unwrap().1, size + 512, "{what}: footer page");
    for (i, page) in padded.chunks(4096).enumerate() {
        let at = i as u64 * 4096;
        // Up to the sector of its last non-zero byte (a disk may end inside a page).
        if let Some(last) = page.iter().rposition(|&b| b != 0) {
            let end = at + (last as u64 + 1).div_ceil(512) * 512;
            let inside = ranges.iter().any(|r| r.0 <= at && r.1 >= end);
            assert!(
                inside,
                "{what}: data page at {at} is not in the page ranges {ranges:?}"
            );
        }
    }
    let in_ranges: u64 = ranges.iter().map(|r| r.1 - r.0).sum();
    let data_pages = padded
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64;
    let data = data_pages * 4096;
    assert!(
        in_ranges <= data + data / 16 + 512,
        "{what}: {in_ranges} bytes in page ranges for {data} bytes of data pages"
    );
}

mod vhdkit_common {
    pub use crate::common::assert_same;
}

// ------------------------------------------------------------ the CLI

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vhdkit(args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vhdkit"));
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

// ------------------------------------------------------------ a faulty proxy

/// What the proxy does to the n-th request (counted from 1).
#[derive(Clone, Copy)]
struct Faults {
    /// Every n-th request is answered 503 (0: never).
    every_503: u64,
    /// Every n-th request has its connection dropped in the middle of its
    /// body (0: never).
    every_drop: u64,
    /// Each forwarded request waits this long first.
    delay: Duration,
}

/// A loopback HTTP proxy in front of the emulator that injects faults.
struct Proxy {
    port: u16,
    requests: Arc<AtomicU64>,
    faults_done: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16, faults: Faults) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let faults_done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, fd, st) = (requests.clone(), faults_done.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let (r, fd) = (r.clone(), fd.clone());
                        std::thread::spawn(move || {
                            let _ = serve(c, upstream, faults, &r, &fd);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Proxy {
            port,
            requests,
            faults_done,
            stop,
        }
    }

    fn url(&self, az: &Azurite, blob: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{ACCOUNT}/vhds/{blob}?{}",
            self.port,
            az.sas()
        )
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Serves one client connection: one request at a time, each forwarded on
/// a connection of its own (closed after the answer), or faulted.
fn serve(
    c: TcpStream,
    upstream: u16,
    f: Faults,
    requests: &AtomicU64,
    faults_done: &AtomicU64,
) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    loop {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let end = line == "\r\n";
            head.push(line);
            if end {
                break;
            }
        }
        let len: usize = head
            .iter()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
        if f.every_drop > 0 && n.is_multiple_of(f.every_drop) && len > 1024 {
            // Half of the body, then the connection goes.
            let mut part = vec![0u8; len / 2];
            r.read_exact(&mut part)?;
            faults_done.fetch_add(1, Ordering::SeqCst);
            let _ = w.shutdown(Shutdown::Both);
            return Ok(());
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        if f.every_503 > 0 && n.is_multiple_of(f.every_503) {
            faults_done.fetch_add(1, Ordering::SeqCst);
            w.write_all(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nx-ms-error-code: \
                  ServerBusy\r\n\r\n",
            )?;
            continue;
        }
        std::thread::sleep(f.delay);
        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        for l in &head {
            let name = l
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if name == "connection" || name == "keep-alive" {
                continue;
            }
            if l == "\r\n" {
                up.write_all(b"Connection: close\r\n")?;
            }
            up.write_all(l.as_bytes())?;
        }
        up.write_all(&body)?;
        let mut answer = Vec::new();
        up.read_to_end(&mut answer)?;
        w.write_all(&answer)?;
        // The answer says the connection closes: the client opens another.
        let _ = w.shutdown(Shutdown::Both);
        return Ok(());
    }
}

/// Every form of disk, for the round trips: a raw disk of `raw_size` bytes
/// with scattered data (made here, from `seed`), fixed and dynamic VHDs
/// from testdata, and a three-level differencing chain unpacked into
/// `chaindir` (its grandchild is returned).
fn testdata_forms(dir: &Path, chaindir: &Path, raw_size: usize, seed: u64) -> [PathBuf; 4] {
    let raw = dir.join("disk.raw");
    std::fs::write(&raw, scattered_raw(raw_size, seed)).unwrap();
    let fixed = unpack("qemu-fixed-3M.vhd.gz", dir);
    let dynamic = unpack("qemu-dynamic-5M.vhd.gz", dir);
    for f in ["hand-chain-base.vhd.gz", "hand-chain-child.vhd.gz"] {
        unpack(f, chaindir);
    }
    let chain = unpack("hand-chain-grandchild.vhd.gz", chaindir);
    [raw, fixed, dynamic, chain]
}

// ------------------------------------------------------------ tests

#[test]
fn every_testdata_form_uploads_and_reads_back_equal() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let chaindir = tempfile::tempdir().unwrap();
    let [raw, fixed, dynamic, chain] = testdata_forms(dir.path(), chaindir.path(), 7 << 20, 7);
    assert_eq!(
        Image::open(&chain).unwrap().chain().len(),
        3,
        "the chain opens with its parents"
    );
    // And a dynamic VHD of the scattered raw disk, of an odd size.
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, scattered_raw((3 << 20) + 4096 * 3, 11)).unwrap();
    let odd_dyn = dir.path().join("odd.vhd");
    vhdkit::convert(&odd, &odd_dyn, &ConvertOptions::new(Target::Dynamic)).unwrap();
    for (name, path) in [
        ("raw", &raw),
        ("fixed", &fixed),
        ("dynamic", &dynamic),
        ("chain", &chain),
        ("odd-dynamic", &odd_dyn),
    ] {
        let url = az.blob(&format!("{name}.vhd"));
        let want = content(path);
        let r = vhdkit::azure::upload(path, &url, &UploadOptions::new()).unwrap();
        let data: u64 = want
            .chunks(4096)
            .filter(|p| p.iter().any(|&b| b != 0))
            .map(|p| p.len() as u64)
            .sum();
        assert!(
            r.bytes_sent >= data && r.bytes_sent <= data + data / 16 + 512,
            "{name}: sent {} for {data} bytes of data pages",
            r.bytes_sent
        );
        assert_eq!(r.blob_size, r.virtual_size + 512, "{name}");
        assert!(r.requests > 0 && r.page_ranges > 0, "{name}: {r:?}");
        check_blob(&url, &want, name);
    }
}

/// A VHDX (made by qemu-img from a scattered raw disk) uploads as the
/// fixed VHD of the same disk, through the same reading path.
#[test]
fn a_vhdx_uploads_as_the_disk_it_holds() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let want = scattered_raw(5 << 20, 13);
    std::fs::write(&raw, &want).unwrap();
    let vhdx = dir.path().join("disk.vhdx");
    let out = std::process::Command::new(crate::common::qemu_img())
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=1M",
        ])
        .arg(&raw)
        .arg(&vhdx)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        Image::open(&vhdx).unwrap().disk_type(),
        vhdkit::Format::Vhdx
    );
    assert_eq!(content(&vhdx), want);
    let url = az.blob("from-vhdx.vhd");
    let r = vhdkit::azure::upload(&vhdx, &url, &UploadOptions::new()).unwrap();
    assert_eq!(r.blob_size, r.virtual_size + 512);
    check_blob(&url, &want, "vhdx");
}

#[test]
fn a_sparse_large_disk_sends_only_its_data() {
    // A 64 GiB dynamic disk with three data blocks: a few requests.
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let vhd = dir.path().join("big.vhd");
    {
        // A sparse raw file; the last run crosses 32 GiB, where the page
        // ranges are listed in two segments.
        use std::os::unix::fs::FileExt;
        let raw = dir.path().join("seed.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(64 << 30).unwrap();
        f.write_all_at(&[1u8; 4096], 0).unwrap();
        f.write_all_at(&[2u8; 8192], 3 << 20).unwrap();
        f.write_all_at(&[3u8; 512], (6 << 20) - 512).unwrap();
        f.write_all_at(&[4u8; 8192], (32 << 30) - 4096).unwrap();
        drop(f);
        vhdkit::convert(&raw, &vhd, &ConvertOptions::new(Target::Dynamic)).unwrap();
    }
    let url = az.blob("big.vhd");
    let started = Instant::now();
    let r = vhdkit::azure::upload(&vhd, &url, &UploadOptions::new()).unwrap();
    assert_eq!(r.virtual_size, 64 << 30);
    assert_eq!(r.bytes_sent, 4096 + 8192 + 4096 + 8192 + 512, "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "{r:?}");
    let src = BlobSource::open(&url).unwrap();
    let ranges = src.data_ranges().unwrap();
    assert_eq!(
        ranges,
        &[
            (0, 4096),
            (3 << 20, (3 << 20) + 8192),
            ((6 << 20) - 4096, 6 << 20),
            ((32 << 30) - 4096, (32 << 30) + 4096),
            (64 << 30, (64 << 30) + 512)
        ]
    );
    let mut b = vec![0u8; 8192];
    src.read_exact_at(&mut b, 3 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 2));
}

#[test]
fn existing_blobs_are_refused_resized_or_written_into_by_the_rules() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.raw");
    std::fs::write(&big, scattered_raw(5 << 20, 3)).unwrap();
    let small = dir.path().join("small.raw");
    std::fs::write(&small, scattered_raw(2 << 20, 5)).unwrap();
    let big_s = big.to_str().unwrap();
    let small_s = small.to_str().unwrap();
    let sig = sig_of(&az.sas());

    // A new blob, then the same again: refused, exit 2, the hint, no sig.
    let url = az.url("a.vhd");
    let r = vhdkit(&["convert", big_s, &url, "-q"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = vhdkit(&["convert", small_s, &url], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("exists") && r.stderr.contains("--force"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains(&sig) && r.stderr.contains("sig=REDACTED"),
        "{}",
        r.stderr
    );
    check_blob(
        &az.blob("a.vhd"),
        &std::fs::read(&big).unwrap(),
        "left as it was",
    );

    // --force: resized down, stale pages cleared, equal to the new image.
    let r = vhdkit(&["convert", small_s, &url, "--force", "--json"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r.stdout);
    assert!(j["ranges_cleared"].as_u64().unwrap() > 0, "{j}");
    assert!(!r.stdout.contains(&sig), "{}", r.stdout);
    check_blob(&az.blob("a.vhd"), &std::fs::read(&small).unwrap(), "forced");

    // An empty page blob of exactly the size needed is written into.
    let need = vhdkit::azure::blob_size(5 << 20, false);
    let info = vhdkit(&["info", "--azure", "--json", big_s], None);
    assert_eq!(json(&info.stdout)["azure_upload_size"].as_u64(), Some(need));
    let info = vhdkit(&["info", "--azure", big_s], None);
    assert!(
        info.stdout.contains(&format!("{need} bytes")),
        "{}",
        info.stdout
    );
    az.create_page_blob("disk.vhd", need);
    let r = vhdkit(&["convert", big_s, &az.url("disk.vhd"), "-q"], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(
        &az.blob("disk.vhd"),
        &std::fs::read(&big).unwrap(),
        "into an empty blob",
    );

    // An empty page blob of another size: refused, naming the size needed.
    az.create_page_blob("wrong.vhd", need + (1 << 20));
    let r = vhdkit(&["convert", big_s, &az.url("wrong.vhd")], None);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains(&need.to_string()), "{}", r.stderr);
    // A block blob: refused; with --force replaced by a page blob.
    az.create_block_blob("block.vhd");
    let r = vhdkit(&["convert", small_s, &az.url("block.vhd")], None);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a page blob"), "{}", r.stderr);
    let r = vhdkit(
        &["convert", small_s, &az.url("block.vhd"), "--force", "-q"],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(
        &az.blob("block.vhd"),
        &std::fs::read(&small).unwrap(),
        "block replaced",
    );

    // --to dynamic and --to raw are refused for a URL output.
    for to in ["dynamic", "raw"] {
        let r = vhdkit(&["convert", small_s, &az.url("x.vhd"), "--to", to], None);
        assert_eq!(r.code, 2);
        assert!(r.stderr.contains("fixed VHD"), "{}", r.stderr);
    }
    // --exact-size keeps the size (here 2 MiB + 4 KiB).
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, scattered_raw((2 << 20) + 4096, 9)).unwrap();
    let r = vhdkit(
        &[
            "convert",
            odd.to_str().unwrap(),
            &az.url("exact.vhd"),
            "--exact-size",
            "--json",
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        json(&r.stdout)["virtual_size"].as_u64(),
        Some((2 << 20) + 4096)
    );
}

#[test]
fn uploads_finish_correct_through_dropped_connections_and_503s() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(12 << 20, 13);
    std::fs::write(&raw, &data).unwrap();
    let proxy = Proxy::start(
        az.port,
        Faults {
            every_503: 4,
            every_drop: 7,
            delay: Duration::ZERO,
        },
    );
    let url = BlobUrl::parse(&proxy.url(&az, "faulty.vhd"), false).unwrap();
    let r = vhdkit::azure::upload(&raw, &url, &UploadOptions::new().parallel(4)).unwrap();
    assert!(r.retries > 0, "{r:?}");
    assert!(proxy.faults_done.load(Ordering::SeqCst) >= 2);
    check_blob(&az.blob("faulty.vhd"), &data, "through faults");
}

#[test]
fn an_interrupted_upload_resumes_sending_only_what_is_missing() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(24 << 20, 17);
    std::fs::write(&raw, &data).unwrap();
    let raw_s = raw.to_str().unwrap();
    // Slowed down by the proxy, killed once a dozen requests went through.
    let proxy = Proxy::start(
        az.port,
        Faults {
            every_503: 0,
            every_drop: 0,
            delay: Duration::from_millis(100),
        },
    );
    let url = proxy.url(&az, "resumed.vhd");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(["convert", raw_s, &url, "--parallel", "2", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.requests.load(Ordering::SeqCst) < 12 {
        assert!(Instant::now() < deadline, "the upload made no requests");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // Requests the proxy had already taken in still reach the emulator.
    std::thread::sleep(Duration::from_millis(600));
    // Interrupted: no footer, so not a valid VHD.
    let src = BlobSource::open(&az.blob("resumed.vhd")).unwrap();
    let mut tail = vec![0u8; 512];
    src.read_exact_at(&mut tail, src.len() - 512).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "a footer before the data");
    let before: u64 = src.data_ranges().unwrap().iter().map(|r| r.1 - r.0).sum();
    assert!(before > 0);
    // Without --resume, refused; with it, finished.
    let r = vhdkit(&["convert", raw_s, &az.url("resumed.vhd")], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--resume"), "{}", r.stderr);
    let r = vhdkit(
        &[
            "convert",
            raw_s,
            &az.url("resumed.vhd"),
            "--resume",
            "--json",
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r.stdout);
    let kept = j["bytes_kept"].as_u64().unwrap();
    assert!(kept > 0 && kept <= before, "{j}");
    let sent = j["bytes_sent"].as_u64().unwrap();
    let total_data = data
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
        * 4096;
    assert!(sent + kept <= total_data + total_data / 16 + 512, "{j}");
    assert!(sent < total_data, "{j}: everything sent again");
    check_blob(&az.blob("resumed.vhd"), &data, "resumed");
}

#[test]
fn the_sas_signature_appears_in_no_error() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, scattered_raw(1 << 20, 19)).unwrap();
    let raw_s = raw.to_str().unwrap();
    let good = az.sas();
    // A SAS signed with another key: 403.
    let other_key = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let bad = container_sas("vhds", "racwdl", &other_key);
    let read_only = container_sas("vhds", "rl", KEY);
    let nosuch = container_sas("nosuch", "racwdl", KEY);
    let mut cases: Vec<(String, String, &str)> = vec![
        (
            format!("{}/vhds/a.vhd?{bad}", az.base()),
            sig_of(&bad),
            "the SAS was refused",
        ),
        (
            format!("{}/vhds/a.vhd?{read_only}", az.base()),
            sig_of(&read_only),
            "the SAS was refused",
        ),
        (
            format!("{}/nosuch/a.vhd?{nosuch}", az.base()),
            sig_of(&nosuch),
            "container \"nosuch\" not found",
        ),
        (
            format!(
                "http://127.0.0.1:{}/{ACCOUNT}/vhds/a.vhd?{good}",
                free_port()
            ),
            sig_of(&good),
            "cannot reach 127.0.0.1",
        ),
        (
            format!("http://example.invalid/{ACCOUNT}/vhds/a.vhd?{good}"),
            sig_of(&good),
            "plain HTTP",
        ),
    ];
    // TLS to a server that does not speak it.
    let plain = TcpListener::bind("127.0.0.1:0").unwrap();
    let plain_port = plain.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in plain.incoming().take(20).flatten() {
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    cases.push((
        format!("https://127.0.0.1:{plain_port}/{ACCOUNT}/vhds/a.vhd?{good}"),
        sig_of(&good),
        "TLS",
    ));
    for (url, sig, says) in &cases {
        for extra in [&[][..], &["--json"][..], &["--resume"][..]] {
            let mut args = vec!["convert", raw_s, url.as_str()];
            args.extend_from_slice(extra);
            let r = vhdkit(&args, None);
            assert_eq!(r.code, 2, "{url}: {}", r.stderr);
            assert!(
                !r.stderr.contains(sig.as_str()) && !r.stdout.contains(sig.as_str()),
                "the signature leaked: {}{}",
                r.stdout,
                r.stderr
            );
            if extra.is_empty() {
                assert!(
                    r.stderr.contains(says),
                    "{url}: wanted {says:?} in {}",
                    r.stderr
                );
            }
        }
        // Through the library, Debug forms included.
        if *says == "plain HTTP" {
            match BlobUrl::parse(url, false) {
                Err(vhdkit::Error::Azure(a)) => {
                    assert_eq!(a.kind, vhdkit::azure::AzureErrorKind::PlainHttp, "{a:?}")
                }
                other => panic!("{other:?}"),
            }
        }
        if let Ok(u) = BlobUrl::parse(url, false) {
            assert!(!format!("{u:?} {u}").contains(sig.as_str()));
            let e = vhdkit::azure::upload(&raw, &u, &UploadOptions::new()).unwrap_err();
            assert!(!format!("{e} {e:?}").contains(sig.as_str()), "{e:?}");
        }
    }
    // A server that takes the request and never answers: a timeout, said so
    // (with a short limit and one retry, to keep the test fast).
    let hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_port = hole.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in hole.incoming().take(4).flatten() {
            held.push(c); // kept open, never answered
        }
        std::thread::sleep(Duration::from_secs(20));
    });
    let u = BlobUrl::parse(
        &format!("http://127.0.0.1:{hole_port}/{ACCOUNT}/vhds/a.vhd?{good}"),
        false,
    )
    .unwrap();
    let started = Instant::now();
    let e = vhdkit::azure::upload(
        &raw,
        &u,
        &UploadOptions::new()
            .request_timeout(Duration::from_millis(500))
            .max_retries(1),
    )
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    match &e {
        vhdkit::Error::Azure(a) => {
            assert_eq!(a.kind, vhdkit::azure::AzureErrorKind::Timeout, "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(!format!("{e} {e:?}").contains(&sig_of(&good)));
    // A blob URL as an input (not read yet): refused, the signature redacted.
    let url = az.url("a.vhd");
    for args in [
        vec!["info", url.as_str()],
        vec!["check", url.as_str()],
        vec!["map", url.as_str()],
        vec!["checksum", url.as_str()],
        vec!["compare", raw_s, url.as_str()],
        vec!["convert", url.as_str(), "out.raw", "--to", "raw"],
    ] {
        let r = vhdkit(&args, None);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("sig=REDACTED"), "{args:?}: {}", r.stderr);
        assert!(!r.stderr.contains(&sig_of(&good)), "{args:?}: {}", r.stderr);
    }
    // A URL quoted back by the argument parser.
    let r = vhdkit(&["convert", raw_s, url.as_str(), url.as_str()], None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("sig=REDACTED"), "{}", r.stderr);
    assert!(!r.stderr.contains(&sig_of(&good)), "{}", r.stderr);
    // The input is untouched.
    assert_eq!(std::fs::read(&raw).unwrap(), scattered_raw(1 << 20, 19));
}

#[test]
fn a_pipe_input_skips_zeros_and_learns_its_size() {
    let az = Azurite::start();
    let data = scattered_raw((9 << 20) + 512 * 3, 23);
    let r = vhdkit(
        &["convert", "-", &az.url("piped.vhd"), "--json"],
        Some(&data),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r.stdout);
    let pages = data
        .chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .count() as u64
        * 4096;
    let sent = j["bytes_sent"].as_u64().unwrap();
    assert!(sent <= pages + pages / 16 + 512 && sent >= pages / 2, "{j}");
    assert_eq!(j["rounded_from"].as_u64(), Some(data.len() as u64), "{j}");
    check_blob(&az.blob("piped.vhd"), &data, "piped raw");
    // A fixed VHD through a pipe: its footer is recognised, not data.
    let dir = tempfile::tempdir().unwrap();
    let fixed = unpack("qemu-fixed-3M.vhd.gz", dir.path());
    let want = content(&fixed);
    let bytes = std::fs::read(&fixed).unwrap();
    let r = vhdkit(
        &["convert", "-", &az.url("piped-fixed.vhd"), "-q"],
        Some(&bytes),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(&az.blob("piped-fixed.vhd"), &want, "piped fixed");
    // With --size, into an empty blob of that size.
    let need = vhdkit::azure::blob_size(data.len() as u64, false);
    az.create_page_blob("sized.vhd", need);
    let r = vhdkit(&["convert", "-", &az.url("sized.vhd"), "-q"], Some(&data));
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(&az.blob("sized.vhd"), &data, "piped into an empty blob");
    // --size given for a new blob.
    let size = data.len().to_string();
    let r = vhdkit(
        &["convert", "-", &az.url("given.vhd"), "--size", &size, "-q"],
        Some(&data),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(&az.blob("given.vhd"), &data, "piped with --size");
    // A stream longer than --size: refused.
    let r = vhdkit(
        &["convert", "-", &az.url("short.vhd"), "--size", "1M"],
        Some(&data),
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("longer than"), "{}", r.stderr);
    // Resumed from a pipe: the blob's size is the upload's; what is there is kept.
    let r = vhdkit(
        &["convert", "-", &az.url("piped.vhd"), "--resume", "--json"],
        Some(&data),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r.stdout);
    assert!(j["bytes_kept"].as_u64().unwrap() >= pages / 2, "{j}");
    assert_eq!(
        j["bytes_sent"].as_u64(),
        Some(512),
        "{j}: only the footer is sent"
    );
    check_blob(&az.blob("piped.vhd"), &data, "piped and resumed");
}

#[test]
fn a_terminated_upload_stops_cleanly_and_says_how_to_resume() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(16 << 20, 29);
    std::fs::write(&raw, &data).unwrap();
    let proxy = Proxy::start(
        az.port,
        Faults {
            every_503: 0,
            every_drop: 0,
            delay: Duration::from_millis(100),
        },
    );
    let url = proxy.url(&az, "stopped.vhd");
    let sig = sig_of(&az.sas());
    let child = Command::new(env!("CARGO_BIN_EXE_vhdkit"))
        .args(["convert", raw.to_str().unwrap(), &url, "--parallel", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.requests.load(Ordering::SeqCst) < 6 {
        assert!(Instant::now() < deadline, "the upload made no requests");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("interrupted") && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(!stderr.contains(&sig), "{stderr}");
    // No footer: not a valid VHD; --resume then finishes it.
    std::thread::sleep(Duration::from_millis(300));
    let src = BlobSource::open(&az.blob("stopped.vhd")).unwrap();
    let mut tail = vec![0u8; 512];
    src.read_exact_at(&mut tail, src.len() - 512).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
    let r = vhdkit(
        &[
            "convert",
            raw.to_str().unwrap(),
            &az.url("stopped.vhd"),
            "--resume",
            "-q",
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_blob(&az.blob("stopped.vhd"), &data, "resumed after SIGTERM");
}

#[test]
fn blob_sources_read_by_ranges_and_name_what_is_missing() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(6 << 20, 31);
    std::fs::write(&raw, &data).unwrap();
    vhdkit::azure::upload(&raw, &az.blob("src.vhd"), &UploadOptions::new()).unwrap();
    let src = BlobSource::open(&az.blob("src.vhd")).unwrap();
    assert!(src.is_page_blob() && src.len() == (6 << 20) + 512);
    // Reads at odd offsets and lengths, across ranges and holes.
    for (off, len) in [
        (0u64, 1usize),
        (4095, 3),
        (1 << 20, 5 << 20),
        (123_457, 777_777),
    ] {
        let mut b = vec![0xAAu8; len];
        src.read_exact_at(&mut b, off).unwrap();
        vhdkit_common::assert_same(
            &format!("{len} bytes at {off}"),
            &b,
            &data[off as usize..off as usize + len],
        );
    }
    // Through the crate's positional-read trait too.
    let as_trait: &dyn vhdkit::ReadAt = &src;
    assert_eq!(as_trait.len().unwrap(), (6 << 20) + 512);
    let mut b = vec![0u8; 8192];
    as_trait.read_exact_at(&mut b, 4 << 20).unwrap();
    vhdkit_common::assert_same("trait read", &b, &data[4 << 20..(4 << 20) + 8192]);
    // Past the end: an error, not a short read.
    let mut b = vec![0u8; 1024];
    let e = src.read_exact_at(&mut b, src.len() - 512).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
    let requests = src.requests();
    assert!(requests > 0);
    // As an image's storage: the page ranges, clipped to what is asked;
    // nothing in a hole.
    {
        use vhdkit::storage::Storage;
        let all = src.data_ranges().unwrap().to_vec();
        assert!(all.len() >= 3, "{all:?}");
        let (s0, e0) = all[0];
        let s1 = all[1].0;
        assert!(e0 < s1, "merged ranges leave a hole: {all:?}");
        let mid = (s0 + e0) / 2;
        assert_eq!(
            Storage::data_ranges(&src, mid, s1 + 1).unwrap(),
            vec![mid..e0, s1..s1 + 1]
        );
        assert!(Storage::data_ranges(&src, e0, s1).unwrap().is_empty());
        let whole = Storage::data_ranges(&src, 0, u64::MAX).unwrap();
        assert_eq!(whole.len(), all.len());
        assert_eq!(whole.last().unwrap().end, src.len());
    }
    // A block blob is one range, read by ranged GETs too.
    az.create_block_blob("block.bin");
    let b = BlobSource::open(&az.blob("block.bin")).unwrap();
    assert!(!b.is_page_blob() && b.is_empty());
    assert!(b.data_ranges().unwrap().is_empty());
    // A missing blob is named.
    let e = BlobSource::open(&az.blob("nosuch.vhd")).unwrap_err();
    assert!(e.to_string().contains("\"nosuch.vhd\" not found"), "{e}");
    assert!(!e.to_string().contains(&sig_of(&az.sas())));
}

// ------------------------------------------------------------ downloads

/// Puts `data` as a block blob with one plain PUT.
fn put_block_blob(az: &Azurite, name: &str, data: &[u8]) {
    let mut s = TcpStream::connect(("127.0.0.1", az.port)).unwrap();
    let req = format!(
        "PUT /{ACCOUNT}/vhds/{name}?{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nx-ms-version: \
         2021-08-06\r\nx-ms-blob-type: BlockBlob\r\nContent-Length: {}\r\nConnection: \
         close\r\n\r\n",
        az.sas(),
        az.port,
        data.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(data).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    assert!(line.contains(" 201 "), "putting block blob {name}: {line}");
}

/// The data extents of a `map --json` document: (offset, length) of each
/// extent with data, merged where they touch.
fn data_extents(doc: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = Vec::new();
    for e in doc["extents"].as_array().unwrap() {
        if e["data"].as_bool().unwrap() {
            let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            match v.last_mut() {
                Some(last) if last.0 + last.1 == o => last.1 += l,
                _ => v.push((o, l)),
            }
        }
    }
    v
}

/// Bytes in the 4 KiB pages of `data` that are not all zero.
fn data_page_bytes(data: &[u8]) -> u64 {
    data.chunks(4096)
        .filter(|p| p.iter().any(|&b| b != 0))
        .map(|p| p.len() as u64)
        .sum()
}

#[test]
fn every_testdata_form_downloads_back_to_every_target_equal() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let chaindir = tempfile::tempdir().unwrap();
    let [raw, fixed, dynamic, chain] = testdata_forms(dir.path(), chaindir.path(), 5 << 20, 41);
    let qemu = crate::common::qemu_img();
    for (name, path) in [
        ("raw", &raw),
        ("fixed", &fixed),
        ("dynamic", &dynamic),
        ("chain", &chain),
    ] {
        let url = az.url(&format!("{name}.vhd"));
        vhdkit::azure::upload(
            path,
            &az.blob(&format!("{name}.vhd")),
            &UploadOptions::new(),
        )
        .unwrap();
        let want = content(path);
        let in_ranges: u64 = BlobSource::open(&az.blob(&format!("{name}.vhd")))
            .unwrap()
            .data_ranges()
            .unwrap()
            .iter()
            .map(|r| r.1 - r.0)
            .sum();
        let want_raw = dir.path().join(format!(".{name}-want.raw"));
        std::fs::write(&want_raw, &want).unwrap();
        for to in ["raw", "fixed", "dynamic"] {
            let out = dir.path().join(format!("{name}-back.{to}"));
            let r = vhdkit(
                &["convert", &url, out.to_str().unwrap(), "--to", to, "--json"],
                None,
            );
            assert_eq!(r.code, 0, "{name} -> {to}: {}", r.stderr);
            let j = json(&r.stdout);
            assert!(
                !r.stdout.contains(&sig_of(&az.sas())),
                "{name} -> {to}: {}",
                r.stdout
            );
            assert!(j["input"].as_str().unwrap().contains("sig=REDACTED"));
            // Only the page ranges were fetched (the data pages, the gaps
            // the upload merged, the footer), and a few metadata reads.
            let data = data_page_bytes(&want);
            let fetched = j["bytes_fetched"].as_u64().unwrap();
            assert!(
                fetched >= data && fetched <= in_ranges + 32768,
                "{name} -> {to}: fetched {fetched} for {data} bytes of data pages, \
                 {in_ranges} in page ranges"
            );
            let mut got = content(&out);
            // The blob is rounded up to a whole MiB: the rest is zero.
            assert!(got.len() >= want.len(), "{name} -> {to}");
            assert!(got[want.len()..].iter().all(|&b| b == 0), "{name} -> {to}");
            got.truncate(want.len());
            vhdkit_common::assert_same(&format!("{name} -> {to}"), &got, &want);
            // The local copy equals the local input, by vhdkit and qemu-img.
            let c = vhdkit(
                &["compare", path.to_str().unwrap(), out.to_str().unwrap()],
                None,
            );
            assert_eq!(c.code, 0, "{name} -> {to}: {}{}", c.stdout, c.stderr);
            // qemu-img (which reads no differencing VHD) against the
            // content as a raw file: -f names A's format, -F B's.
            let fb = if to == "raw" { "raw" } else { "vpc" };
            let q = Command::new(&qemu)
                .args(["compare", "-f", "raw", "-F", fb])
                .args([want_raw.as_os_str(), out.as_os_str()])
                .output()
                .unwrap();
            assert!(
                q.status.success(),
                "qemu-img compare {name} -> {to}: {}",
                String::from_utf8_lossy(&q.stdout)
            );
        }
    }
    // No temp file was left beside the outputs.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !n.starts_with('.') || n.ends_with("-want.raw"),
            "left behind: {n}"
        );
    }
}

#[test]
fn urls_are_images_for_info_map_checksum_compare_and_check() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(6 << 20, 43);
    std::fs::write(&raw, &data).unwrap();
    let fixed = dir.path().join("disk.vhd");
    vhdkit::convert(
        &raw,
        &fixed,
        &ConvertOptions::new(Target::Fixed).azure(true),
    )
    .unwrap();
    vhdkit::azure::upload(&fixed, &az.blob("d.vhd"), &UploadOptions::new()).unwrap();
    let url = az.url("d.vhd");
    let sig = sig_of(&az.sas());
    let local = fixed.to_str().unwrap();

    // map --json: the same data ranges as the local map, path redacted.
    let m_url = vhdkit(&["map", "--json", &url], None);
    assert_eq!(m_url.code, 0, "{}", m_url.stderr);
    assert!(!m_url.stdout.contains(&sig), "{}", m_url.stdout);
    let m_loc = vhdkit(&["map", "--json", local], None);
    let (ju, jl) = (json(&m_url.stdout), json(&m_loc.stdout));
    assert!(ju["path"].as_str().unwrap().contains("sig=REDACTED"));
    assert_eq!(data_extents(&ju), data_extents(&jl));
    assert!(!data_extents(&ju).is_empty());

    // checksum: the same as the local one, fetching only allocated pages.
    let c_url = vhdkit(&["checksum", "--json", &url], None);
    assert_eq!(c_url.code, 0, "{}", c_url.stderr);
    let c_loc = vhdkit(&["checksum", "--json", local], None);
    assert_eq!(json(&c_url.stdout)["crc32"], json(&c_loc.stdout)["crc32"]);
    assert!(!c_url.stdout.contains(&sig));
    let vhdkit::azure::CountedImage {
        image: img,
        counter,
        ..
    } = vhdkit::azure::open_counted(&az.blob("d.vhd"), &Default::default()).unwrap();
    let crc = vhdkit::ops::checksum(&img).unwrap().crc32;
    assert_eq!(format!("{crc:08x}"), json(&c_loc.stdout)["crc32"]);
    let pages = data_page_bytes(&data);
    assert!(
        counter.bytes_fetched() <= pages + pages / 16 + 512 + 1024,
        "fetched {} for {pages} bytes of data pages",
        counter.bytes_fetched()
    );
    assert!(counter.bytes_fetched() >= pages);

    // The same count seen on the wire, through the proxy: a few requests
    // (properties, page ranges, the footer, the data), not one per page.
    let proxy = Proxy::start(
        az.port,
        Faults {
            every_503: 0,
            every_drop: 0,
            delay: Duration::ZERO,
        },
    );
    let r = vhdkit(&["checksum", &proxy.url(&az, "d.vhd")], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r
        .stdout
        .starts_with(json(&c_loc.stdout)["crc32"].as_str().unwrap()));
    let reqs = proxy.requests.load(Ordering::SeqCst);
    let ranges = BlobSource::open(&az.blob("d.vhd"))
        .unwrap()
        .data_ranges()
        .unwrap()
        .len() as u64;
    assert!(
        reqs <= ranges + 8,
        "{reqs} requests for {ranges} page ranges"
    );

    // compare: local against URL, either way, and URL against URL.
    for (a, b) in [
        (local, url.as_str()),
        (url.as_str(), local),
        (url.as_str(), url.as_str()),
    ] {
        let r = vhdkit(&["compare", "--json", a, b], None);
        assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
        assert!(json(&r.stdout)["equal"].as_bool().unwrap());
        assert!(!r.stdout.contains(&sig));
    }
    let other = dir.path().join("other.raw");
    let mut changed = data.clone();
    changed[(5 << 20) + 7] ^= 0x55;
    std::fs::write(&other, &changed).unwrap();
    let r = vhdkit(&["compare", other.to_str().unwrap(), &url], None);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(&format!("{}", (5 << 20) + 7)),
        "{}",
        r.stdout
    );

    // info and check.
    let r = vhdkit(&["info", "--json", &url], None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = json(&r.stdout);
    assert_eq!(j["format"], "fixed");
    assert_eq!(j["virtual_size"], 6 << 20);
    assert!(j["path"].as_str().unwrap().contains("sig=REDACTED"));
    assert!(!r.stdout.contains(&sig));
    let r = vhdkit(&["check", "--azure", "--json", &url], None);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(json(&r.stdout)["clean"].as_bool().unwrap());
    assert!(!r.stdout.contains(&sig));

    // Writing commands still refuse a URL, naming it redacted.
    let r = vhdkit(&["sparsify", &url], None);
    assert_eq!(r.code, 2);
    assert!(
        !r.stderr.contains(&sig) && r.stderr.contains("REDACTED"),
        "{}",
        r.stderr
    );
}

#[test]
fn a_dynamic_vhd_stored_as_a_block_blob_reads_by_ranges() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(9 << 20, 47);
    std::fs::write(&raw, &data).unwrap();
    let dynamic = dir.path().join("disk.vhd");
    vhdkit::convert(&raw, &dynamic, &ConvertOptions::new(Target::Dynamic)).unwrap();
    let bytes = std::fs::read(&dynamic).unwrap();
    put_block_blob(&az, "block.vhd", &bytes);
    let vhdkit::azure::CountedImage {
        image: img,
        counter,
        ..
    } = vhdkit::azure::open_counted(&az.blob("block.vhd"), &Default::default()).unwrap();
    assert_eq!(img.disk_type(), vhdkit::Format::Dynamic);
    let opened = counter.requests();
    // The metadata was read at open; a whole read fetches the blocks with
    // no request per sector and no metadata again.
    let mut got = vec![0u8; data.len()];
    img.read_exact_at(&mut got, 0).unwrap();
    vhdkit_common::assert_same("block blob", &got, &data);
    let blocks = img.allocated_blocks();
    let reads = counter.requests() - opened;
    assert!(
        reads <= 2 * blocks + 2,
        "{reads} requests to read {blocks} blocks"
    );
    // The fetched bytes: the allocated blocks, not the whole blob twice.
    assert!(counter.bytes_fetched() <= bytes.len() as u64 + 4096);
    // Converted from the URL by the CLI: equal.
    let out = dir.path().join("back.raw");
    let r = vhdkit(
        &[
            "convert",
            &az.url("block.vhd"),
            out.to_str().unwrap(),
            "--to",
            "raw",
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn downloads_finish_correct_through_dropped_connections_and_503s() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let data = scattered_raw(10 << 20, 53);
    std::fs::write(&raw, &data).unwrap();
    vhdkit::azure::upload(&raw, &az.blob("f.vhd"), &UploadOptions::new()).unwrap();
    let proxy = Proxy::start(
        az.port,
        Faults {
            every_503: 3,
            every_drop: 5,
            delay: Duration::ZERO,
        },
    );
    let out = dir.path().join("back.vhd");
    let r = vhdkit(
        &[
            "convert",
            &proxy.url(&az, "f.vhd"),
            out.to_str().unwrap(),
            "--to",
            "dynamic",
            "--json",
        ],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        json(&r.stdout)["retries"].as_u64().unwrap() > 0,
        "{}",
        r.stdout
    );
    assert!(proxy.faults_done.load(Ordering::SeqCst) >= 2);
    let got = content(&out);
    vhdkit_common::assert_same("through faults", &got[..data.len()], &data);
}

#[test]
fn download_errors_name_the_problem_leave_nothing_and_hide_the_signature() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, scattered_raw(2 << 20, 59)).unwrap();
    vhdkit::azure::upload(&raw, &az.blob("e.vhd"), &UploadOptions::new()).unwrap();
    let out = dir.path().join("out.raw");
    let out_s = out.to_str().unwrap();
    // A write-only SAS: 403, "r" named.
    let wsas = container_sas("vhds", "w", KEY);
    let wurl = format!("{}/vhds/e.vhd?{wsas}", az.base());
    // 404s: the blob, the container.
    let nourl = az.url("nosuch.vhd");
    // (An account SAS: the container SAS is for `vhds` only.)
    let asas = account_sas("rl", KEY);
    let nocont = format!("{}/nocontainer/e.vhd?{asas}", az.base());
    // Unreachable: a closed port.
    let closed = format!(
        "http://127.0.0.1:{}/{ACCOUNT}/vhds/e.vhd?{}",
        free_port(),
        az.sas()
    );
    for (what, url, sig, words) in [
        ("403", &wurl, sig_of(&wsas), "refused"),
        (
            "404 blob",
            &nourl,
            sig_of(&az.sas()),
            "\"nosuch.vhd\" not found",
        ),
        ("404 container", &nocont, sig_of(&asas), "not found"),
        ("unreachable", &closed, sig_of(&az.sas()), "cannot reach"),
    ] {
        for args in [
            vec!["convert", url.as_str(), out_s, "--to", "raw"],
            vec!["info", "--json", url.as_str()],
            vec!["checksum", url.as_str()],
            vec!["map", url.as_str()],
            vec!["compare", raw.to_str().unwrap(), url.as_str()],
        ] {
            let r = vhdkit(&args, None);
            assert_eq!(r.code, 2, "{what} {args:?}: {}{}", r.stdout, r.stderr);
            assert!(r.stderr.contains(words), "{what} {args:?}: {}", r.stderr);
            if what == "403" {
                assert!(r.stderr.contains("r to read"), "{}", r.stderr);
            }
            for s in [&r.stdout, &r.stderr] {
                assert!(!s.contains(&sig), "{what} {args:?}: {s}");
            }
            assert!(!out.exists(), "{what}: output left behind");
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "{what}: only the input remains");
        }
    }
    // Plain HTTP to a host that is not a loopback address: refused before
    // any request, unless --allow-http.
    let r = vhdkit(
        &[
            "info",
            "http://example.invalid/devstoreaccount1/vhds/e.vhd?sig=SECRET",
        ],
        None,
    );
    assert_eq!(r.code, 2);
    assert!(!r.stderr.contains("SECRET"), "{}", r.stderr);
    assert!(r.stderr.contains("--allow-http"), "{}", r.stderr);
}

/// What an upload reports as it goes.
#[derive(Default)]
struct Recorder {
    starts: std::sync::Mutex<Vec<u64>>,
    advanced: AtomicU64,
    written: AtomicU64,
    /// Set at the first advance, when given.
    cancel: Option<Arc<AtomicBool>>,
}

impl vhdkit::Progress for Recorder {
    fn start(&self, total: u64) {
        self.starts.lock().unwrap().push(total);
    }
    fn advance(&self, bytes: u64) {
        self.advanced.fetch_add(bytes, Ordering::SeqCst);
        if let Some(c) = &self.cancel {
            c.store(true, Ordering::SeqCst);
        }
    }
    fn written(&self, bytes: u64) {
        self.written.fetch_add(bytes, Ordering::SeqCst);
    }
}

/// An upload's progress starts once with the blob's virtual size, its
/// advances add up to it exactly (zeros, data and the rounding), and what
/// it reports written adds up to the bytes sent but the footer; a disk
/// ending inside a sector has its last sector padded.
#[test]
fn an_upload_reports_progress_that_adds_up() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("odd.raw");
    let mut want = scattered_raw((5 << 20) + 1000, 23);
    let n = want.len();
    want[n - 100..].fill(0xab);
    std::fs::write(&raw, &want).unwrap();
    let rec = Arc::new(Recorder::default());
    let url = az.blob("progress.vhd");
    let r = vhdkit::azure::upload(&raw, &url, &UploadOptions::new().progress(rec.clone())).unwrap();
    assert_eq!(r.virtual_size, 6 << 20, "{r:?}");
    assert_eq!(r.rounded_from, Some(n as u64), "{r:?}");
    assert_eq!(*rec.starts.lock().unwrap(), vec![6 << 20]);
    assert_eq!(rec.advanced.load(Ordering::SeqCst), r.virtual_size, "{r:?}");
    assert_eq!(
        rec.written.load(Ordering::SeqCst),
        r.bytes_sent - 512,
        "{r:?}"
    );
    // Sent (data, merged gaps, the last sector's padding) and skipped
    // cover the disk, the padding twice.
    let pad = (n as u64).div_ceil(512) * 512 - n as u64;
    assert!(pad > 0);
    assert_eq!(
        r.bytes_skipped + r.bytes_sent - 512,
        r.virtual_size + pad,
        "{r:?}"
    );
    check_blob(&url, &want, "odd raw");
}

/// A disk of data only goes out in requests of 4 MiB, although the walk
/// hands it over in smaller pieces and in no promised order; small zero
/// gaps are merged into them.
#[test]
fn a_dense_disk_goes_out_in_full_requests() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("dense.raw");
    let want: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&raw, &want).unwrap();
    let url = az.blob("dense.vhd");
    let r = vhdkit::azure::upload(&raw, &url, &UploadOptions::new()).unwrap();
    assert_eq!(r.bytes_sent, (16 << 20) + 512, "{r:?}");
    assert_eq!(r.bytes_skipped, 0, "{r:?}");
    // Four of data; besides them the blob's properties, its creation, the
    // footer and the page ranges listed at the end.
    assert_eq!(r.requests, 4 + 4, "{r:?}");
    assert_eq!(r.page_ranges, 1, "{r:?}");
    check_blob(&url, &want, "dense");

    // 60 KiB of data, 4 KiB of zeros, over and over: the gaps are merged
    // into requests (256 runs, a few requests), and each gap is sent as
    // zeros only where the disk is zero.
    let gappy = dir.path().join("gappy.raw");
    let mut want = want;
    for page in want.chunks_mut(4096).skip(15).step_by(16) {
        page.fill(0);
    }
    std::fs::write(&gappy, &want).unwrap();
    let url = az.blob("gappy.vhd");
    let r = vhdkit::azure::upload(&gappy, &url, &UploadOptions::new()).unwrap();
    assert!(r.requests < 32, "{r:?}");
    assert!(r.bytes_sent > 15 * (1 << 20), "{r:?}");
    check_blob(&url, &want, "gappy");
}

/// A cancel flag set as the upload starts stops it with the upload's
/// "interrupted" error (the CLI's hint names --resume), and the blob has
/// no footer.
#[test]
fn a_cancelled_upload_stops_interrupted_without_a_footer() {
    let az = Azurite::start();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, scattered_raw(16 << 20, 31)).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let rec = Arc::new(Recorder {
        cancel: Some(flag.clone()),
        ..Recorder::default()
    });
    let url = az.blob("cancelled.vhd");
    let opts = UploadOptions::new().cancel_flag(flag).progress(rec);
    match vhdkit::azure::upload(&raw, &url, &opts) {
        Err(vhdkit::Error::Azure(a)) => {
            assert_eq!(a.kind, vhdkit::azure::AzureErrorKind::Interrupted, "{a:?}")
        }
        other => panic!("not interrupted: {other:?}"),
    }
    let src = BlobSource::open(&url).unwrap();
    let mut tail = vec![0u8; 512];
    src.read_exact_at(&mut tail, src.len() - 512).unwrap();
    assert!(tail.iter().all(|&b| b == 0), "a footer after a cancel");
}
