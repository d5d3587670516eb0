//! Parent resolvers: one the caller supplies (serving parents from
//! memory, refusing, or handing back the wrong disk), and the default,
//! which keeps the folder rules.

use crate::make_testdata::{self, Fixture};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use vhdkit::ondisk::PlatformCode;
use vhdkit::{
    Error, FolderResolver, Image, MemoryStorage, OpenOptions, ParentId, ParentRequest,
    ParentResolver, ParentSource,
};

/// What a resolver was asked, kept for the test to look at.
#[derive(Debug, Clone, PartialEq)]
struct Asked {
    id: ParentId,
    hints: Vec<(String, String)>,
    parent_name: Option<String>,
    child_path: Option<PathBuf>,
    depth: usize,
}

impl Asked {
    fn of(r: &ParentRequest<'_>) -> Asked {
        Asked {
            id: r.parent_id(),
            hints: r
                .hints()
                .iter()
                .map(|h| (h.source.clone(), h.path.clone()))
                .collect(),
            parent_name: r.parent_name().map(str::to_string),
            child_path: r.child_path().map(Path::to_path_buf),
            depth: r.depth(),
        }
    }
}

/// Serves parents from memory by the identity asked for, and records the
/// requests.
#[derive(Debug, Default)]
struct InMemory {
    disks: Vec<(ParentId, &'static str, Vec<u8>)>,
    /// Shared with the test, which keeps a clone.
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl ParentResolver for InMemory {
    fn resolve(&self, request: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
        self.asked.lock().unwrap().push(Asked::of(request));
        for (id, name, bytes) in &self.disks {
            if *id == request.parent_id() {
                let s = ParentSource::new(*name, MemoryStorage::new(bytes.clone()));
                return Ok(Some(s.found_by("the in-memory table")));
            }
        }
        request.note("not in the in-memory table");
        Ok(None)
    }
}

/// Refuses every parent.
#[derive(Debug)]
struct Refuse;

impl ParentResolver for Refuse {
    fn resolve(&self, request: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
        request.note("refused by policy");
        Ok(None)
    }
}

/// Hands back `bytes` whatever is asked.
#[derive(Debug)]
struct Always(Vec<u8>);

impl ParentResolver for Always {
    fn resolve(&self, _: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
        Ok(Some(ParentSource::new(
            "always.vhd",
            MemoryStorage::new(self.0.clone()),
        )))
    }
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.virtual_size() as usize];
    img.read_exact_at(&mut v, 0).unwrap();
    v
}

fn expected(chain: &[Fixture]) -> Vec<u8> {
    make_testdata::content(chain, &chain[chain.len() - 1].name)
}

fn not_found(r: vhdkit::Result<Image>) -> (String, Vec<String>, Vec<PathBuf>) {
    match r {
        Err(Error::ParentNotFound {
            parent_id,
            tried,
            wrong_id,
            ..
        }) => (parent_id, tried, wrong_id),
        Err(e) => panic!("expected ParentNotFound, got {e:?}"),
        Ok(img) => panic!(
            "expected ParentNotFound, opened with parent {:?}",
            img.parent().map(|p| p.path().to_path_buf())
        ),
    }
}

fn uid(f: &Fixture) -> ParentId {
    ParentId::Vhd(f.unique_id)
}

#[test]
fn a_custom_resolver_serves_a_chain_of_vhd_parents_from_memory() {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child_with(
        "c.vhd",
        &base,
        "base.vhd",
        &[(PlatformCode::W2ru, ".\\base.vhd")],
    );
    let grand = make_testdata::chain_child_with("g.vhd", &child, "c.vhd", &[]);
    let resolver = InMemory {
        disks: vec![
            (uid(&base), "base (memory)", base.bytes.clone()),
            (uid(&child), "child (memory)", child.bytes.clone()),
        ],
        ..Default::default()
    };
    let asked = Arc::clone(&resolver.asked);
    let opts = OpenOptions::new().parent_resolver(resolver);
    let img = Image::from_storage(MemoryStorage::new(grand.bytes.clone()), &opts).unwrap();
    let chain = img.chain();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1].path(), Path::new("child (memory)"));
    assert_eq!(chain[2].path(), Path::new("base (memory)"));
    assert_eq!(
        read_all(&img),
        expected(&[base.clone(), child.clone(), grand.clone()])
    );
    // What the resolver was told: the identity, the locators, the name; no
    // path for a child in memory; one request per link of the chain.
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(asked[0].id, uid(&child));
    assert_eq!(asked[0].parent_name.as_deref(), Some("c.vhd"));
    assert!(asked[0].hints.is_empty(), "{asked:?}");
    assert_eq!(asked[0].child_path, None);
    assert_eq!(asked[0].depth, 0);
    assert_eq!(asked[1].id, uid(&base));
    assert_eq!(
        asked[1].hints,
        vec![(
            "parent locator 0 (W2ru)".to_string(),
            ".\\base.vhd".to_string()
        )]
    );
    assert_eq!(asked[1].parent_name.as_deref(), Some("base.vhd"));
    assert_eq!(asked[1].depth, 1);

    // A child on disk: the resolver is told its path, and the folder beside
    // it (which holds a parent the default would take) is not looked at.
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("c.vhd");
    std::fs::write(&cp, &child.bytes).unwrap();
    std::fs::write(dir.path().join("base.vhd"), &base.bytes).unwrap();
    assert!(Image::open(&cp).unwrap().parent().is_some());
    let only_memory = InMemory {
        disks: vec![(uid(&base), "base (memory)", base.bytes.clone())],
        ..Default::default()
    };
    let asked = Arc::clone(&only_memory.asked);
    let img = Image::open_with(&cp, &OpenOptions::new().parent_resolver(only_memory)).unwrap();
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].child_path.as_deref(), Some(cp.as_path()));
    assert_eq!(img.parent().unwrap().path(), Path::new("base (memory)"));
    assert_eq!(read_all(&img), expected(&[base, child]));
}

