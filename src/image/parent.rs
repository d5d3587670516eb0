//! Finding the parent of a differencing disk, through a gate.
//!
//! Candidates, in order: files the caller named; the parent locators
//! (`W2ru`, `W2ku`, `MacX`, then the deprecated `Wi2r`/`Wi2k`); the parent's
//! unicode name. A path from the image is only a hint, reduced to a file
//! name: a bare relative name (`.\p.vhd`) is opened in the child's folder;
//! an absolute path (Windows or POSIX) is reported as outside, without being
//! looked at, and its file name is opened in the child's folder; a relative
//! path through other folders (`..\base\p.vhd`) is reported as outside too.
//! Every hint's file name is also looked for in the folders the caller
//! allowed. A hostile image cannot make vhdkit open, or even look at,
//! anything else, nor learn from the error which files exist elsewhere.
//!
//! Each allowed folder is opened once and candidates are opened beneath its
//! handle (`openat2` with `RESOLVE_BENEATH`, or `openat` with `O_NOFOLLOW`
//! where the kernel lacks it), so that what is checked is what is opened;
//! without blocking (`O_NONBLOCK`: a FIFO does not hang the open); and used
//! only if `fstat` says it is a regular file. Files the caller named are
//! trusted wherever they are, but opened the same way and must be regular
//! files too. The parent's unique id must equal the child's header's parent
//! unique id; depth is limited and loops (the same device and inode twice in
//! a chain) are refused.

use super::{Image, OpenOptions};
use crate::error::{Error, Result, Structure};
use crate::io::ReadAt;
use crate::ondisk::{PlatformCode, Uuid};
use crate::storage::{FileStorage, Storage};
use crate::vhdx::Guid;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use std::cell::RefCell;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The most bytes of locator data read (a path, not a payload).
const MAX_LOCATOR_DATA: u32 = 64 * 1024;

/// Decodes a locator's data as a path string.
fn decode(code: PlatformCode, data: &[u8]) -> Option<String> {
    let s = match code {
        PlatformCode::W2ru | PlatformCode::W2ku => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        PlatformCode::Wi2r | PlatformCode::Wi2k => String::from_utf8_lossy(data).into_owned(),
        PlatformCode::MacX => {
            let url = String::from_utf8_lossy(data).into_owned();
            let url = url.trim_end_matches('\0');
            let rest = url
                .strip_prefix("file://localhost")
                .or_else(|| url.strip_prefix("file://"))
                .unwrap_or(url);
            percent_decode(rest)
        }
        _ => return None,
    };
    let s = s.trim_end_matches('\0').trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where one hint sends vhdkit: file names to open in the child's folder,
/// and the path named when it lies outside the allowed folders (reported,
/// never looked at).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Hint {
    /// A file name to open in the child's folder.
    pub(crate) in_child_dir: Option<String>,
    /// The path as the image gives it, when it names a file elsewhere.
    pub(crate) outside: Option<String>,
    /// The hint's file name, looked for in the folders the caller allowed.
    pub(crate) file_name: Option<String>,
}

/// A usable file name: one path component, not `.` or `..`, no NUL.
fn file_name_of(s: &str) -> Option<String> {
    Some(s)
        .filter(|n| !n.is_empty() && *n != "." && *n != ".." && !n.contains(['/', '\0']))
        .map(str::to_string)
}

/// What to try for one hint. A relative path that is a bare file name (`p.vhd`,
/// `.\p.vhd`) is opened in the child's folder; one through other folders
/// (`..\base\p.vhd`, `sub/p.vhd`) is outside. An absolute path (Windows or
/// POSIX) is outside, and its file name is opened in the child's folder.
pub(crate) fn hint_targets(hint: &str) -> Hint {
    let unified = hint.replace('\\', "/");
    let is_abs = unified.starts_with('/')
        || unified.len() >= 2 && unified.as_bytes()[1] == b':'
        || unified.starts_with("//");
    let file_name = unified.rsplit('/').next().and_then(file_name_of);
    if is_abs {
        return Hint {
            in_child_dir: file_name.clone(),
            outside: Some(unified),
            file_name,
        };
    }
    let parts: Vec<&str> = unified
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    match parts.as_slice() {
        [one] if file_name_of(one).is_some() => Hint {
            in_child_dir: file_name_of(one),
            outside: None,
            file_name,
        },
        _ => Hint {
            in_child_dir: None,
            outside: Some(unified),
            file_name,
        },
    }
}

