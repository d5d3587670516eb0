//! The vhdkit command line: argument parsing, progress and output. No format
//! logic lives here. Exit status: 0 success, 1 the operation ran and found a
//! problem (check failed, images differ), 2 bad usage or an image that
//! cannot be opened.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// Read the file as this format instead of detecting it (raw: its bytes
    /// as they are, even when they look like a VHD, qcow2, VMDK...)
    #[arg(long, value_enum, value_name = "FORMAT")]
    format: Option<FormatArg>,
    /// Blob URLs: allow plain http:// to a host that is not a loopback
    /// address (the SAS then travels unencrypted)
    #[arg(long)]
    allow_http: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FormatArg {
    Raw,
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
        if self.format == Some(FormatArg::Raw) {
            o = o.format(Format::Raw);
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

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum NewType {
    Fixed,
    Dynamic,
}

#[derive(Subcommand)]
enum Cmd {
    /// Describe an image: type, sizes, geometry, creator, blocks, parents
    #[command(after_help = "Examples:\n  vhdkit info disk.vhd\n  \
                            vhdkit info --json child.vhd --parent-dir /images/bases\n  \
                            vhdkit info --azure --json disk.vhd")]
    Info {
        /// The image: a raw disk or a fixed, dynamic or differencing VHD
        image: PathBuf,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        /// Also print the size of the page blob an upload of it makes (the
        /// value for `az disk create --upload-size-bytes`)
        #[arg(long)]
        azure: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Report every structural problem (exit 1 when any is found)
    #[command(after_help = "Examples:\n  vhdkit check disk.vhd\n  \
                            vhdkit check --azure --json upload.vhd")]
    Check {
        /// The image to check
        image: PathBuf,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        /// Also check Azure's rules (fixed type, whole MiB, size range)
        #[arg(long)]
        azure: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Convert between raw, fixed and dynamic, writing sparse outputs
    #[command(
        after_help = "Examples:\n  vhdkit convert disk.raw disk.vhd --to dynamic\n  \
                            vhdkit convert disk.vhd azure.vhd --to fixed --azure\n  \
                            vhdkit convert --in-place disk.raw --to fixed\n  \
                            vhdkit convert disk.vhd \"https://ACCOUNT.blob.core.windows.net/vhds/disk.vhd?$SAS\"\n  \
                            zstdcat disk.raw.zst | vhdkit convert - \"$SAS_URL\" --parallel 16"
    )]
    Convert {
        /// The image to read (any type vhdkit opens; never modified, except with --in-place);
        /// `-` reads a raw disk or fixed VHD from standard input (for a blob URL output)
        input: PathBuf,
        /// The output (omit with --in-place): a file, or a blob URL
        /// (https://ACCOUNT.blob.core.windows.net/CONTAINER/BLOB?SAS, a managed
        /// disk's upload SAS URL, or http:// to a loopback address for the emulator)
        /// that becomes a page blob holding a fixed VHD
        output: Option<PathBuf>,
        /// The output type (fixed, and the default, for a blob URL output)
        #[arg(long, value_enum)]
        to: Option<To>,
        /// Block size of a dynamic output (power of two, 512K to 256M; default 2M); only with --to dynamic
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Worker threads (default: all cores, 8 for a blob URL input; at most 256, or 4 per core where that is more)
        #[arg(long)]
        threads: Option<usize>,
        /// Write zeros out: raw and fixed outputs are allocated whole; a dynamic
        /// output keeps every block the input has data in, all-zero ones too
        ///
        /// A raw or fixed output is allocated whole, with no holes. A dynamic
        /// output gets a block for every block of the disk where the input holds
        /// data (allocated blocks of a VHD, the parts of a raw file that are not
        /// holes), all-zero ones included, each written out whole; blocks the
        /// input leaves unallocated (or in holes) stay unallocated.
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
        /// Blob URL output: keep the virtual size instead of rounding it up to a whole MiB
        #[arg(long)]
        exact_size: bool,
        /// Blob URL output: requests in flight (default 8)
        #[arg(long, value_name = "N")]
        parallel: Option<usize>,
        /// Blob URL output: continue an interrupted upload into the same blob, sending
        /// only what is missing or differs
        #[arg(long)]
        resume: bool,
        /// Input `-`: the virtual size of the streamed disk, when known (else it is
        /// learnt at the end of the stream); bytes, or with K/M/G/T
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// No progress bar and no summary line
        #[arg(long, short)]
        quiet: bool,
        /// Print the summary as one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Create a new empty disk: fixed, dynamic, or a differencing child of a parent
    #[command(after_help = "Examples:\n  vhdkit create disk.vhd --size 20G\n  \
                            vhdkit create disk.vhd --size 20G --type fixed\n  \
                            vhdkit create upload.vhd --size 30000M --type fixed --azure\n  \
                            vhdkit create disk.vhd --size 1T --block-size 512K\n  \
                            vhdkit create snapshot.vhd --parent base.vhd")]
    Create {
        /// The new file (refused if it exists, unless --force)
        output: PathBuf,
        /// The virtual size: bytes, or with K/M/G/T (binary); a multiple of 512. Not with --parent (a child has its parent's size)
        #[arg(long, value_parser = parse_size, required_unless_present = "parent")]
        size: Option<u64>,
        /// The disk type (not with --parent, whose child is differencing)
        #[arg(
            long = "type",
            value_enum,
            default_value = "dynamic",
            value_name = "TYPE"
        )]
        kind: NewType,
        /// Block size of a dynamic or differencing disk (power of two, 512K to 256M; default 2M, or the parent's)
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        /// Round the size up to a whole MiB (Azure's rule)
        #[arg(long)]
        azure: bool,
        /// Make a differencing disk whose parent is this VHD (fixed, dynamic or differencing)
        #[arg(long, value_name = "BASE", conflicts_with_all = ["size", "azure"])]
        parent: Option<PathBuf>,
        /// A folder the parent's own parents may be opened from (repeatable)
        #[arg(long = "parent-dir", value_name = "DIR", requires = "parent")]
        parent_dirs: Vec<PathBuf>,
        /// Replace an existing file
        #[arg(long)]
        force: bool,
        /// Do not sync the new file to disk before renaming it into place
        #[arg(long)]
        no_sync: bool,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
    },
    /// Fold a differencing disk into its parent (or an ancestor), in place
    #[command(after_help = "Examples:\n  vhdkit merge snapshot.vhd\n  \
                            vhdkit merge snap2.vhd --into base.vhd\n  \
                            vhdkit merge --json snapshot.vhd")]
    Merge {
        /// The differencing disk whose content goes into its parent (left as it is)
        child: PathBuf,
        /// The ancestor to merge into, further down the chain (default: the parent); every layer between is folded in too
        #[arg(long, value_name = "ANCESTOR")]
        into: Option<PathBuf>,
        /// Merge even when other differencing disks depend on the disk merged into (their content changes)
        #[arg(long)]
        force: bool,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// List the virtual disk as extents of data and zero
    #[command(after_help = "Examples:\n  vhdkit map disk.vhd\n  \
                            vhdkit map --json --no-scan disk.vhd > extents.json")]
    Map {
        /// The image to map
        image: PathBuf,
        /// Print one JSON document, one extent per line, as the map is walked
        #[arg(long)]
        json: bool,
        /// Do not scan data for zero pages: report the allocation only
        #[arg(long)]
        no_scan: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Compare the virtual contents of two images (exit 1 when they differ)
    #[command(after_help = "Examples:\n  vhdkit compare disk.raw disk.vhd\n  \
                            vhdkit compare --strict-size --json a.vhd b.vhd")]
    Compare {
        /// The first image
        a: PathBuf,
        /// The second image (of any type: contents are compared, not files)
        b: PathBuf,
        /// Images of different sizes differ (otherwise the extra must be zero)
        #[arg(long)]
        strict_size: bool,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// CRC-32 of the virtual content: equal for every form of one disk of the same virtual size
    #[command(after_help = "Examples:\n  vhdkit checksum disk.vhd\n  \
                            vhdkit checksum --json disk.raw")]
    Checksum {
        /// The image to checksum
        image: PathBuf,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Make zero regions cost no disk space, in place
    #[command(after_help = "Examples:\n  vhdkit sparsify disk.raw\n  \
                            vhdkit sparsify --json disk.vhd")]
    Sparsify {
        /// The raw, fixed or dynamic image to sparsify in place
        image: PathBuf,
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        open: OpenArgs,
    },
    /// Grow an image (or, with --shrink, shrink it when the cut region is all zero), in place
    #[command(after_help = "Examples:\n  vhdkit resize disk.vhd --size 20G\n  \
                            vhdkit resize upload.vhd --size 30G --azure\n  \
                            vhdkit resize disk.vhd --size 10G --shrink")]
    Resize {
        /// The raw, fixed or dynamic image to resize in place
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
        /// Print one JSON document (fields in the README)
        #[arg(long)]
        json: bool,
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
            #[cfg(feature = "azure")]
            if e.use_stderr() {
                // An argument quoted back may be a SAS URL: its signature is redacted.
                eprint!("{}", vhdkit::azure::redact(&e.render().to_string()));
                return ExitCode::from(code);
            }
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let ctx = Context::of(&cli);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            match hint(&e, &ctx) {
                Some(h) => eprintln!("vhdkit: {e}; {h}"),
                None => eprintln!("vhdkit: {e}"),
            }
            ExitCode::from(CANNOT_RUN)
        }
    }
}

/// The open flags of a command that has none of its own.
static NO_OPEN_ARGS: OpenArgs = OpenArgs {
    parents: Vec::new(),
    parent_dirs: Vec::new(),
    ignore_checksums: false,
    format: None,
    allow_http: false,
};

/// What ran, as far as the advice after an error depends on it.
struct Context {
    convert: bool,
    ignore_checksums: bool,
}

impl Context {
    fn of(cli: &Cli) -> Context {
        let open = match &cli.cmd {
            Cmd::Info { open, .. }
            | Cmd::Check { open, .. }
            | Cmd::Convert { open, .. }
            | Cmd::Map { open, .. }
            | Cmd::Compare { open, .. }
            | Cmd::Checksum { open, .. }
            | Cmd::Sparsify { open, .. }
            | Cmd::Resize { open, .. }
            | Cmd::Merge { open, .. } => open,
            Cmd::Create { .. } => &NO_OPEN_ARGS,
        };
        Context {
            convert: matches!(cli.cmd, Cmd::Convert { .. } | Cmd::Create { .. }),
            ignore_checksums: open.ignore_checksums,
        }
    }
}

/// The CLI's own refusal of a flag or argument (`flag`), as an
/// [`vhdkit::Error::InvalidOption`]: like every error, it exits 2.
fn usage(flag: &'static str, message: String) -> vhdkit::Error {
    vhdkit::Error::invalid_option(flag, "", message)
}

/// The flag that can help after `e`, when one can: library errors name no
/// flags, so the advice is added here, and only where it fits.
fn hint(e: &vhdkit::Error, ctx: &Context) -> Option<String> {
    match e {
        vhdkit::Error::Checksum { .. } if !ctx.ignore_checksums => {
            Some("to read it anyway, add --ignore-checksums".into())
        }
        // A candidate with another unique id is not the parent; naming it
        // again cannot help.
        vhdkit::Error::ParentNotFound { wrong_id, .. } if wrong_id.is_empty() => Some(
            "name the parent with --parent FILE, or allow its folder with --parent-dir DIR".into(),
        ),
        vhdkit::Error::OutputExists(_) if ctx.convert => Some("add --force to replace it".into()),
        vhdkit::Error::InvalidOption {
            option: "shrink", ..
        } => Some("add --shrink to shrink it".into()),
        vhdkit::Error::InvalidOption {
            option: "force", ..
        } => Some("add --force to merge anyway".into()),
        #[cfg(feature = "azure")]
        vhdkit::Error::Azure(a) if a.kind == vhdkit::azure::AzureErrorKind::PlainHttp => {
            Some("--allow-http permits plain HTTP to other hosts".into())
        }
        #[cfg(feature = "azure")]
        vhdkit::Error::Azure(a) if ctx.convert => match a.kind {
            vhdkit::azure::AzureErrorKind::Exists => Some(
                "add --force to replace it, or --resume to continue an interrupted upload".into(),
            ),
            vhdkit::azure::AzureErrorKind::WrongSize { .. } => {
                Some("`vhdkit info --azure IMAGE` prints the size a blob must have for it".into())
            }
            vhdkit::azure::AzureErrorKind::Interrupted => {
                Some("run the same command with --resume to continue".into())
            }
            _ => None,
        },
        vhdkit::Error::ForeignFormat { .. } => {
            Some("to read its bytes as a raw disk anyway, add --format raw".into())
        }
        _ => None,
    }
}

/// Refuses a blob URL where a command changes an image in place or makes
/// a local file (sparsify, resize, create, merge, convert --in-place): blob
/// URLs are images to read, and convert's output. The URL is named with its
/// SAS signature redacted, as everywhere.
#[cfg(feature = "azure")]
fn refuse_url_inputs(cmd: &Cmd) -> vhdkit::Result<()> {
    let inputs: Vec<&PathBuf> = match cmd {
        Cmd::Info { .. }
        | Cmd::Check { .. }
        | Cmd::Map { .. }
        | Cmd::Checksum { .. }
        | Cmd::Compare { .. } => vec![],
        Cmd::Convert {
            input, in_place, ..
        } => {
            if *in_place {
                vec![input]
            } else {
                vec![]
            }
        }
        Cmd::Sparsify { image, .. } | Cmd::Resize { image, .. } => vec![image],
        Cmd::Create { output, parent, .. } => std::iter::once(output).chain(parent).collect(),
        Cmd::Merge { child, into, .. } => std::iter::once(child).chain(into).collect(),
    };
    for p in inputs {
        if let Some(s) = p.to_str().filter(|s| vhdkit::azure::is_url(s)) {
            return Err(usage(
                "URL",
                format!(
                "{}: a blob URL cannot be changed in place or be this command's file (blob URLs \
                 are read by info, check, map, checksum, compare and convert, and can be \
                 convert's output)",
                vhdkit::azure::redact(s)
            ),
            ));
        }
    }
    Ok(())
}

/// Worker threads of a conversion from a blob URL, by default: each has one
/// ranged GET of a chunk in flight.
const URL_READERS: usize = 8;

/// True when `s` is written as a blob URL.
fn is_url_arg(s: &str) -> bool {
    #[cfg(feature = "azure")]
    {
        vhdkit::azure::is_url(s)
    }
    #[cfg(not(feature = "azure"))]
    {
        let _ = s;
        false
    }
}

/// The blob URL `path` is written as, if it is one.
#[cfg(feature = "azure")]
fn as_url(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| vhdkit::azure::is_url(s))
}

/// Opens an image: a file, or a blob URL.
fn open_image(path: &Path, open: &OpenArgs, opts: &OpenOptions) -> vhdkit::Result<Image> {
    #[cfg(feature = "azure")]
    if let Some(u) = as_url(path) {
        let url = vhdkit::azure::BlobUrl::parse(u, open.allow_http)?;
        return vhdkit::azure::open(&url, opts);
    }
    let _ = open;
    Image::open_with(path, opts)
}

/// `path` as shown to the user: a blob URL with its signature redacted.
fn shown(path: &Path) -> String {
    #[cfg(feature = "azure")]
    if let Some(u) = as_url(path) {
        return vhdkit::azure::redact(u);
    }
    path.display().to_string()
}

fn run(cli: Cli) -> vhdkit::Result<u8> {
    #[cfg(feature = "azure")]
    refuse_url_inputs(&cli.cmd)?;
    WRITES_OUTPUT.store(
        matches!(
            cli.cmd,
            Cmd::Convert { .. } | Cmd::Sparsify { .. } | Cmd::Resize { .. }
        ),
        std::sync::atomic::Ordering::SeqCst,
    );
    install_interrupt_handler();
    match cli.cmd {
        Cmd::Info {
            image,
            json,
            azure,
            open,
        } => info(&image, json, azure, &open),
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
            exact_size,
            parallel,
            resume,
            size,
            quiet,
            json,
            open,
        } => {
            #[cfg(feature = "azure")]
            if let Some(url) = output
                .as_ref()
                .and_then(|o| o.to_str())
                .filter(|o| vhdkit::azure::is_url(o))
            {
                if to.is_some_and(|t| t != To::Fixed) {
                    return Err(usage(
                        "--to",
                        "a blob URL output is a fixed VHD: --to raw and --to dynamic do not go \
                         with it (omit --to, or give --to fixed)"
                            .into(),
                    ));
                }
                if block_size.is_some() || in_place || no_sparse || azure || threads.is_some() {
                    return Err(usage(
                        "--block-size",
                        "--block-size, --in-place, --no-sparse, --azure and --threads do not go \
                         with a blob URL output (the blob is always a fixed VHD sized for Azure)"
                            .into(),
                    ));
                }
                if size.is_some() && input != Path::new("-") {
                    return Err(usage(
                        "--size",
                        "--size goes with the input - (a stream); a file's size is known".into(),
                    ));
                }
                let url = vhdkit::azure::BlobUrl::parse(url, open.allow_http)?;
                let mut o = vhdkit::azure::UploadOptions::new()
                    .exact_size(exact_size)
                    .overwrite(force)
                    .resume(resume)
                    .open_options(open.options());
                if let Some(n) = parallel {
                    o = o.parallel(n);
                }
                if let Some(s) = size {
                    o = o.virtual_size(s);
                }
                return upload_cmd(&input, &url, o, quiet, json);
            }
            if exact_size || parallel.is_some() || resume || size.is_some() {
                return Err(usage(
                    "--exact-size",
                    "--exact-size, --parallel, --resume and --size go with a blob URL output"
                        .into(),
                ));
            }
            let Some(to) = to else {
                return Err(usage(
                    "--to",
                    "convert needs --to raw, fixed or dynamic (or a blob URL output)".into(),
                ));
            };
            let target = match to {
                To::Raw => Target::Raw,
                To::Fixed => Target::Fixed,
                To::Dynamic => Target::Dynamic,
            };
            if azure && to != To::Fixed {
                return Err(usage("--azure", "--azure goes with --to fixed".into()));
            }
            if block_size.is_some() && (to != To::Dynamic || in_place) {
                return Err(usage(
                    "--block-size",
                    "--block-size goes with --to dynamic (and not with --in-place)".into(),
                ));
            }
            if input == Path::new("-") {
                return Err(usage(
                    "INPUT",
                    "- (standard input) is read only for an upload to a blob URL output".into(),
                ));
            }
            if in_place {
                if output.is_some() {
                    return Err(usage(
                        "--in-place",
                        "--in-place takes one image, no output".into(),
                    ));
                }
                if force || no_sync || no_sparse || threads.is_some() {
                    return Err(usage(
                        "--in-place",
                        "--force, --no-sync, --no-sparse and --threads do not go with \
                         --in-place (it changes the image named, syncing each step)"
                            .into(),
                    ));
                }
                return in_place_convert(&input, target, azure, quiet, json, &open);
            }
            let Some(output) = output else {
                return Err(usage(
                    "OUTPUT",
                    "convert needs an OUTPUT (or --in-place)".into(),
                ));
            };
            let mut opts = ConvertOptions::new(target)
                .sparse(!no_sparse)
                .azure(azure)
                .overwrite(force)
                .sync(!no_sync)
                .open_options(open.options());
            if let Some(t) = threads {
                opts = opts.threads(t);
            } else if cfg!(feature = "azure") && input.to_str().is_some_and(is_url_arg) {
                // Reading a blob, each worker waits on its ranged GET: more
                // of them keep the connection busy (as uploads' --parallel).
                opts = opts.threads(URL_READERS);
            }
            if let Some(b) = block_size {
                let bs = u32::try_from(b).map_err(|_| {
                    usage(
                        "--block-size",
                        format!("block size {b}: must be a power of two from 512 KiB to 256 MiB"),
                    )
                })?;
                opts = opts.block_size(bs);
            }
            convert(&input, &output, opts, quiet, json, &open)
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
            json,
            open,
        } => {
            let r = vhdkit::ops::resize(&image, size, azure, shrink, &open.options())?;
            for w in &r.warnings {
                eprintln!("vhdkit: warning: {w}");
            }
            if json {
                let mut v = json!({"done": r.done, "old_size": r.old_size, "new_size": r.new_size,
                                   "rounded_from": r.rounded_from, "warnings": r.warnings});
                put_path(&mut v, "image", &image);
                print_doc(&v);
            } else {
                outln!("{}: {}", image.display(), r.done);
            }
            Ok(OK)
        }
        Cmd::Merge {
            child,
            into,
            force,
            json,
            open,
        } => {
            let opts = vhdkit::merge::MergeOptions {
                into,
                force,
                open: open.options(),
            };
            let r = vhdkit::merge::merge(&child, &opts)?;
            if json {
                let mut v = json!({"bytes_copied": r.bytes_copied});
                put_path(&mut v, "child", &child);
                put_path(&mut v, "target", &r.target);
                v["merged"] = path_list(&r.merged);
                v["other_children"] = path_list(&r.other_children);
                print_doc(&v);
            } else {
                outln!(
                    "{}: merged into {} ({} copied); {} is no longer needed",
                    child.display(),
                    r.target.display(),
                    human(r.bytes_copied),
                    child.display()
                );
                for o in &r.other_children {
                    eprintln!(
                        "vhdkit: warning: {} depends on {} and its content changed",
                        o.display(),
                        r.target.display()
                    );
                }
            }
            Ok(OK)
        }
        Cmd::Create {
            output,
            size,
            kind,
            block_size,
            azure,
            parent,
            parent_dirs,
            force,
            no_sync,
            json,
        } => {
            if parent.is_none() && !parent_dirs.is_empty() {
                return Err(usage(
                    "--parent-dir",
                    "--parent-dir goes with --parent (where the new child's parent chain is found)"
                        .into(),
                ));
            }
            create_cmd(
                &output,
                size,
                kind,
                block_size,
                azure,
                parent.as_deref(),
                &parent_dirs,
                force,
                !no_sync,
                json,
            )
        }
    }
}

/// `writeln!` into a buffered stdout, ending quietly on a closed pipe as
/// [`outln!`] does.
macro_rules! bufln {
    ($w:expr, $($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!($w, $($arg)*) {
            out_failed(e);
        }
    }};
}

fn out_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("vhdkit: writing the output: {e}");
    std::process::exit(2);
}

fn map_cmd(path: &Path, as_json: bool, scan: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    use std::io::Write as _;
    let img = open_image(path, open, &open.options())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if as_json {
        // One document, streamed: each extent is printed as the walk
        // hands it over, so memory stays flat whatever their number.
        let mut head = json!({"virtual_size": img.virtual_size()});
        put_path(&mut head, "path", img.path());
        let mut doc = Doc::new(&mut out);
        doc.fields(&head);
        doc.list_start("extents");
        // The file of each layer, as JSON fields, made once.
        let files: Vec<Value> = img
            .chain()
            .iter()
            .map(|l| {
                let mut v = json!({});
                put_path(&mut v, "file", l.path());
                v
            })
            .collect();
        vhdkit::ops::map_each(&img, scan, |e| {
            let mut o = json!({"offset": e.offset, "length": e.length, "data": e.data});
            if let (Some(f), Some(fo)) = (&e.file, e.file_offset) {
                let layer = img.chain().iter().position(|l| l.path() == f.as_path());
                match layer.and_then(|i| files.get(i)) {
                    Some(Value::Object(m)) => {
                        for (k, v) in m {
                            o[k.as_str()] = v.clone();
                        }
                    }
                    _ => put_path(&mut o, "file", f),
                }
                o["file_offset"] = json!(fo);
            }
            doc.list_item(&o);
            Ok(())
        })?;
        doc.list_end();
        doc.end();
        if let Err(e) = out.flush() {
            out_failed(e);
        }
        return Ok(OK);
    }
    bufln!(
        out,
        "{:>16} {:>16}  {:<5} {:>16}  file",
        "offset",
        "length",
        "kind",
        "file offset"
    );
    let (mut count, mut data) = (0u64, 0u64);
    vhdkit::ops::map_each(&img, scan, |e| {
        count += 1;
        if e.data {
            data += e.length;
        }
        bufln!(
            out,
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
        Ok(())
    })?;
    bufln!(
        out,
        "{} extents, {} data, {} zero",
        count,
        human(data),
        human(img.virtual_size() - data)
    );
    if let Err(e) = out.flush() {
        out_failed(e);
    }
    Ok(OK)
}

/// The version of the JSON documents the CLI prints, in each as `schema`.
/// Fields may be added without a new version; a field removed, renamed or
/// given another meaning bumps it.
const SCHEMA: u64 = 1;

/// Sets `name` to `path` as a string and, when the path is not valid UTF-8
/// (the string then has U+FFFD in place of the bytes that are not), also
/// `{name}_bytes`: the path's bytes as a list of integers, from which a
/// consumer gets the exact name back.
/// `[{"path": ...}, ...]`, each path as [`put_path`] gives it.
fn path_list(paths: &[PathBuf]) -> Value {
    paths
        .iter()
        .map(|p| {
            let mut o = json!({});
            put_path(&mut o, "path", p);
            o
        })
        .collect()
}

fn put_path(v: &mut Value, name: &str, path: &Path) {
    #[cfg(feature = "azure")]
    if let Some(u) = as_url(path) {
        v[name] = json!(vhdkit::azure::redact(u));
        return;
    }
    v[name] = json!(path.to_string_lossy());
    if path.to_str().is_none() {
        v[format!("{name}_bytes").as_str()] = json!(path.as_os_str().as_bytes());
    }
}

/// Writes the one JSON document of a command, in the style every command
/// shares: an object with `schema` first and one field per line; a list
/// field with one element per line; anything nested inside on one line.
struct Doc<'w, W: std::io::Write> {
    w: &'w mut W,
    first_item: bool,
}

impl<'w, W: std::io::Write> Doc<'w, W> {
    fn new(w: &'w mut W) -> Self {
        let mut d = Doc {
            w,
            first_item: true,
        };
        d.put(format_args!("{{\n  \"schema\": {SCHEMA}"));
        d
    }
    fn put(&mut self, a: std::fmt::Arguments<'_>) {
        if let Err(e) = self.w.write_fmt(a) {
            out_failed(e);
        }
    }
    fn key(&mut self, k: &str) {
        let k = serde_json::to_string(k).expect("json");
        self.put(format_args!(",\n  {k}: "));
    }
    /// Each field of the object `v`, in its order.
    fn fields(&mut self, v: &Value) {
        let Value::Object(m) = v else {
            unreachable!("a document is an object")
        };
        for (k, v) in m {
            match v {
                Value::Array(items) if !items.is_empty() => {
                    self.list_start(k);
                    for i in items {
                        self.list_item(i);
                    }
                    self.list_end();
                }
                _ => {
                    self.key(k);
                    let s = serde_json::to_string(v).expect("json");
                    self.put(format_args!("{s}"));
                }
            }
        }
    }
    fn list_start(&mut self, k: &str) {
        self.key(k);
        self.put(format_args!("["));
        self.first_item = true;
    }
    fn list_item(&mut self, v: &Value) {
        let s = serde_json::to_string(v).expect("json");
        let sep = if self.first_item { "" } else { "," };
        self.first_item = false;
        self.put(format_args!("{sep}\n    {s}"));
    }
    fn list_end(&mut self) {
        if self.first_item {
            self.put(format_args!("]"));
        } else {
            self.put(format_args!("\n  ]"));
        }
    }
    fn end(&mut self) {
        self.put(format_args!("\n}}\n"));
    }
}

/// Prints `v`, an object, as a command's one JSON document.
fn print_doc(v: &Value) {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut d = Doc::new(&mut out);
    d.fields(v);
    d.end();
    if let Err(e) = out.flush() {
        out_failed(e);
    }
}

fn compare_cmd(
    a: &Path,
    b: &Path,
    strict: bool,
    as_json: bool,
    open: &OpenArgs,
) -> vhdkit::Result<u8> {
    let ia = open_image(a, open, &open.options())?;
    let ib = open_image(b, open, &open.options())?;
    let c = vhdkit::ops::compare(&ia, &ib, strict)?;
    if as_json {
        let mut v = json!({"equal": c.equal(), "first_difference": c.first_difference, "size_a": c.size_a, "size_b": c.size_b});
        put_path(&mut v, "a", a);
        put_path(&mut v, "b", b);
        print_doc(&v);
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
    let img = open_image(path, open, &open.options())?;
    let vhdkit::Checksum {
        crc32: crc, size, ..
    } = vhdkit::ops::checksum(&img)?;
    if as_json {
        let mut v = json!({"crc32": format!("{crc:08x}"), "size": size});
        put_path(&mut v, "path", path);
        print_doc(&v);
    } else {
        outln!("{crc:08x} {size} {}", shown(path));
    }
    Ok(OK)
}

#[allow(clippy::too_many_arguments)]
fn create_cmd(
    output: &Path,
    size: Option<u64>,
    kind: NewType,
    block_size: Option<u64>,
    azure: bool,
    parent: Option<&Path>,
    parent_dirs: &[PathBuf],
    force: bool,
    sync: bool,
    as_json: bool,
) -> vhdkit::Result<u8> {
    let block_size = match block_size {
        Some(b) => Some(
            u32::try_from(b)
                .map_err(|_| usage("--block-size", format!("--block-size {b}: at most 256M")))?,
        ),
        None => None,
    };
    let made = match parent {
        Some(base) => {
            if kind == NewType::Fixed {
                return Err(usage(
                    "--type",
                    "--type fixed does not go with --parent (a child is a differencing disk)"
                        .into(),
                ));
            }
            let mut open = OpenOptions::new();
            for d in parent_dirs {
                open = open.parent_dir(d);
            }
            let opts = vhdkit::ChildOptions {
                block_size,
                overwrite: force,
                sync,
                open,
            };
            vhdkit::create_child(output, base, &opts)?
        }
        None => {
            let k = match kind {
                NewType::Fixed => vhdkit::DiskKind::Fixed,
                NewType::Dynamic => vhdkit::DiskKind::Dynamic,
            };
            if k == vhdkit::DiskKind::Fixed && block_size.is_some() {
                return Err(usage(
                    "--block-size",
                    "--block-size goes with a dynamic or differencing disk".into(),
                ));
            }
            let mut opts = vhdkit::CreateOptions::new(k, size.unwrap_or(0))
                .azure(azure)
                .overwrite(force)
                .sync(sync);
            if let Some(b) = block_size {
                opts = opts.block_size(b);
            }
            vhdkit::create(output, &opts)?
        }
    };
    if as_json {
        let mut v = json!({"type": made.disk_type.name(), "virtual_size": made.virtual_size,
                   "rounded_from": made.rounded_from, "file_len": made.file_len,
                   "block_size": made.block_size, "unique_id": made.unique_id.to_string()});
        put_path(&mut v, "path", output);
        if let Some(p) = &made.parent {
            put_path(&mut v, "parent", &p.path);
            v["parent_unique_id"] = json!(p.unique_id.to_string());
        }
        print_doc(&v);
    } else {
        let parent = match &made.parent {
            Some(p) => format!(", child of {}", p.path.display()),
            None => String::new(),
        };
        outln!(
            "{}: {} VHD of {} ({} bytes){parent}, unique id {}",
            output.display(),
            made.disk_type,
            human(made.virtual_size),
            made.virtual_size,
            made.unique_id
        );
    }
    Ok(OK)
}

fn sparsify_cmd(path: &Path, as_json: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let r = vhdkit::ops::sparsify(path, &open.options())?;
    if as_json {
        let mut v = json!({"allocated_before": r.allocated_before, "allocated_after": r.allocated_after,
                   "zero_bytes": r.zero_bytes, "freed_blocks": r.freed_blocks});
        put_path(&mut v, "path", path);
        print_doc(&v);
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

/// The image, and whether naming its missing parent could help (a
/// candidate with another unique id is not its parent).
fn open_for_info(path: &Path, open: &OpenArgs) -> vhdkit::Result<(Image, bool)> {
    match open_image(path, open, &open.options()) {
        Err(vhdkit::Error::ParentNotFound { wrong_id, .. }) => {
            // Describe the child even when its parent is missing.
            let img = open_image(path, open, &open.options().missing_parent_as_zero(true))?;
            Ok((img, wrong_id.is_empty()))
        }
        other => other.map(|i| (i, false)),
    }
}

fn info_json(img: &Image) -> Value {
    let mut v = json!({
        "format": img.disk_type().name(),
        "virtual_size": img.virtual_size(),
        "file_size": img.file_len(),
        "allocated_file_bytes": img.allocated_file_bytes(),
        "warnings": img.warnings().iter().map(|w| w.message.as_str()).collect::<Vec<_>>(),
    });
    put_path(&mut v, "path", img.path());
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
    if let Some(x) = img.vhdx() {
        v["vhdx"] = vhdx_json(img, x);
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
                    let mut v = json!({
                        "format": p.disk_type().name(),
                        "virtual_size": p.virtual_size(),
                        "unique_id": p.footer().map(|f| f.unique_id.to_string()),
                    });
                    put_path(&mut v, "path", p.path());
                    v
                })
                .collect(),
        );
    }
    v
}

/// The `vhdx` object of `info --json`: the VHDX's own fields.
fn vhdx_json(img: &Image, x: &vhdkit::vhdx::Vhdx) -> Value {
    let mut v = json!({
        "disk_type": x.disk_type().name(),
        "block_size": x.block_size(),
        "logical_sector_size": x.logical_sector_size(),
        "physical_sector_size": x.physical_sector_size(),
        "header_sequence_number": x.header_sequence(),
        "log_replayed": x.log_replayed(),
        "log_entries_replayed": x.log_replay().map_or(0, |r| r.entries),
        "page83_id": x.page83_id().to_string(),
        "data_write_guid": x.data_write_guid().to_string(),
        "allocated_blocks": x.allocated_blocks(),
    });
    if let Some(loc) = x.parent_locator() {
        let paths: serde_json::Map<String, Value> = loc
            .paths()
            .into_iter()
            .map(|(k, p)| (k.to_string(), json!(p)))
            .collect();
        v["parent"] = json!({
            "parent_linkage": loc.parent_linkage(),
            "paths": paths,
            "found": img.parent().is_some(),
        });
        if let Some(p) = img.parent() {
            put_path(&mut v["parent"], "path", p.path());
        }
    }
    v
}

/// `info`'s VHDX lines.
fn vhdx_text(img: &Image, x: &vhdkit::vhdx::Vhdx, advise_parent: bool) {
    outln!("vhdx type:      {}", x.disk_type().name());
    outln!("block size:     {}", human(x.block_size()));
    outln!(
        "sector size:    {} logical, {} physical",
        x.logical_sector_size(),
        x.physical_sector_size()
    );
    outln!(
        "allocated:      {} of {} blocks",
        x.allocated_blocks(),
        x.block_count()
    );
    outln!("header seq:     {}", x.header_sequence());
    match x.log_replay() {
        Some(r) => outln!(
            "log:            replayed in memory ({} entries; the file was not changed)",
            r.entries
        ),
        None => outln!("log:            clean"),
    }
    outln!("page 83 id:     {}", x.page83_id());
    outln!("data write id:  {}", x.data_write_guid());
    if let Some(loc) = x.parent_locator() {
        outln!(
            "parent link:    {}",
            loc.parent_linkage().unwrap_or("(none)")
        );
        for (k, p) in loc.paths() {
            outln!("parent path:    {k} = {p}");
        }
        match img.parent() {
            Some(p) => outln!("parent:         {}", p.path().display()),
            None if advise_parent => {
                outln!("parent:         NOT FOUND (use --parent FILE or --parent-dir DIR)")
            }
            None => {
                outln!("parent:         NOT FOUND (the files found have another data write id)")
            }
        }
    }
}

fn info(path: &Path, as_json: bool, azure: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let (img, advise_parent) = open_for_info(path, open)?;
    let mut v = info_json(&img);
    let upload_size = azure_upload_size(&img, azure)?;
    if let Some(n) = upload_size {
        v["azure_upload_size"] = json!(n);
    }
    if as_json {
        print_doc(&v);
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
    if let Some(a) = img.allocated_file_bytes() {
        outln!("on disk:        {}", human(a));
    }
    if let Some(x) = img.vhdx() {
        vhdx_text(&img, x, advise_parent);
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
        if img.parent_missing() && advise_parent {
            outln!("parent:         NOT FOUND (use --parent FILE or --parent-dir DIR)");
        } else if img.parent_missing() {
            outln!("parent:         NOT FOUND (the files found have another unique id)");
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
    if let Some(n) = upload_size {
        outln!("azure upload:   {n} bytes (a page blob holding it as a fixed VHD)");
    }
    for w in img.warnings() {
        outln!("warning:        {w}");
    }
    Ok(OK)
}

/// With `--azure`: the size of the page blob an upload of `img` makes.
fn azure_upload_size(img: &Image, azure: bool) -> vhdkit::Result<Option<u64>> {
    if !azure {
        return Ok(None);
    }
    #[cfg(feature = "azure")]
    {
        Ok(Some(vhdkit::azure::blob_size(img.virtual_size(), false)))
    }
    #[cfg(not(feature = "azure"))]
    {
        let _ = img;
        Err(usage(
            "--azure",
            "this vhdkit was built without Azure support".into(),
        ))
    }
}

fn check(path: &Path, as_json: bool, azure: bool, open: &OpenArgs) -> vhdkit::Result<u8> {
    let opts = vhdkit::CheckOptions {
        open: open.options(),
        azure,
    };
    #[cfg(feature = "azure")]
    let report = match as_url(path) {
        Some(u) => {
            vhdkit::azure::check(&vhdkit::azure::BlobUrl::parse(u, open.allow_http)?, &opts)?
        }
        None => vhdkit::check(path, &opts)?,
    };
    #[cfg(not(feature = "azure"))]
    let report = vhdkit::check(path, &opts)?;
    let code = if report.is_clean() { OK } else { PROBLEM };
    if as_json {
        let mut v = json!({
            "format": report.format.map(|f| f.name()),
            "virtual_size": report.virtual_size,
            "clean": report.is_clean(),
            "problems": report.problems.iter().map(|p| json!({
                "severity": p.severity.name(),
                "code": p.code,
                "structure": p.structure,
                "field": p.field,
                "offset": p.offset,
                "message": p.message,
            })).collect::<Vec<_>>(),
        });
        put_path(&mut v, "path", &report.path);
        print_doc(&v);
        return Ok(code);
    }
    for p in &report.problems {
        let sev = p.severity.name();
        let place = match (&p.structure, p.offset) {
            (Some(s), Some(o)) => format!("{s} @ {o}: "),
            (Some(s), None) => format!("{s}: "),
            (None, Some(o)) => format!("@ {o}: "),
            (None, None) => String::new(),
        };
        outln!("{sev}: {place}{}", p.message);
    }
    if report.problems.iter().any(|p| p.code == "no-vhd-footer") {
        outln!("hint: to check it as the raw disk it is, add --format raw");
    }
    if azure
        && report.virtual_size.is_some()
        && report
            .problems
            .iter()
            .any(|p| p.code.starts_with("azure-") && p.code != "azure-not-readable")
    {
        outln!(
            "hint: `vhdkit convert {} OUT.vhd --to fixed --azure` writes a copy Azure takes",
            path.display()
        );
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

/// The progress bar: virtual bytes done and their rate, and beside them the
/// data actually written and its rate (far lower on a sparse input).
struct Bar {
    pb: indicatif::ProgressBar,
    written: AtomicU64,
    started: Instant,
    /// Shows bytes sent and skipped (an upload) instead of bytes written.
    upload: AtomicBool,
}

impl Bar {
    fn show_written(&self, total: u64) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        if self.upload.load(Ordering::Relaxed) {
            // Virtual bytes done are data sent (or found in place) and zeros skipped.
            self.pb.set_message(format!(
                "sent {} ({}/s), skipped {}",
                human(total),
                human((total as f64 / secs) as u64),
                human(self.pb.position().saturating_sub(total))
            ));
            return;
        }
        self.pb.set_message(format!(
            "wrote {} ({}/s)",
            human(total),
            human((total as f64 / secs) as u64)
        ));
    }
}

impl vhdkit::Progress for Bar {
    fn start(&self, total: u64) {
        self.pb.set_length(total);
    }
    fn advance(&self, bytes: u64) {
        self.pb.inc(bytes);
        if self.upload.load(Ordering::Relaxed) {
            self.show_written(self.written.load(Ordering::Relaxed));
        }
    }
    fn written(&self, bytes: u64) {
        let total = self.written.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.show_written(total);
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
            "{bar:20} {bytes}/{total_bytes} virtual ({binary_bytes_per_sec}), {msg}, eta {eta}",
        )
        .expect("template"),
    );
    // Redrawn while nothing advances too (the final sync), so that what is
    // shown is never an old frame.
    pb.enable_steady_tick(Duration::from_millis(200));
    let bar = Bar {
        pb,
        written: AtomicU64::new(0),
        started: Instant::now(),
        upload: AtomicBool::new(false),
    };
    bar.show_written(0);
    Some(Arc::new(bar))
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
    open: &OpenArgs,
) -> vhdkit::Result<u8> {
    let bar = progress_bar(quiet || as_json);
    if let Some(b) = &bar {
        opts = opts.progress(b.clone());
    }
    #[cfg(feature = "azure")]
    let mut fetched = None;
    #[cfg(feature = "azure")]
    let result = match as_url(input) {
        Some(u) => {
            let url = vhdkit::azure::BlobUrl::parse(u, open.allow_http)?;
            vhdkit::azure::open_counted(&url, &open.options()).and_then(|o| {
                fetched = Some(o.counter);
                vhdkit::convert::convert_image(&o.image, output, &opts)
            })
        }
        None => vhdkit::convert(input, output, &opts),
    };
    #[cfg(not(feature = "azure"))]
    let result = {
        let _ = open;
        vhdkit::convert(input, output, &opts)
    };
    if let Some(b) = &bar {
        if result.is_ok() {
            // The last frame stays above the summary line, drawn as it is
            // (`finish` would force 100 %; the conversion's advances reach it).
            b.pb.abandon();
        } else {
            b.pb.finish_and_clear();
        }
    }
    let r = result?;
    for w in &r.warnings {
        eprintln!("vhdkit: warning: {w}");
    }
    if as_json {
        let mut v = json!({
            "virtual_size": r.virtual_size,
            "bytes_read": r.bytes_read,
            "bytes_written": r.bytes_written,
            "bytes_skipped": r.bytes_skipped,
            "output_len": r.output_len,
            "allocated_blocks": r.allocated_blocks,
            "seconds": r.elapsed.as_secs_f64(),
            "rounded_from": r.rounded_from,
            "warnings": r.warnings,
        });
        #[cfg(feature = "azure")]
        if let Some(c) = &fetched {
            v["bytes_fetched"] = json!(c.bytes_fetched());
            v["requests"] = json!(c.requests());
            v["retries"] = json!(c.retries());
        }
        put_path(&mut v, "input", input);
        put_path(&mut v, "output", output);
        print_doc(&v);
    } else if !quiet {
        outln!(
            "{} -> {}: {} virtual, read {}, wrote {}, skipped {} as zero, {:.3} s",
            shown(input),
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

/// `convert INPUT URL`: an upload into a page blob.
#[cfg(feature = "azure")]
fn upload_cmd(
    input: &Path,
    url: &vhdkit::azure::BlobUrl,
    mut opts: vhdkit::azure::UploadOptions,
    quiet: bool,
    as_json: bool,
) -> vhdkit::Result<u8> {
    let bar = progress_bar(quiet || as_json);
    if let Some(b) = &bar {
        b.upload.store(true, Ordering::Relaxed);
        opts = opts.progress(b.clone());
    }
    let result = if input == Path::new("-") {
        vhdkit::azure::upload_stream(std::io::stdin().lock(), url, &opts)
    } else {
        vhdkit::azure::upload(input, url, &opts)
    };
    if let Some(b) = &bar {
        if result.is_ok() {
            b.pb.abandon();
        } else {
            b.pb.finish_and_clear();
        }
    }
    let r = result?;
    if as_json {
        let mut v = json!({
            "output": url.to_string(),
            "virtual_size": r.virtual_size,
            "blob_size": r.blob_size,
            "rounded_from": r.rounded_from,
            "bytes_sent": r.bytes_sent,
            "bytes_skipped": r.bytes_skipped,
            "bytes_kept": r.bytes_kept,
            "requests": r.requests,
            "retries": r.retries,
            "ranges_cleared": r.ranges_cleared,
            "page_ranges": r.page_ranges,
            "seconds": r.elapsed.as_secs_f64(),
        });
        put_path(&mut v, "input", input);
        print_doc(&v);
    } else if !quiet {
        outln!(
            "{} -> {}: {} virtual, sent {}, skipped {} as zero{}, {} requests, {} retries, {:.3} s",
            input.display(),
            url,
            human(r.virtual_size),
            human(r.bytes_sent),
            human(r.bytes_skipped),
            if r.bytes_kept > 0 {
                format!(", kept {} already there", human(r.bytes_kept))
            } else {
                String::new()
            },
            r.requests,
            r.retries,
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
        // Targets added later have no in-place form.
        _ => Format::Dynamic,
    };
    let plan = vhdkit::ops::plan_in_place(image, to, azure, &open.options())?;
    plan.run()?;
    if as_json {
        let mut v = json!({"done": plan.description});
        put_path(&mut v, "image", image);
        print_doc(&v);
    } else if !quiet {
        outln!("{}: {}", image.display(), plan.description);
    }
    Ok(OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every long flag of every subcommand (`force`, `ignore-checksums`...).
    fn long_flags() -> Vec<String> {
        let mut v = Vec::new();
        for sub in Cli::command().get_subcommands() {
            for a in sub.get_arguments() {
                if let Some(l) = a.get_long() {
                    v.push(l.to_string());
                }
            }
        }
        v.sort();
        v.dedup();
        v
    }

    /// The string literals of Rust source, escapes and line continuations
    /// left as written except that `\` + newline + indentation is dropped.
    fn string_literals(src: &str) -> Vec<String> {
        let b = src.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'/' if b.get(i + 1) == Some(&b'/') => {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                }
                b'/' if b.get(i + 1) == Some(&b'*') => {
                    i += 2;
                    while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                        i += 1;
                    }
                    i += 2;
                }
                b'\'' => {
                    // A char literal ('x', '\n', '"') or a lifetime ('a).
                    if b.get(i + 1) == Some(&b'\\') {
                        i += 2;
                        while i < b.len() && b[i] != b'\'' {
                            i += 1;
                        }
                        i += 1;
                    } else if b.get(i + 2) == Some(&b'\'') {
                        i += 3;
                    } else {
                        i += 1;
                    }
                }
                b'r' if matches!(b.get(i + 1), Some(b'"') | Some(b'#'))
                    && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
                {
                    let mut j = i + 1;
                    let mut hashes = 0;
                    while b.get(j) == Some(&b'#') {
                        hashes += 1;
                        j += 1;
                    }
                    if b.get(j) != Some(&b'"') {
                        i += 1;
                        continue;
                    }
                    let close: String = std::iter::once('"')
                        .chain(std::iter::repeat_n('#', hashes))
                        .collect();
                    let start = j + 1;
                    let end = src[start..].find(&close).map_or(b.len(), |e| start + e);
                    out.push(src[start..end].to_string());
                    i = end + close.len();
                }
                b'"' => {
                    let mut s = String::new();
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        if b[i] == b'\\' && b.get(i + 1) == Some(&b'\n') {
                            i += 2;
                            while i < b.len() && b[i].is_ascii_whitespace() {
                                i += 1;
                            }
                            continue;
                        }
                        if b[i] == b'\\' {
                            s.push('\\');
                            i += 1;
                        }
                        let c = src[i..].chars().next().expect("a char");
                        s.push(c);
                        i += c.len_utf8();
                    }
                    i += 1;
                    out.push(s);
                }
                _ => i += 1,
            }
        }
        out
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read src") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn the_literal_scanner_finds_strings_and_skips_the_rest() {
        let src = "// \"--force\" in a comment\nlet c = '\"'; let l: &'a str = \"one --force \\\n    two\"; \
                   let r = r#\"raw \"--json\"\"#; /* \"--no\" */ f(\"x\\\"y\");";
        assert_eq!(
            string_literals(src),
            vec!["one --force two", "raw \"--json\"", "x\\\"y"]
        );
    }

    /// Library messages carry no CLI words: no `--flag` of this CLI in any
    /// string literal of the library. And no message, library or CLI,
    /// names a library item (`OpenOptions::parent`...).
    #[test]
    fn library_strings_name_no_flag_and_no_string_names_a_library_item() {
        let flags = long_flags();
        assert!(
            flags.iter().any(|f| f == "force") && flags.iter().any(|f| f == "ignore-checksums"),
            "{flags:?}"
        );
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        assert!(files.len() > 10, "{files:?}");
        let bin = src.join("bin");
        let mut bad = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(f).expect("read");
            for lit in string_literals(&text) {
                if !f.starts_with(&bin) {
                    for flag in &flags {
                        let dashed = format!("--{flag}");
                        let hit = lit.match_indices(&dashed).any(|(at, _)| {
                            let after = lit[at + dashed.len()..].chars().next();
                            !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
                        });
                        if hit {
                            bad.push(format!("{}: {lit:?} names {dashed}", f.display()));
                        }
                    }
                }
                // Spelled in two pieces, so that this test's own literals pass.
                let items = [["Options", "::"].concat(), ["Error", "::"].concat()];
                if items.iter().any(|i| lit.contains(i.as_str())) {
                    bad.push(format!("{}: {lit:?} names a library item", f.display()));
                }
            }
        }
        assert!(bad.is_empty(), "{bad:#?}");
    }

    /// `--help` of every subcommand describes every argument and flag and
    /// ends with examples.
    #[test]
    fn every_argument_has_a_description_and_every_command_examples() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        let subs: Vec<clap::Command> = cmd
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .cloned()
            .collect();
        assert!(subs.len() >= 8, "{}", subs.len());
        for mut sub in subs {
            let name = sub.get_name().to_string();
            for a in sub.get_arguments() {
                if a.get_help().is_none_or(|h| h.to_string().trim().is_empty()) {
                    missing.push(format!("{name} {}", a.get_id()));
                }
            }
            let help = sub.render_long_help().to_string();
            let examples = help
                .split_once("Examples:")
                .map(|(_, e)| e.to_string())
                .unwrap_or_else(|| panic!("{name}: no examples:\n{help}"));
            assert!(
                examples
                    .lines()
                    .filter(|l| l.trim_start().starts_with(&format!("vhdkit {name} ")))
                    .count()
                    >= 1,
                "{name}: the examples run vhdkit {name}:\n{help}"
            );
            // What each example passes parses.
            for l in examples
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("vhdkit "))
            {
                let words = l.split_whitespace().take_while(|w| *w != ">");
                if let Err(e) = Cli::try_parse_from(words) {
                    panic!("{name}: the example {l:?} does not parse: {e}");
                }
            }
        }
        assert!(missing.is_empty(), "no description: {missing:?}");
    }

    #[test]
    fn paths_that_are_not_utf8_carry_their_bytes() {
        use std::os::unix::ffi::OsStrExt;
        let p = Path::new(std::ffi::OsStr::from_bytes(b"/tmp/d\xffisk.vhd"));
        let mut v = json!({});
        put_path(&mut v, "path", p);
        assert_eq!(v["path"], "/tmp/d\u{fffd}isk.vhd");
        let bytes: Vec<u8> = v["path_bytes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(bytes, b"/tmp/d\xffisk.vhd");
        let mut v = json!({});
        put_path(&mut v, "path", Path::new("/tmp/disk.vhd"));
        assert_eq!(v, json!({"path": "/tmp/disk.vhd"}));
    }

    #[test]
    fn documents_share_one_style() {
        let mut out = Vec::new();
        let mut d = Doc::new(&mut out);
        d.fields(&json!({"a": 1, "l": [{"x": 1}, {"x": 2}], "e": [], "o": {"k": "v"}}));
        d.end();
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "{\n  \"schema\": 1,\n  \"a\": 1,\n  \"e\": [],\n  \"l\": [\n    {\"x\":1},\n    {\"x\":2}\n  ],\n  \"o\": {\"k\":\"v\"}\n}\n"
        );
        let v: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["schema"], SCHEMA);
    }
}