#[test]
fn a_resolver_that_refuses_leaves_the_parent_not_found() {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child_with(
        "c.vhd",
        &base,
        "base.vhd",
        &[(PlatformCode::W2ru, ".\\base.vhd")],
    );
    // The parent is beside the child, where the default finds it.
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("c.vhd");
    std::fs::write(&cp, &child.bytes).unwrap();
    std::fs::write(dir.path().join("base.vhd"), &base.bytes).unwrap();
    assert!(Image::open(&cp).unwrap().parent().is_some());
    let (id, tried, wrong) = not_found(Image::open_with(
        &cp,
        &OpenOptions::new().parent_resolver(Refuse),
    ));
    assert_eq!(id, base.unique_id.to_string());
    assert_eq!(tried, vec!["refused by policy".to_string()]);
    assert!(wrong.is_empty());
    // Options naming the parent do not override the resolver.
    let opts = OpenOptions::new()
        .parent(dir.path().join("base.vhd"))
        .parent_resolver(Refuse);
    not_found(Image::open_with(&cp, &opts));
    // Read as zeros when asked, with the resolver's reason in the warning.
    let img = Image::open_with(&cp, &opts.missing_parent_as_zero(true)).unwrap();
    assert!(img.parent_missing());
    assert!(
        img.warnings()
            .iter()
            .any(|w| w.message.contains("refused by policy")),
        "{:?}",
        img.warnings()
    );
}

#[test]
fn what_a_resolver_returns_is_checked_before_it_is_used() {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child_with("c.vhd", &base, "base.vhd", &[]);
    let other = make_testdata::chain_child_with("o.vhd", &child, "c.vhd", &[]);
    // A disk with another unique id: not taken.
    let (id, tried, wrong) = not_found(Image::from_storage(
        MemoryStorage::new(child.bytes.clone()),
        &OpenOptions::new().parent_resolver(Always(other.bytes.clone())),
    ));
    assert_eq!(id, base.unique_id.to_string());
    assert_eq!(wrong, vec![PathBuf::from("always.vhd")]);
    assert_eq!(tried.len(), 1, "{tried:?}");
    assert!(
        tried[0].contains("always.vhd has unique id") && tried[0].contains(&id),
        "{tried:?}"
    );
    // Bytes that are no image at all: not taken either.
    let (_, tried, _) = not_found(Image::from_storage(
        MemoryStorage::new(child.bytes.clone()),
        &OpenOptions::new().parent_resolver(Always(vec![0u8; 4096])),
    ));
    assert!(tried.iter().any(|t| t.contains("always.vhd")), "{tried:?}");
    // The child itself as its own parent: a loop, or another id; never a
    // parent.
    let r = Image::from_storage(
        MemoryStorage::new(child.bytes.clone()),
        &OpenOptions::new().parent_resolver(Always(child.bytes.clone())),
    );
    assert!(r.is_err(), "{r:?}");
}