/// A storage's identity (device and inode for a file): what a walk
/// compares, so that a file reached by two names is one file. A storage with
/// no identity of its own is told apart by its address.
pub(crate) fn storage_id(s: &Arc<dyn Storage>) -> (u64, u64) {
    s.identity()
        .unwrap_or((u64::MAX, Arc::as_ptr(s) as *const () as usize as u64))
}

/// The state of one walk up a parent chain.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// The differencing disks being resolved, child first: a candidate
    /// parent with the right unique id that is already here is a loop.
    pub(crate) path: Vec<(u64, u64)>,
    /// Candidates whose own parents could not be resolved. Resolving them
    /// again cannot succeed, so each is walked at most once: a folder of
    /// hostile images that name each other costs time in proportion to
    /// their number, not to the number of paths through them.
    pub(crate) failed: Vec<(u64, u64)>,
    /// The candidates with no identity of their own, told apart by their
    /// address ([`storage_id`]): held until the walk ends, so that no other
    /// storage comes to have the same address meanwhile.
    pub(crate) held: Vec<Arc<dyn Storage>>,
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A folder parents may be opened from, held open: every candidate is
/// resolved beneath this handle, so the folder checked is the one opened in.
struct Folder {
    path: PathBuf,
    fd: std::result::Result<OwnedFd, String>,
}

impl Folder {
    fn open(dir: &Path) -> Folder {
        let path = canon(dir);
        // O_PATH: the handle needs only search permission on the folder.
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let how = OFlags::PATH;
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        let how = OFlags::RDONLY;
        let fd = rustix::fs::open(
            &path,
            how | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| std::io::Error::from(e).to_string());
        Folder { path, fd }
    }
}

/// Opens `name`, a bare file name, beneath `dir` without blocking and
/// without following a link out of the folder, then checks with `fstat`
/// that it is a regular file. Errors are the reason, in words.
fn open_beneath(dir: &OwnedFd, name: &str) -> std::result::Result<(File, u64), String> {
    let fd = open_at(dir, name, true).map_err(|e| match e {
        Errno::NOENT => "not found".to_string(),
        Errno::XDEV => "refused: a link leading out of the folder".to_string(),
        Errno::LOOP => "refused: a symbolic link (not followed)".to_string(),
        Errno::NXIO => "refused: not a regular file".to_string(),
        e => format!("could not be opened: {}", std::io::Error::from(e)),
    })?;
    settled(File::from(fd))
}

/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (a link that
/// stays inside the folder is followed, one that leaves it fails with
/// `EXDEV`) where the kernel has it and `use_openat2` is set; else `openat`
/// with `O_NOFOLLOW` (no link is followed: `ELOOP`). `name` is one path
/// component, so no other link or `..` is on the way.
fn open_at(dir: &OwnedFd, name: &str, use_openat2: bool) -> rustix::io::Result<OwnedFd> {
    let flags = crate::io::open_flags(false);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if use_openat2 {
        match rustix::fs::openat2(
            dir,
            name,
            flags,
            Mode::empty(),
            rustix::fs::ResolveFlags::BENEATH | rustix::fs::ResolveFlags::NO_MAGICLINKS,
        ) {
            // No openat2 (kernels before 5.6, some seccomp filters).
            Err(Errno::NOSYS) | Err(Errno::PERM) => {}
            r => return r,
        }
    }
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = use_openat2;
    rustix::fs::openat(dir, name, flags | OFlags::NOFOLLOW, Mode::empty())
}

/// Checks an opened candidate with `fstat` before anything is read from it.
fn settled(file: File) -> std::result::Result<(File, u64), String> {
    match crate::io::settle(&file, false) {
        Ok(Ok(len)) => Ok((file, len)),
        Ok(Err(t)) => Err(format!(
            "refused: {}, not a regular file",
            crate::io::type_name(t)
        )),
        Err(e) => Err(format!("could not be examined: {e}")),
    }
}

/// A file the caller named: trusted wherever it is, but still opened
/// without blocking and used only if it is a regular file.
fn open_named(path: &Path) -> std::result::Result<(File, u64), String> {
    let fd =
        rustix::fs::open(path, crate::io::open_flags(false), Mode::empty()).map_err(
            |e| match e {
                Errno::NOENT => "not found".to_string(),
                e => format!("could not be opened: {}", std::io::Error::from(e)),
            },
        )?;
    settled(File::from(fd))
}

/// The identity a differencing disk requires of its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParentId {
    /// A differencing VHD's parent: a VHD whose footer has this unique id
    /// (the child's dynamic header's parent unique id).
    Vhd(Uuid),
    /// A differencing VHDX's parent: a VHDX whose data write GUID is this
    /// (the child's parent locator's `parent_linkage`).
    Vhdx(Guid),
}

