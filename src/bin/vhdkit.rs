//! The vhdkit command line: argument parsing, progress and output. No format
//! logic lives here. Exit status: 0 success, 1 the operation ran and found a
//! problem (check failed, images differ), 2 bad usage or an image that
//! cannot be opened.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use vhdkit::{ConvertOptions, Format, Image, OpenOptions, Target};

#[derive(Parser)]
#[command(
    name = "vhdkit",
    version,
    about = "Read, check, map and convert VHD disk images"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone, Default)]
struct OpenArgs {
    /// A file that may be the parent of a differencing disk (repeatable)
    #[arg(long = "parent", value_name = "FILE")]
    parents: Vec<PathBuf>,
    /// A folder parents may be opened from, besides the child's own (repeatable)
    #[arg(long = "parent-dir", value_name = "DIR")]
    parent_dirs: Vec<PathBuf>,
    /// Read images whose footer or header checksum does not match
    #[arg(long)]
    ignore_checksums: bool,
}

impl OpenArgs {
    fn options(&self) -> OpenOptions {
        let mut o = OpenOptions::new().ignore_checksums(self.ignore_checksums);
        for p in &self.parents {
            o = o.parent(p);
        }
        for d in &self.parent_dirs {
            o = o.parent_dir(d);
        }
        o
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum To {
    Raw,
    Fixed,
    Dynamic,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe an image: type, sizes, geometry, creator, blocks, parents
    Info {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Report every structural problem (exit 1 when any is found)
    Check {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        /// Also check Azure's rules (fixed type, whole MiB, size range)
        #[arg(long)]
        azure: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Convert between raw, fixed and dynamic, writing sparse outputs
    Convert {
        input: PathBuf,
        /// The output (omit with --in-place)
        output: Option<PathBuf>,
        /// The output type
        #[arg(long, value_enum)]
        to: To,
        /// Block size of a dynamic output (power of two, 512K to 256M)
        #[arg(long, value_parser = parse_size, default_value = "2M")]
        block_size: u64,
        /// Worker threads (default: all cores)
        #[arg(long)]
        threads: Option<usize>,
        /// Write zeros out instead of leaving holes / unallocated blocks
        #[arg(long)]
        no_sparse: bool,
        /// Azure: a fixed VHD whose size is rounded up to a whole MiB
        #[arg(long)]
        azure: bool,
        /// Replace an existing output
        #[arg(long)]
        force: bool,
        /// Do not sync the output to disk before renaming it into place
        #[arg(long)]
        no_sync: bool,
        /// Convert raw <-> fixed in place, in constant time
        #[arg(long)]
        in_place: bool,
        /// No progress bar and no summary line
        #[arg(long, short)]
        quiet: bool,
        /// Print the summary as JSON
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// List the virtual disk as extents of data and zero
    Map {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        /// Do not scan data for zero pages: report the allocation only
        #[arg(long)]
        no_scan: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Compare the virtual contents of two images (exit 1 when they differ)
    Compare {
        a: PathBuf,
        b: PathBuf,
        /// Images of different sizes differ (otherwise the extra must be zero)
        #[arg(long)]
        strict_size: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// CRC-32 of the virtual content, the same for every form of one disk
    Checksum {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Make zero regions cost no disk space, in place
    Sparsify {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Grow an image (or, with --shrink, shrink it when the cut region is all zero), in place
    Resize {
        image: PathBuf,
        /// The new virtual size: bytes, or with K/M/G/T (binary)
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Round the size up to a whole MiB
        #[arg(long)]
        azure: bool,
        /// Allow a size smaller than the current one (the cut must be all zero)
        #[arg(long)]
        shrink: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
}

/// Parses `4096`, `512K`, `2M`, `1.5G`, `2T` (binary units, like qemu-img).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'P' => 1 << 50,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G, T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("{s:?} is too large"));
    }
    if !num.chars().all(|c| c.is_ascii_digit() || c == '.') || num.matches('.').count() > 1 {
        return Err(format!(
            "{s:?} is not a size (bytes, or a number with K, M, G or T)"
        ));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M, G or T)"))?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) || v.fract() != 0.0 {
        return Err(format!("{s:?} is not a whole number of bytes"));
    }
    Ok(v as u64)
}

/// `println!` that treats a closed pipe (`vhdkit map X | head`) as the end
/// of the reader's interest, exiting quietly, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("vhdkit: writing the output: {e}");
            std::process::exit(2);
        }
    }};
}

/// Exit statuses: the CLI's contract.
const OK: u8 = 0;
const PROBLEM: u8 = 1;
const CANNOT_RUN: u8 = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { CANNOT_RUN } else { OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vhdkit: {e}");
            ExitCode::from(CANNOT_RUN)
        }
    }
}

fn run(cli: Cli) -> vhdkit::Result<u8> {
    WRITES_OUTPUT.store(
        matches!(
            cli.cmd,
            Cmd::Convert { .. } | Cmd::Sparsify { .. } | Cmd::Resize { .. }
        ),
        std::sync::atomic::Ordering::SeqCst,
    );
    install_interrupt_handler();
    match cli.cmd {
        Cmd::Info { image, json, open } => info(&image, json, &open),
        Cmd::Check {
            image,
            json,
            azure,
            open,
        } => check(&image, json, azure, &open),
        Cmd::Convert {
            input,
            output,
            to,
            block_size,
            threads,
            no_sparse,
            azure,
            force,
            no_sync,
            in_place,
            quiet,
            json,
            open,
        } => {
            let target = match to {
                To::Raw => Target::Raw,
                To::Fixed => Target::Fixed,
                To::Dynamic => Target::Dynamic,
            };
            if in_place {
                if output.is_some() {
                    return Err(vhdkit::Error::InvalidArgument(
                        "--in-place takes one image, no output".into(),
                    ));
                }
                return in_place_convert(&input, target, azure, quiet, json, &open);
            }
            let Some(output) = output else {
                return Err(vhdkit::Error::InvalidArgument(
                    "convert needs an OUTPUT (or --in-place)".into(),
                ));
            };
            let bs = u32::try_from(block_size).map_err(|_| {
                vhdkit::Error::InvalidArgument(format!("block size {block_size} is too large"))
            })?;
            let mut opts = ConvertOptions::new(target)
                .block_size(bs)
                .sparse(!no_sparse)
                .azure(azure)
                .overwrite(force)
                .sync(!no_sync)
                .open_options(open.options());
            if let Some(t) = threads {
                opts = opts.threads(t);
            }
            convert(&input, &output, opts, quiet, json)
        }
        Cmd::Map {
            image,
            json,
            no_scan,
            open,
        } => map_cmd(&image, json, !no_scan, &open),
        Cmd::Compare {
            a,
            b,
            strict_size,
            json,
            open,
        } => compare_cmd(&a, &b, strict_size, json, &open),
        Cmd::Checksum { image, json, open } => checksum_cmd(&image, json, &open),
        Cmd::Sparsify { image, json, open } => sparsify_cmd(&image, json, &open),
        Cmd::Resize {
            image,
            size,
            azure,
            shrink,
            open,
        } => {
            let done =
                vhdkit::ops::resize(&image, size, azure, shrink, &open.options()).map_err(|e| {
                    match e {
                        vhdkit::Error::InvalidArgument(m)
                            if m.ends_with("shrinking was not asked for") =>
                        {
                            vhdkit::Error::InvalidArgument(format!(
                                "{m}: add --shrink to shrink it"
                            ))
                        }
                        e => e,
                    }
                })?;
            outln!("{}: {done}", image.display());
            Ok(OK)
        }
    }
}

fn map_cmd(path: &Path, as_json: bool, scan: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let img = Image::open_with(path, &open.options())?;
    let extents = vhdkit::ops::map(&img, scan)?;
    if as_json {
        let v: Vec<Value> = extents
            .iter()
            .map(|e| {
                let mut o = json!({"offset": e.offset, "length": e.length, "data": e.data});
                if let (Some(f), Some(fo)) = (&e.file, e.file_offset) {
                    o["file"] = json!(f.display().to_string());
                    o["file_offset"] = json!(fo);
                }
                o
            })
            .collect();
        outln!("{}", serde_json::to_string(&v).expect("json"));
        return Ok(OK);
    }
    outln!(
        "{:>16} {:>16}  {:<5} {:>16}  file",
        "offset",
        "length",
        "kind",
        "file offset"
    );
    for e in &extents {
        outln!(
            "{:>16} {:>16}  {:<5} {:>16}  {}",
            e.offset,
            e.length,
            if e.data { "data" } else { "zero" },
            e.file_offset.map(|o| o.to_string()).unwrap_or_default(),
            e.file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_default()
        );
    }
    let data: u64 = extents.iter().filter(|e| e.data).map(|e| e.length).sum();
    outln!(
        "{} extents, {} data, {} zero",
        extents.len(),
        human(data),
        human(img.virtual_size() - data)
    );
    Ok(OK)
}

fn compare_cmd(
    a: &Path,
    b: &Path,
    strict: bool,
    as_json: bool,
    open: &OpenArgs,
) -> vhdkit::Result<u8> {
    let ia = Image::open_with(a, &open.options())?;
    let ib = Image::open_with(b, &open.options())?;
    let c = vhdkit::ops::compare(&ia, &ib, strict)?;
    if as_json {
        let v = json!({"equal": c.equal(), "first_difference": c.first_difference, "size_a": c.size_a, "size_b": c.size_b});
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        match c.first_difference {
            None if c.size_a == c.size_b => outln!("Images are identical."),
            None => outln!(
                "Images are identical (sizes {} and {}; the extra is zero).",
                c.size_a,
                c.size_b
            ),
            Some(at) if strict && c.size_a != c.size_b && at == c.size_a.min(c.size_b) => {
                outln!("Image sizes differ: {} and {} bytes", c.size_a, c.size_b)
            }
            Some(at) => outln!("Content mismatch at offset {at}"),
        }
    }
    Ok(if c.equal() { OK } else { PROBLEM })
}

fn checksum_cmd(path: &Path, as_json: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let img = Image::open_with(path, &open.options())?;
    let (crc, size) = vhdkit::ops::checksum(&img)?;
    if as_json {
        outln!("{}", json!({"crc32": format!("{crc:08x}"), "size": size}));
    } else {
        outln!("{crc:08x} {size} {}", path.display());
    }
    Ok(OK)
}

fn sparsify_cmd(path: &Path, as_json: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let r = vhdkit::ops::sparsify(path, &open.options())?;
    if as_json {
        outln!(
            "{}",
            json!({"allocated_before": r.allocated_before, "allocated_after": r.allocated_after,
                   "zero_bytes": r.zero_bytes, "freed_blocks": r.freed_blocks})
        );
    } else {
        let what = match r.freed_blocks {
            Some(n) => format!("{n} all-zero blocks freed, the image rewritten compactly"),
            None => format!("{} of zero pages made holes", human(r.zero_bytes)),
        };
        outln!(
            "{}: {} on disk before, {} after ({what})",
            path.display(),
            human(r.allocated_before),
            human(r.allocated_after),
        );
    }
    Ok(OK)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

fn open_for_info(path: &Path, open: &OpenArgs) -> vhdkit::Result<Image> {
    match Image::open_with(path, &open.options()) {
        Err(vhdkit::Error::ParentNotFound { .. }) => {
            // Describe the child even when its parent is missing.
            Image::open_with(path, &open.options().missing_parent_as_zero(true))
        }
        other => other,
    }
}

fn info_json(img: &Image) -> Value {
    let mut v = json!({
        "path": img.path().display().to_string(),
        "format": img.disk_type().name(),
        "virtual_size": img.virtual_size(),
        "file_size": img.file_len(),
        "allocated_file_bytes": vhdkit::io::allocated_bytes(img.file()).ok(),
        "warnings": img.warnings(),
    });
    if let Some(f) = img.footer() {
        let g = f.geometry;
        v["original_size"] = json!(f.original_size);
        v["geometry"] = json!({
            "cylinders": g.cylinders, "heads": g.heads, "sectors_per_track": g.sectors,
            "size": g.size(),
        });
        v["creator"] = json!({
            "application": vhdkit::ondisk::fourcc(f.creator_app),
            "version": f.creator_version_string(),
            "host_os": vhdkit::ondisk::fourcc(f.creator_host_os),
        });
        v["timestamp"] = json!(f.timestamp.to_string());
        v["unique_id"] = json!(f.unique_id.to_string());
        v["saved_state"] = json!(f.saved_state != 0);
        v["features"] = json!(f.features);
        v["footer_source"] = json!(format!("{:?}", img.footer_source().unwrap()).to_lowercase());
    }
    if let Some(h) = img.header() {
        v["block_size"] = json!(img.block_size());
        v["bat_entries"] = json!(h.max_table_entries);
        v["allocated_blocks"] = json!(img.allocated_blocks());
        v["allocated_bytes"] = json!(img.allocated_blocks() * img.block_size());
    }
    if img.disk_type() == Format::Differencing {
        let h = img.header().unwrap();
        v["parent"] = json!({
            "unique_id": h.parent_unique_id.to_string(),
            "name": h.parent_name(),
            "timestamp": h.parent_timestamp.to_string(),
            "found": !img.parent_missing(),
        });
        v["chain"] = Value::Array(
            img.chain()
                .iter()
                .skip(1)
                .map(|p| {
                    json!({
                        "path": p.path().display().to_string(),
                        "format": p.disk_type().name(),
                        "virtual_size": p.virtual_size(),
                        "unique_id": p.footer().map(|f| f.unique_id.to_string()),
                    })
                })
                .collect(),
        );
    }
    v
}

fn info(path: &Path, as_json: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let img = open_for_info(path, open)?;
    let v = info_json(&img);
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(OK);
    }
    outln!("image:          {}", img.path().display());
    outln!("format:         {}", img.disk_type());
    outln!(
        "virtual size:   {} ({} bytes)",
        human(img.virtual_size()),
        img.virtual_size()
    );
    if let Some(f) = img.footer() {
        if f.original_size != f.current_size {
            outln!(
                "original size:  {} ({} bytes)",
                human(f.original_size),
                f.original_size
            );
        }
        let gs = f.geometry.size();
        if gs != f.current_size {
            outln!(
                "geometry:       {} (C/H/S), {} bytes: differs from the virtual size",
                f.geometry,
                gs
            );
        } else {
            outln!("geometry:       {} (C/H/S), {} bytes", f.geometry, gs);
        }
        outln!(
            "creator:        {:?} {} on {:?}",
            vhdkit::ondisk::fourcc(f.creator_app),
            f.creator_version_string(),
            vhdkit::ondisk::fourcc(f.creator_host_os)
        );
        outln!("created:        {}", f.timestamp);
        outln!("unique id:      {}", f.unique_id);
        if f.saved_state != 0 {
            outln!("saved state:    yes");
        }
    }
    outln!(
        "file size:      {} ({} bytes)",
        human(img.file_len()),
        img.file_len()
    );
    if let Ok(a) = vhdkit::io::allocated_bytes(img.file()) {
        outln!("on disk:        {}", human(a));
    }
    if img.header().is_some() {
        outln!("block size:     {}", human(img.block_size()));
        outln!(
            "allocated:      {} of {} blocks ({})",
            img.allocated_blocks(),
            img.block_count(),
            human(img.allocated_blocks() * img.block_size())
        );
    }
    if img.disk_type() == Format::Differencing {
        let h = img.header().unwrap();
        outln!("parent id:      {}", h.parent_unique_id);
        outln!("parent name:    {}", h.parent_name());
        if img.parent_missing() {
            outln!("parent:         NOT FOUND (use --parent FILE or --parent-dir DIR)");
        }
        for (i, p) in img.chain().iter().enumerate().skip(1) {
            outln!(
                "parent {i}:       {} ({}, {})",
                p.path().display(),
                p.disk_type(),
                p.footer()
                    .map(|f| f.unique_id.to_string())
                    .unwrap_or_default()
            );
        }
    }
    for w in img.warnings() {
        outln!("warning:        {w}");
    }
    Ok(OK)
}

fn check(path: &Path, as_json: bool, azure: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let report = vhdkit::check(
        path,
        &vhdkit::CheckOptions {
            open: open.options(),
            azure,
        },
    )?;
    let code = if report.is_clean() { OK } else { PROBLEM };
    if as_json {
        let v = json!({
            "path": report.path.display().to_string(),
            "format": report.format.map(|f| f.name()),
            "virtual_size": report.virtual_size,
            "clean": report.is_clean(),
            "problems": report.problems.iter().map(|p| json!({
                "severity": match p.severity { vhdkit::Severity::Error => "error", vhdkit::Severity::Warning => "warning" },
                "structure": p.structure,
                "field": p.field,
                "offset": p.offset,
                "message": p.message,
            })).collect::<Vec<_>>(),
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(code);
    }
    for p in &report.problems {
        let sev = match p.severity {
            vhdkit::Severity::Error => "error",
            vhdkit::Severity::Warning => "warning",
        };
        let place = match (&p.structure, p.offset) {
            (Some(s), Some(o)) => format!("{s} @ {o}: "),
            (Some(s), None) => format!("{s}: "),
            (None, Some(o)) => format!("@ {o}: "),
            (None, None) => String::new(),
        };
        outln!("{sev}: {place}{}", p.message);
    }
    let errors = report
        .problems
        .iter()
        .filter(|p| p.severity == vhdkit::Severity::Error)
        .count();
    let warnings = report.problems.len() - errors;
    outln!(
        "{}: {} ({} error{}, {} warning{})",
        path.display(),
        if errors == 0 {
            "clean"
        } else {
            "PROBLEMS FOUND"
        },
        errors,
        if errors == 1 { "" } else { "s" },
        warnings,
        if warnings == 1 { "" } else { "s" },
    );
    Ok(code)
}

struct Bar(indicatif::ProgressBar);

impl vhdkit::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

/// A progress bar on a terminal, nothing otherwise.
fn progress_bar(quiet: bool) -> Option<Arc<Bar>> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("template"),
    );
    Some(Arc::new(Bar(pb)))
}

/// Set while a command that writes a temporary output runs (convert,
/// sparsify, resize): a signal then asks it to stop and clean up.
static WRITES_OUTPUT: AtomicBool = AtomicBool::new(false);

/// Ctrl-C, SIGTERM and SIGHUP ask long operations that write an output to
/// stop cleanly (they remove their partial output, and vhdkit exits 2); a
/// second one exits at once (130). Commands with nothing to clean up exit 2
/// at once.
fn install_interrupt_handler() {
    let pressed = AtomicBool::new(false);
    let _ = ctrlc::set_handler(move || {
        if pressed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        if !WRITES_OUTPUT.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("vhdkit: interrupted");
            std::process::exit(i32::from(CANNOT_RUN));
        }
        vhdkit::cancel_all();
    });
}