#[test]
fn a_differencing_vhdx_finds_its_parent_through_the_resolver() {
    let (child, _) = crate::vhdx::differencing(512);
    let (parent, parent_disk) = crate::vhdx::diff_parent(crate::vhdx::PARENT_GUID);
    let resolver = InMemory {
        disks: vec![(
            ParentId::Vhdx(vhdkit::vhdx::Guid::parse(crate::vhdx::PARENT_GUID).unwrap()),
            "base.vhdx (memory)",
            parent.clone(),
        )],
        ..Default::default()
    };
    let asked = Arc::clone(&resolver.asked);
    let img = Image::from_storage(
        MemoryStorage::new(child.clone()),
        &OpenOptions::new().parent_resolver(resolver),
    )
    .unwrap();
    assert_eq!(img.chain().len(), 2);
    assert_eq!(
        img.parent().unwrap().path(),
        Path::new("base.vhdx (memory)")
    );
    // Asked once, with the locator's paths in the specification's order
    // and no parent name (a VHDX has none).
    let asked = asked.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(asked[0].id.to_string(), crate::vhdx::PARENT_GUID);
    assert_eq!(
        asked[0].hints,
        vec![
            (
                "parent locator relative_path".to_string(),
                "..\\base.vhdx".to_string()
            ),
            (
                "parent locator absolute_win32_path".to_string(),
                "C:\\vms\\base.vhdx".to_string()
            ),
        ]
    );
    assert_eq!(asked[0].parent_name, None);
    assert_eq!(asked[0].child_path, None);
    // Block 2 is left to the parent, which holds zeros there; block 1 is
    // partly the child's. Where the child defines nothing the parent shows.
    let all = read_all(&img);
    let mib = 1usize << 20;
    assert_eq!(&all[2 * mib..], &parent_disk[2 * mib..]);
    assert_eq!(
        &all[mib + 8 * 512..mib + 100 * 512],
        &parent_disk[mib + 8 * 512..mib + 100 * 512]
    );
    // Refused: not found, named by the data write GUID asked for.
    let (id, tried, _) = not_found(Image::from_storage(
        MemoryStorage::new(child),
        &OpenOptions::new().parent_resolver(Refuse),
    ));
    assert_eq!(id, crate::vhdx::PARENT_GUID);
    assert_eq!(tried, vec!["refused by policy".to_string()]);
}

#[test]
fn the_default_resolver_keeps_the_folder_rules_when_set_explicitly() {
    let base = make_testdata::chain_base();
    let root = tempfile::tempdir().unwrap();
    let (kids, elsewhere) = (root.path().join("kids"), root.path().join("elsewhere"));
    std::fs::create_dir(&kids).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let abs = elsewhere.join("base.vhd");
    std::fs::write(&abs, &base.bytes).unwrap();
    let abs_s = abs.display().to_string();
    let child =
        make_testdata::chain_child_with("c.vhd", &base, "", &[(PlatformCode::W2ku, &abs_s)]);
    let cp = kids.join("c.vhd");
    std::fs::write(&cp, &child.bytes).unwrap();
    // The locator names the parent by its absolute path in another folder:
    // refused unseen by default, and by a FolderResolver set explicitly.
    for opts in [
        OpenOptions::new(),
        OpenOptions::new().parent_resolver(FolderResolver::new()),
    ] {
        let (_, tried, _) = not_found(Image::open_with(&cp, &opts));
        assert!(
            tried
                .iter()
                .any(|t| t.contains("refused without looking at it")),
            "{tried:?}"
        );
    }
    // Allowed folders and named files work through either.
    for opts in [
        OpenOptions::new().parent_dir(&elsewhere),
        OpenOptions::new().parent_resolver(FolderResolver::new().parent_dir(&elsewhere)),
        OpenOptions::new().parent_resolver(FolderResolver::new().parent(&abs)),
        OpenOptions::new().parent_resolver(
            FolderResolver::new().parent_storage("mem", MemoryStorage::new(base.bytes.clone())),
        ),
    ] {
        let img = Image::open_with(&cp, &opts).unwrap();
        assert_eq!(read_all(&img), expected(&[base.clone(), child.clone()]));
    }
}