impl std::fmt::Display for ParentId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParentId::Vhd(u) => u.fmt(f),
            ParentId::Vhdx(g) => g.fmt(f),
        }
    }
}

/// One place where a differencing disk says its parent is, as the image
/// gives it: untrusted text, not a path to open as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ParentHint {
    /// Where the child says it (`parent locator 0 (W2ru)`, `parent locator
    /// relative_path`), for messages.
    pub source: String,
    /// The path, decoded (a VHD locator's UTF-16 or `file://` URL, a VHDX
    /// locator's value).
    pub path: String,
}

/// A candidate parent a [`ParentResolver`] offers: a storage, and the name
/// that names it in messages and as the parent's [`Image::path`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ParentSource {
    /// The parent's name in messages and as its `Image::path()`.
    pub name: PathBuf,
    /// Where the parent's bytes are.
    pub storage: Arc<dyn Storage>,
    /// How it was found (`named by the caller`, `parent locator 0 (W2ru)
    /// ".\\p.vhd"`), for messages.
    pub found_by: String,
}

impl ParentSource {
    /// A candidate parent over `storage`, named `name`.
    pub fn new(name: impl AsRef<Path>, storage: impl Storage + 'static) -> Self {
        Self::shared(name, Arc::new(storage))
    }
    /// [`ParentSource::new`] over a storage already shared.
    pub fn shared(name: impl AsRef<Path>, storage: Arc<dyn Storage>) -> Self {
        ParentSource {
            name: name.as_ref().to_path_buf(),
            storage,
            found_by: "given by the resolver".to_string(),
        }
    }
    /// Says how it was found, for messages.
    pub fn found_by(mut self, how: impl Into<String>) -> Self {
        self.found_by = how.into();
        self
    }
}

/// Finds the parent of a differencing disk (VHD or VHDX).
///
/// The image asks through a [`ParentRequest`] (the identity the parent must
/// have, the paths the child gives, in order, its parent name, the child's
/// path); the resolver answers with a storage, or `Ok(None)` when it has
/// none. Whatever it answers, vhdkit opens the storage itself and takes it
/// as the parent only if its identity is the one asked for (a VHD's unique
/// id, a VHDX's data write GUID), its kind is right, its own parents are
/// found (through the same resolver) and it does not close a loop.
///
/// A resolver with several candidates offers each to
/// [`ParentRequest::try_parent`], which makes those checks, and returns the
/// first it accepts. The default is [`FolderResolver`] (the child's folder,
/// the folders and files the caller allowed); another is set with
/// [`OpenOptions::parent_resolver`].
///
/// ```
/// use vhdkit::{MemoryStorage, OpenOptions, ParentRequest, ParentResolver, ParentSource};
///
/// /// Serves parents from a table in memory, by unique id.
/// #[derive(Debug)]
/// struct Table(Vec<(vhdkit::ParentId, Vec<u8>)>);
///
/// impl ParentResolver for Table {
///     fn resolve(&self, request: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
///         for (id, bytes) in &self.0 {
///             if *id == request.parent_id() {
///                 return Ok(Some(ParentSource::new("table", MemoryStorage::new(bytes.clone()))));
///             }
///         }
///         request.note("not in the table");
///         Ok(None)
///     }
/// }
/// let opts = OpenOptions::new().parent_resolver(Table(Vec::new()));
/// # let _ = opts;
/// ```
pub trait ParentResolver: Send + Sync + std::fmt::Debug {
    /// The parent `request` describes, or `Ok(None)` when there is none
    /// (say why with [`ParentRequest::note`]: the reasons are listed in
    /// [`Error::ParentNotFound`]).
    ///
    /// # Errors
    /// Any error it returns stops the open; pass on those of
    /// [`ParentRequest::try_parent`] (a chain too deep, or a loop).
    fn resolve(&self, request: &ParentRequest<'_>) -> Result<Option<ParentSource>>;
}

/// The parent resolver used unless another is set: the rules of
/// [`OpenOptions::parent`], [`OpenOptions::parent_dir`] and
/// [`OpenOptions::parent_storage`].
///
/// Candidates, in order: the files the caller named (trusted wherever they
/// are, but opened without blocking and used only if regular files); the
/// storages the caller gave; then, for each path the child gives (its
/// locators in order, then its parent name), that path's file name in the
/// child's folder (when the child is a local file and the path is a bare
/// file name or an absolute path) and in each allowed folder. A path from
/// the image is never followed as it is: one naming another folder is
/// reported, not looked at. Files in folders are opened beneath the
/// folder's handle (`openat2` with `RESOLVE_BENEATH`, or `O_NOFOLLOW`),
/// without blocking, and used only if `fstat` says they are regular files.
#[derive(Clone, Debug, Default)]
pub struct FolderResolver {
    parents: Vec<PathBuf>,
    parent_dirs: Vec<PathBuf>,
    parent_storages: Vec<(PathBuf, Arc<dyn Storage>)>,
}

impl FolderResolver {
    /// Only the child's own folder.
    pub fn new() -> Self {
        Self::default()
    }
    /// As [`OpenOptions::parent`].
    pub fn parent(mut self, path: impl AsRef<Path>) -> Self {
        self.parents.push(path.as_ref().to_path_buf());
        self
    }
    /// As [`OpenOptions::parent_dir`].
    pub fn parent_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.parent_dirs.push(dir.as_ref().to_path_buf());
        self
    }
    /// As [`OpenOptions::parent_storage`].
    pub fn parent_storage(
        mut self,
        name: impl AsRef<Path>,
        storage: impl Storage + 'static,
    ) -> Self {
        self.parent_storages
            .push((name.as_ref().to_path_buf(), Arc::new(storage)));
        self
    }
}