fn convert(
    input: &Path,
    output: &Path,
    mut opts: ConvertOptions,
    quiet: bool,
    as_json: bool,
) -> vhdkit::Result<u8> {
    let bar = progress_bar(quiet || as_json);
    if let Some(b) = &bar {
        opts = opts.progress(b.clone());
    }
    let result = vhdkit::convert(input, output, &opts);
    if let Some(b) = &bar {
        b.0.finish_and_clear();
    }
    let r = result?;
    if as_json {
        let v = json!({
            "input": input.display().to_string(),
            "output": output.display().to_string(),
            "virtual_size": r.virtual_size,
            "bytes_read": r.bytes_read,
            "bytes_written": r.bytes_written,
            "bytes_skipped": r.bytes_skipped,
            "output_len": r.output_len,
            "allocated_blocks": r.allocated_blocks,
            "seconds": r.elapsed.as_secs_f64(),
        });
        outln!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else if !quiet {
        outln!(
            "{} -> {}: {} virtual, read {}, wrote {}, skipped {} as zero, {:.3} s",
            input.display(),
            output.display(),
            human(r.virtual_size),
            human(r.bytes_read),
            human(r.bytes_written),
            human(r.bytes_skipped),
            r.elapsed.as_secs_f64()
        );
    }
    Ok(OK)
}

fn in_place_convert(
    image: &Path,
    target: Target,
    azure: bool,
    quiet: bool,
    as_json: bool,
    open: &OpenArgs,
) -> vhdkit::Result<u8> {
    let to = match target {
        Target::Raw => Format::Raw,
        Target::Fixed => Format::Fixed,
        Target::Dynamic => Format::Dynamic,
    };
    let plan = vhdkit::ops::plan_in_place(image, to, azure, &open.options())?;
    plan.run()?;
    if as_json {
        outln!(
            "{}",
            json!({"image": image.display().to_string(), "done": plan.description})
        );
    } else if !quiet {
        outln!("{}: {}", image.display(), plan.description);
    }
    Ok(OK)
}