/// Offers each of its disks to `try_parent` in turn and returns the first
/// it accepts.
#[derive(Debug)]
struct FirstAccepted(Vec<(&'static str, Vec<u8>)>);

impl ParentResolver for FirstAccepted {
    fn resolve(&self, request: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
        for (name, bytes) in &self.0 {
            let c = ParentSource::new(*name, MemoryStorage::new(bytes.clone()))
                .found_by("the candidate list");
            if request.try_parent(&c)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }
}

#[test]
fn a_resolver_with_several_candidates_takes_the_first_try_parent_accepts() {
    let base = make_testdata::chain_base();
    let child = make_testdata::chain_child_with("c.vhd", &base, "base.vhd", &[]);
    // A disk of another unique id (a sibling of the child).
    let stranger = make_testdata::chain_child_with("s.vhd", &base, "", &[]);
    let resolver = FirstAccepted(vec![
        ("garbage", vec![0u8; 2048]),
        ("stranger", stranger.bytes.clone()),
        ("base", base.bytes.clone()),
    ]);
    let img = Image::from_storage(
        MemoryStorage::new(child.bytes.clone()),
        &OpenOptions::new().parent_resolver(resolver),
    )
    .unwrap();
    assert_eq!(img.parent().unwrap().path(), Path::new("base"));
    assert_eq!(read_all(&img), expected(&[base.clone(), child.clone()]));
    // Without the right one: every refusal is listed, the wrong id named.
    let resolver = FirstAccepted(vec![
        ("garbage", vec![0u8; 2048]),
        ("stranger", stranger.bytes.clone()),
    ]);
    let (_, tried, wrong) = not_found(Image::from_storage(
        MemoryStorage::new(child.bytes.clone()),
        &OpenOptions::new().parent_resolver(resolver),
    ));
    // (Bytes that are no VHD open as raw, whose unique id is nil.)
    assert_eq!(
        wrong,
        vec![PathBuf::from("garbage"), PathBuf::from("stranger")]
    );
    assert_eq!(tried.len(), 2, "{tried:?}");
    assert!(
        tried[0].starts_with("the candidate list: garbage has unique id 00000000-"),
        "{tried:?}"
    );
    assert!(
        tried[1].starts_with("the candidate list: stranger has unique id"),
        "{tried:?}"
    );
}

/// Hands back the same storage whatever is asked.
#[derive(Debug)]
struct Same(Arc<dyn vhdkit::Storage>);

impl ParentResolver for Same {
    fn resolve(&self, _: &ParentRequest<'_>) -> vhdkit::Result<Option<ParentSource>> {
        Ok(Some(ParentSource::shared("same", Arc::clone(&self.0))))
    }
}

#[test]
fn a_resolver_that_closes_a_loop_gets_the_loop_error() {
    // A differencing disk that names itself as its parent.
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/regressions/differencing-its-own-parent.vhd"),
    )
    .unwrap();
    let same: Arc<dyn vhdkit::Storage> = Arc::new(MemoryStorage::new(bytes.clone()));
    let r = Image::from_storage(
        MemoryStorage::new(bytes),
        &OpenOptions::new().parent_resolver(Same(same)),
    );
    match r {
        Err(Error::Corrupt(c)) => {
            assert_eq!(c.structure, vhdkit::error::Structure::ParentChain, "{c:?}")
        }
        other => panic!("expected a loop in the parent chain, got {other:?}"),
    }
}