/// One candidate parent.
enum Candidate {
    /// A file the caller named.
    Named(PathBuf),
    /// A file name in one of the allowed folders (0 is the child's).
    InFolder(usize, String),
    /// A storage the caller gave ([`OpenOptions::parent_storage`]).
    Given(usize),
}

impl ParentResolver for FolderResolver {
    fn resolve(&self, request: &ParentRequest<'_>) -> Result<Option<ParentSource>> {
        // An image over a storage other than a local file has no folder of
        // its own to look for its parent in.
        let child_dir = request.child_path().map(|path| {
            path.parent()
                .map(|p| {
                    if p.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        p
                    }
                })
                .unwrap_or(Path::new("."))
                .to_path_buf()
        });
        let local = child_dir.is_some();

        // The allowed folders, opened once: the child's, then the caller's.
        let folders: Vec<Option<Folder>> = std::iter::once(child_dir.as_deref().map(Folder::open))
            .chain(self.parent_dirs.iter().map(|d| Some(Folder::open(d))))
            .collect();

        // Named files first: they need no gate.
        let mut paths: Vec<(String, Candidate)> = self
            .parents
            .iter()
            .map(|p| {
                (
                    "named by the caller".to_string(),
                    Candidate::Named(canon(p)),
                )
            })
            .chain(
                (0..self.parent_storages.len())
                    .map(|i| ("given by the caller".to_string(), Candidate::Given(i))),
            )
            .collect();
        let name_hint = request.parent_name().map(|n| ParentHint {
            source: "parent unicode name".to_string(),
            path: n.to_string(),
        });
        for ParentHint { source, path: hint } in request.hints().iter().chain(&name_hint) {
            let h = hint_targets(hint);
            if let Some(outside) = &h.outside {
                // Not looked at: whether it exists is none of the image's business.
                request.note(format!(
                    "{source} {hint:?}: {outside} refused without looking at it (a path from \
                     an image is not followed: only a file name is looked for, in the child's \
                     folder and the allowed folders)"
                ));
            }
            if let Some(name) = h.in_child_dir.filter(|_| local) {
                paths.push((format!("{source} {hint:?}"), Candidate::InFolder(0, name)));
            }
            // A folder the caller allowed is also searched for the file name,
            // so that a parent moved there is found.
            if let Some(name) = &h.file_name {
                for i in 1..folders.len() {
                    paths.push((
                        format!("{source} {hint:?} in an allowed folder"),
                        Candidate::InFolder(i, name.clone()),
                    ));
                }
            }
        }

        for (source, c) in paths {
            let as_storage = |r: std::result::Result<(File, u64), String>| {
                r.map(|(f, _)| Arc::new(FileStorage::new(f)) as Arc<dyn Storage>)
            };
            let (real, opened) = match &c {
                Candidate::Named(p) => (p.clone(), as_storage(open_named(p))),
                Candidate::InFolder(i, name) => match &folders[*i] {
                    Some(f) => {
                        let real = f.path.join(name);
                        match &f.fd {
                            Ok(fd) => (real, as_storage(open_beneath(fd, name))),
                            Err(e) => (real, Err(format!("its folder could not be opened: {e}"))),
                        }
                    }
                    None => continue,
                },
                Candidate::Given(i) => {
                    let (name, s) = &self.parent_storages[*i];
                    (name.clone(), Ok(Arc::clone(s)))
                }
            };
            let storage = match opened {
                Ok(s) => s,
                Err(why) => {
                    request.note(format!("{}: {} {why}", source, real.display()));
                    continue;
                }
            };
            let candidate = ParentSource::shared(real, storage).found_by(source);
            if request.try_parent(&candidate)? {
                return Ok(Some(candidate));
            }
        }
        Ok(None)
    }
}

