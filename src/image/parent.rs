//! Finding the parent of a differencing disk, through a gate.
//!
//! Candidates, in order: files the caller named; the parent locators
//! (`W2ru`, `W2ku`, `MacX`, then the deprecated `Wi2r`/`Wi2k`); the parent's
//! unicode name. A path from the image is only a hint: relative paths are
//! taken against the child's folder, absolute ones are reduced to their file
//! name in the child's folder (POSIX absolute paths from `MacX` are tried as
//! they are too), every hint's file name is also looked for in the folders
//! the caller allowed, and a candidate is opened only if it lies, after
//! resolving links, in the child's folder, a folder the caller allowed, or is
//! a file the caller named. A hostile image cannot make vhdkit open anything else.
//! The parent's unique id must equal the child's header's parent unique id;
//! depth is limited and loops are refused.

use super::{Image, OpenOptions};
use crate::error::{Error, Result, Structure};
use crate::io::ReadAt;
use crate::ondisk::PlatformCode;
use std::path::{Path, PathBuf};

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

/// Paths to try for one hint, relative to the child's folder.
pub(crate) fn candidates(hint: &str, child_dir: &Path) -> Vec<PathBuf> {
    let unified = hint.replace('\\', "/");
    let is_windows_abs =
        unified.len() >= 2 && unified.as_bytes()[1] == b':' || unified.starts_with("//");
    let mut v = Vec::new();
    if unified.starts_with('/') && !unified.starts_with("//") {
        v.push(PathBuf::from(&unified));
    }
    if is_windows_abs || unified.starts_with('/') {
        if let Some(name) = unified.rsplit('/').next().filter(|n| !n.is_empty()) {
            v.push(child_dir.join(name));
        }
    } else {
        v.push(child_dir.join(&unified));
    }
    v
}