/// What a differencing disk says of its parent, given to a
/// [`ParentResolver`]; and the means to check a candidate
/// ([`ParentRequest::try_parent`]).
pub struct ParentRequest<'a> {
    child: PathBuf,
    local: bool,
    id: ParentId,
    hints: Vec<ParentHint>,
    parent_name: Option<String>,
    depth: usize,
    state: RefCell<Checks<'a>>,
}

impl std::fmt::Debug for ParentRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParentRequest")
            .field("child", &self.child)
            .field("local", &self.local)
            .field("id", &self.id)
            .field("hints", &self.hints)
            .field("parent_name", &self.parent_name)
            .field("depth", &self.depth)
            .finish_non_exhaustive()
    }
}

/// What checking candidates needs and learns.
struct Checks<'a> {
    walk: &'a mut Walk,
    /// How parents are opened (read-only, detected).
    popts: OpenOptions,
    /// Where the child names the parent's identity (for a loop's error).
    id_at: u64,
    seen: Vec<(u64, u64)>,
    tried: Vec<String>,
    wrong_id: Vec<PathBuf>,
    /// The candidate accepted, opened with its own parents.
    accepted: Option<((u64, u64), Image)>,
}

impl ParentRequest<'_> {
    /// The identity the parent must have.
    pub fn parent_id(&self) -> ParentId {
        self.id
    }
    /// The paths the child gives for its parent, in the order they are to
    /// be tried: a VHD's parent locators (`W2ru`, `W2ku`, `MacX`, `Wi2r`,
    /// `Wi2k`), a VHDX's (`relative_path`, `volume_path`,
    /// `absolute_win32_path`). Untrusted: they come from the image.
    pub fn hints(&self) -> &[ParentHint] {
        &self.hints
    }
    /// A VHD's parent unicode name (from its dynamic header), when not empty.
    pub fn parent_name(&self) -> Option<&str> {
        self.parent_name.as_deref()
    }
    /// The child's path, when it is a local file (the folder its parents
    /// are looked for in by default); `None` for an image over another
    /// storage.
    pub fn child_path(&self) -> Option<&Path> {
        self.local.then_some(self.child.as_path())
    }
    /// The child's name in messages (`<memory>` for an image over a
    /// storage).
    pub fn child_name(&self) -> &Path {
        &self.child
    }
    /// How many parents lie between the image opened and this child (0: the
    /// child is the image opened).
    pub fn depth(&self) -> usize {
        self.depth
    }
    /// Records why something was not the parent, for
    /// [`Error::ParentNotFound`]'s list.
    pub fn note(&self, why: impl Into<String>) {
        self.state.borrow_mut().tried.push(why.into());
    }

    /// Opens `candidate` and says whether it is the parent: its identity is
    /// the one asked for, its kind is right (a VHD for a VHD, a VHDX for a
    /// VHDX), and its own parents were found. When it is not, why is noted.
    /// A candidate already tried (the same file or storage) is passed over.
    ///
    /// # Errors
    /// [`Error::Limit`] when the chain is too deep, [`Error::Corrupt`] when
    /// the candidate closes a loop: return them from
    /// [`ParentResolver::resolve`].
    pub fn try_parent(&self, candidate: &ParentSource) -> Result<bool> {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let (source, real) = (&candidate.found_by, &candidate.name);
        let id = storage_id(&candidate.storage);
        if st.accepted.as_ref().is_some_and(|(a, _)| *a == id) {
            return Ok(true);
        }
        if candidate.storage.identity().is_none()
            && !st
                .walk
                .held
                .iter()
                .any(|h| Arc::ptr_eq(h, &candidate.storage))
        {
            st.walk.held.push(Arc::clone(&candidate.storage));
        }
        let len = match ReadAt::len(&*candidate.storage) {
            Ok(len) => len,
            Err(e) => {
                st.tried.push(format!(
                    "{}: {} could not be examined: {e}",
                    source,
                    real.display()
                ));
                return Ok(false);
            }
        };
        if st.seen.contains(&id) {
            return Ok(false);
        }
        st.seen.push(id);
        if st.walk.failed.contains(&id) {
            st.tried.push(format!(
                "{}: {} was tried already and its own parent was not found",
                source,
                real.display()
            ));
            return Ok(false);
        }
        // The candidate alone first: its unique id decides whether it is the
        // parent, before any of its own parents is looked for. (A file the
        // caller named for another link of the chain is passed over here.)
        let alone = OpenOptions {
            shallow: true,
            ..st.popts.clone()
        };
        let storage = Arc::clone(&candidate.storage);
        let depth = self.depth;
        let mut parent =
            match Image::open_file(real, storage, len, &alone, depth + 1, st.walk, None) {
                Ok(p) => p,
                Err(e) => {
                    st.tried.push(format!(
                        "{}: {} could not be opened: {e}",
                        source,
                        real.display()
                    ));
                    return Ok(false);
                }
            };
        let (want_vhdx, want) = match self.id {
            ParentId::Vhd(_) => (false, self.id.to_string()),
            ParentId::Vhdx(_) => (true, self.id.to_string()),
        };
        let got = match (want_vhdx, parent.vhdx()) {
            (true, Some(v)) => v.data_write_guid().to_string(),
            (false, None) => parent
                .footer()
                .map(|f| f.unique_id)
                .unwrap_or_default()
                .to_string(),
            (true, None) => {
                st.tried.push(format!(
                    "{}: {} is not a VHDX (a VHDX's parent is a VHDX)",
                    source,
                    real.display()
                ));
                return Ok(false);
            }
            (false, Some(_)) => {
                st.tried.push(format!(
                    "{}: {} is a VHDX, not a VHD",
                    source,
                    real.display()
                ));
                return Ok(false);
            }
        };
        if got != want {
            st.wrong_id.push(real.clone());
            st.tried.push(format!(
                "{}: {} has unique id {got}, not {want}",
                source,
                real.display()
            ));
            return Ok(false);
        }
        if parent.disk_type() == super::Format::Raw {
            st.tried
                .push(format!("{}: {} is not a VHD", source, real.display()));
            return Ok(false);
        }
        if st.walk.path.contains(&id) {
            return Err(Error::corrupt(
                Structure::ParentChain,
                if want_vhdx {
                    "parent_linkage"
                } else {
                    "parent unique id"
                },
                st.id_at,
                format!("a loop back to {}", real.display()),
                "a chain that ends in a non-differencing disk",
            )
            .with_path(&self.child));
        }
        if parent.is_differencing() {
            st.walk.path.push(id);
            let r = resolve(&mut parent, &st.popts, depth + 1, st.walk);
            st.walk.path.pop();
            match r {
                Ok(()) => {}
                Err(e @ (Error::Limit { .. } | Error::Corrupt(_)))
                    if matches!(&e, Error::Limit { .. })
                        || matches!(&e, Error::Corrupt(c) if c.structure == Structure::ParentChain) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    st.walk.failed.push(id);
                    st.tried.push(format!(
                        "{}: {} could not be opened: {e}",
                        source,
                        real.display()
                    ));
                    return Ok(false);
                }
            }
        }
        st.accepted = Some((id, parent));
        Ok(true)
    }
}

pub(crate) fn resolve(
    img: &mut Image,
    opts: &OpenOptions,
    depth: usize,
    walk: &mut Walk,
) -> Result<()> {
    if depth >= opts.max_chain_depth {
        return Err(Error::Limit {
            path: img.path.clone(),
            what: crate::error::LimitOf::ChainDepth,
            value: depth as u64 + 1,
            limit: opts.max_chain_depth as u64,
        });
    }
    if img.vhdx().is_some() {
        return resolve_with(img, opts, depth, walk, vhdx_wants(img)?);
    }
    let Some(header) = img.header().cloned() else {
        return Err(Error::corrupt(
            Structure::DynamicHeader,
            "cookie",
            img.header_offset(),
            "no dynamic header",
            "a differencing disk's dynamic header",
        ));
    };
    // Hints in order of preference.
    let mut hints: Vec<ParentHint> = Vec::new();
    let order = [
        PlatformCode::W2ru,
        PlatformCode::W2ku,
        PlatformCode::MacX,
        PlatformCode::Wi2r,
        PlatformCode::Wi2k,
    ];
    let mut tried: Vec<String> = Vec::new();
    for code in order {
        for (i, l) in header.parent_locators.iter().enumerate() {
            if l.platform_code != code || l.data_length == 0 {
                continue;
            }
            let end = l.data_offset.checked_add(u64::from(l.data_length));
            if l.data_length > MAX_LOCATOR_DATA || end.is_none_or(|e| e > img.data_end) {
                tried.push(format!(
                    "{}: data at {}+{} lies outside the file",
                    Structure::ParentLocator(i),
                    l.data_offset,
                    l.data_length
                ));
                continue;
            }
            let mut data = vec![0u8; l.data_length as usize];
            if ReadAt::read_exact_at(&*img.storage, &mut data, l.data_offset).is_err() {
                tried.push(format!("{}: unreadable", Structure::ParentLocator(i)));
                continue;
            }
            if let Some(s) = decode(code, &data) {
                hints.push(ParentHint {
                    source: format!("{} ({:?})", Structure::ParentLocator(i), code),
                    path: s,
                });
            }
        }
    }
    let name = header.parent_name();
    let wants = Wants {
        id: ParentId::Vhd(header.parent_unique_id),
        hints,
        parent_name: (!name.is_empty()).then_some(name),
        tried,
        id_at: img.header_offset() + crate::ondisk::header_fields::PARENT_UNIQUE_ID as u64,
    };
    resolve_with(img, opts, depth, walk, wants)
}