/// The state of one walk up a parent chain.
#[derive(Debug, Default)]
pub(crate) struct Walk {
    /// The differencing disks being resolved, child first: a candidate
    /// parent with the right unique id that is already here is a loop.
    pub(crate) path: Vec<PathBuf>,
    /// Candidates whose own parents could not be resolved. Resolving them
    /// again cannot succeed, so each is walked at most once: a folder of
    /// hostile images that name each other costs time in proportion to
    /// their number, not to the number of paths through them.
    pub(crate) failed: Vec<PathBuf>,
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
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
            what: "parent chain depth",
            value: depth as u64 + 1,
            limit: opts.max_chain_depth as u64,
        });
    }
    let header = img.header.clone().expect("differencing image has a header");
    let want = header.parent_unique_id;
    let child_dir = img
        .path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                Path::new(".")
            } else {
                p
            }
        })
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let named: Vec<PathBuf> = opts.parents.iter().map(|p| canon(p)).collect();
    let mut allowed_dirs = vec![canon(&child_dir)];
    allowed_dirs.extend(opts.parent_dirs.iter().map(|d| canon(d)));

    // Hints in order of preference.
    let mut hints: Vec<(String, String)> = Vec::new();
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
            if ReadAt::read_exact_at(&img.file, &mut data, l.data_offset).is_err() {
                tried.push(format!("{}: unreadable", Structure::ParentLocator(i)));
                continue;
            }
            if let Some(s) = decode(code, &data) {
                hints.push((format!("{} ({:?})", Structure::ParentLocator(i), code), s));
            }
        }
    }
    let name = header.parent_name();
    if !name.is_empty() {
        hints.push(("parent unicode name".to_string(), name));
    }

    // Named files first: they need no gate.
    let mut paths: Vec<(String, PathBuf)> = opts
        .parents
        .iter()
        .map(|p| ("named by the caller".to_string(), p.clone()))
        .collect();
    for (source, hint) in &hints {
        for c in candidates(hint, &child_dir) {
            paths.push((format!("{source} {hint:?}"), c));
        }
        // A folder the caller allowed is also searched for the file name,
        // so that a parent moved there is found.
        let unified = hint.replace('\\', "/");
        let file_name = unified
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..");
        if let Some(name) = file_name {
            for dir in &opts.parent_dirs {
                paths.push((
                    format!("{source} {hint:?} in an allowed folder"),
                    dir.join(name),
                ));
            }
        }
    }

    // Parents are opened read-only and detected, whatever was asked of the child.
    let popts = OpenOptions {
        format: None,
        writable: false,
        shallow: false,
        ..opts.clone()
    };
    let alone = OpenOptions {
        shallow: true,
        ..popts.clone()
    };
    let mut seen: Vec<PathBuf> = Vec::new();
    let mut wrong_id: Vec<PathBuf> = Vec::new();
    for (source, p) in paths {
        let real = match std::fs::canonicalize(&p) {
            Ok(r) => r,
            Err(_) => {
                tried.push(format!("{}: {} not found", source, p.display()));
                continue;
            }
        };
        if seen.contains(&real) {
            continue;
        }
        seen.push(real.clone());
        let is_named = named.contains(&real);
        let dir_ok = real
            .parent()
            .is_some_and(|d| allowed_dirs.iter().any(|a| a == d));
        if !is_named && !dir_ok {
            tried.push(format!(
                "{}: {} refused (outside the child's folder and the allowed folders)",
                source,
                real.display()
            ));
            continue;
        }
        if walk.failed.contains(&real) {
            tried.push(format!(
                "{}: {} was tried already and its own parent was not found",
                source,
                real.display()
            ));
            continue;
        }
        // The candidate alone first: its unique id decides whether it is the
        // parent, before any of its own parents is looked for. (A file the
        // caller named for another link of the chain is passed over here.)
        let mut parent = match Image::open_level(&real, &alone, depth + 1, walk) {
            Ok(p) => p,
            Err(e) => {
                tried.push(format!(
                    "{}: {} could not be opened: {e}",
                    source,
                    real.display()
                ));
                continue;
            }
        };
        let got = parent.footer().map(|f| f.unique_id).unwrap_or_default();
        if got != want {
            wrong_id.push(real.clone());
            tried.push(format!(
                "{}: {} has unique id {got}, not {want}",
                source,
                real.display()
            ));
            continue;
        }
        if parent.format == super::Format::Raw {
            tried.push(format!("{}: {} is not a VHD", source, real.display()));
            continue;
        }
        if walk.path.contains(&real) {
            return Err(Error::corrupt(
                Structure::ParentChain,
                "parent unique id",
                img.header_offset + crate::ondisk::header_fields::PARENT_UNIQUE_ID as u64,
                format!("a loop back to {}", real.display()),
                "a chain that ends in a non-differencing disk",
            )
            .with_path(&img.path));
        }
        if parent.format == super::Format::Differencing {
            walk.path.push(real.clone());
            let r = resolve(&mut parent, &popts, depth + 1, walk);
            walk.path.pop();
            match r {
                Ok(()) => {}
                Err(e @ (Error::Limit { .. } | Error::Corrupt(_)))
                    if matches!(&e, Error::Limit { .. })
                        || matches!(&e, Error::Corrupt(c) if c.structure == Structure::ParentChain) =>
                {
                    return Err(e)
                }
                Err(e) => {
                    walk.failed.push(real.clone());
                    tried.push(format!(
                        "{}: {} could not be opened: {e}",
                        source,
                        real.display()
                    ));
                    continue;
                }
            }
        }
        if parent.virtual_size() != img.virtual_size() {
            img.warnings.push(format!(
                "parent {} is {} bytes, the child {} bytes",
                real.display(),
                parent.virtual_size(),
                img.virtual_size()
            ));
        }
        img.parent = Some(Box::new(parent));
        return Ok(());
    }
    if opts.missing_parent_as_zero {
        img.parent_missing = true;
        img.warnings.push(format!(
            "parent {want} not found ({}); what the child leaves to it reads as zeros",
            if tried.is_empty() {
                "no locator and no name".to_string()
            } else {
                tried.join("; ")
            }
        ));
        return Ok(());
    }
    Err(Error::ParentNotFound {
        path: img.path.clone(),
        parent_id: want.to_string(),
        tried,
        wrong_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_reduce_to_the_childs_folder() {
        let d = Path::new("/imgs");
        assert_eq!(
            candidates(".\\fat-parent.vhd", d),
            vec![PathBuf::from("/imgs/./fat-parent.vhd")]
        );
        assert_eq!(
            candidates("C:\\Projects\\x\\fat-parent.vhd", d),
            vec![PathBuf::from("/imgs/fat-parent.vhd")]
        );
        assert_eq!(
            candidates("/Users/a/base.vhd", d),
            vec![
                PathBuf::from("/Users/a/base.vhd"),
                PathBuf::from("/imgs/base.vhd")
            ]
        );
        assert_eq!(
            candidates("sub\\p.vhd", d),
            vec![PathBuf::from("/imgs/sub/p.vhd")]
        );
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