/// What a differencing disk asks of its parent: the identity it must have
/// (a VHD's unique id, or a VHDX's data write GUID), where to look for it
/// in order, and what was already ruled out.
struct Wants {
    id: ParentId,
    hints: Vec<ParentHint>,
    parent_name: Option<String>,
    tried: Vec<String>,
    /// Where the child names the parent's identity (for a loop's error).
    id_at: u64,
}

/// A differencing VHDX's wants: `parent_linkage` as the parent's data write
/// GUID, and its locator's paths in the specification's order.
fn vhdx_wants(img: &Image) -> Result<Wants> {
    let corrupt = |found: &str| {
        Error::corrupt(
            Structure::Vhdx(crate::vhdx::VhdxStructure::ParentLocator),
            "parent_linkage",
            0,
            found,
            "the parent's data write GUID, as {GUID} text",
        )
        .with_path(&img.path)
    };
    let Some(loc) = img.vhdx().and_then(|v| v.parent_locator()) else {
        return Err(corrupt("no parent locator"));
    };
    let Some(id) = loc.parent_linkage_guid() else {
        return Err(corrupt(loc.parent_linkage().unwrap_or("no parent_linkage")));
    };
    let hints = loc
        .paths()
        .into_iter()
        .map(|(k, v)| ParentHint {
            source: format!("parent locator {k}"),
            path: v.to_string(),
        })
        .collect();
    Ok(Wants {
        id: ParentId::Vhdx(id),
        hints,
        parent_name: None,
        tried: Vec::new(),
        id_at: 0,
    })
}

/// Finds the parent `wants` describes through the options' resolver.
fn resolve_with(
    img: &mut Image,
    opts: &OpenOptions,
    depth: usize,
    walk: &mut Walk,
    wants: Wants,
) -> Result<()> {
    // Parents are opened read-only and detected, whatever was asked of the child.
    let popts = OpenOptions {
        format: None,
        writable: false,
        shallow: false,
        ..opts.clone()
    };
    let request = ParentRequest {
        child: img.path.clone(),
        local: img.storage.file().is_some(),
        id: wants.id,
        hints: wants.hints,
        parent_name: wants.parent_name,
        depth,
        state: RefCell::new(Checks {
            walk,
            popts,
            id_at: wants.id_at,
            seen: Vec::new(),
            tried: wants.tried,
            wrong_id: Vec::new(),
            accepted: None,
        }),
    };
    let resolver: &dyn ParentResolver = match &opts.parent_resolver {
        Some(r) => &**r,
        None => &opts.folders,
    };
    let found = match resolver.resolve(&request)? {
        // A resolver need not have checked what it returns.
        Some(source) if request.try_parent(&source)? => Some(source),
        _ => None,
    };
    let Checks {
        accepted,
        tried,
        wrong_id,
        ..
    } = request.state.into_inner();
    if let (Some(source), Some((_, parent))) = (found, accepted) {
        if parent.virtual_size() != img.virtual_size() {
            img.warnings.push(super::Warning::new(
                "parent-size-differs",
                format!(
                    "parent {} is {} bytes, the child {} bytes",
                    source.name.display(),
                    parent.virtual_size(),
                    img.virtual_size()
                ),
            ));
        }
        img.parent = Some(Box::new(parent));
        return Ok(());
    }
    let want = request.id.to_string();
    if opts.missing_parent_as_zero {
        img.parent_missing = true;
        img.warnings.push(super::Warning::new(
            "parent-missing",
            format!(
                "parent {want} not found ({}); what the child leaves to it reads as zeros",
                if tried.is_empty() {
                    "no locator and no name".to_string()
                } else {
                    tried.join("; ")
                }
            ),
        ));
        return Ok(());
    }
    Err(Error::ParentNotFound {
        path: img.path.clone(),
        parent_id: want,
        tried,
        wrong_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_reduce_to_file_names_in_the_childs_folder() {
        let h = |in_dir: Option<&str>, outside: Option<&str>, name: Option<&str>| Hint {
            in_child_dir: in_dir.map(str::to_string),
            outside: outside.map(str::to_string),
            file_name: name.map(str::to_string),
        };
        let p = Some("p.vhd");
        assert_eq!(hint_targets(".\\p.vhd"), h(p, None, p));
        assert_eq!(hint_targets("p.vhd"), h(p, None, p));
        assert_eq!(
            hint_targets("C:\\Projects\\x\\p.vhd"),
            h(p, Some("C:/Projects/x/p.vhd"), p)
        );
        assert_eq!(
            hint_targets("/Users/a/p.vhd"),
            h(p, Some("/Users/a/p.vhd"), p)
        );
        assert_eq!(hint_targets("sub\\p.vhd"), h(None, Some("sub/p.vhd"), p));
        assert_eq!(
            hint_targets("..\\..\\etc\\passwd"),
            h(None, Some("../../etc/passwd"), Some("passwd"))
        );
        assert_eq!(hint_targets(".."), h(None, Some(".."), None));
        assert_eq!(hint_targets("/"), h(None, Some("/"), None));
        assert_eq!(hint_targets("C:\\"), h(None, Some("C:/"), None));
    }

    /// Both ways of opening beneath a folder: what each opens and refuses.
    #[cfg(target_os = "linux")]
    #[test]
    fn candidates_open_beneath_the_folder_with_and_without_openat2() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("p.vhd"), b"parent").unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("p.vhd", d.path().join("in")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.path().join("out")).unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", d.path().join("up")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            d.path().join("f"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let dir = Folder::open(d.path()).fd.unwrap();
        let open = |name: &str, openat2: bool| -> std::result::Result<u64, String> {
            let r = open_at(&dir, name, openat2).map_err(|e| e.to_string());
            let (_, len) = settled(File::from(r?))?;
            Ok(len)
        };
        let has_openat2 = !matches!(
            rustix::fs::openat2(
                &dir,
                "p.vhd",
                OFlags::RDONLY,
                Mode::empty(),
                rustix::fs::ResolveFlags::empty()
            ),
            Err(Errno::NOSYS) | Err(Errno::PERM)
        );
        if !has_openat2 {
            eprintln!("SKIPPED: this kernel has no openat2; only the openat fallback is tested");
        }
        for openat2 in [has_openat2, false] {
            assert_eq!(open("p.vhd", openat2), Ok(6));
            let fifo = open("f", openat2).unwrap_err();
            assert!(fifo.contains("FIFO"), "{fifo}");
            let sub = open("sub", openat2).unwrap_err();
            assert!(sub.contains("a folder, not a regular file"), "{sub}");
            for link in ["out", "up"] {
                let e = open_at(&dir, link, openat2).unwrap_err();
                // openat2: EXDEV (leaves the folder); openat: ELOOP (a link).
                let want = if openat2 { Errno::XDEV } else { Errno::LOOP };
                assert_eq!(e, want, "{link}, openat2 {openat2}");
            }
        }
        // A link inside the folder: followed by openat2 only.
        if has_openat2 {
            assert_eq!(open("in", true), Ok(6));
            assert_eq!(
                open_beneath(&dir, "out").unwrap_err(),
                "refused: a link leading out of the folder"
            );
        }
        assert_eq!(open_at(&dir, "in", false).unwrap_err(), Errno::LOOP);
        assert_eq!(open_beneath(&dir, "nothere").unwrap_err(), "not found");
    }

    #[test]
    fn locators_decode() {
        let w: Vec<u8> = ".\\p.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(decode(PlatformCode::W2ru, &w).as_deref(), Some(".\\p.vhd"));
        assert_eq!(
            decode(PlatformCode::MacX, b"file://localhost/Users/a%20b/p.vhd").as_deref(),
            Some("/Users/a b/p.vhd")
        );
        assert_eq!(decode(PlatformCode::Mac, b"alias"), None);
    }
}
