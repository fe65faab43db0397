//! Loading adapter libraries the way ARCHITECTURE.md §3 requires.
//!
//! - Each generation is *copied* to a unique path before `dlopen` (§3.3): `dlopen` of a path
//!   that is already loaded returns the old library even after the file was replaced.
//! - The low-level abi_stable path is used (§3.1): the safe loader leaks libraries and caches
//!   the first root module per type, which makes reload impossible.
//! - The layout is checked against fresh [`CheckingGlobals`] on every load (§3.2): the global
//!   cache keeps pointers into unloaded libraries and can segfault on a later check.
//! - [`open_adapter`] runs plugin code (C-ABI self-tests, globals init, the root module
//!   constructor, the manifest), so it is only ever called on an apartment thread (§3.4).

use std::{
    fs,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use abi_stable::{
    abi_stability::abi_checking::{check_layout_compatibility_with_globals, CheckingGlobals},
    library::{lib_header_from_raw_library, LibraryError, RawLibrary},
    type_layout::TypeLayout,
    StableAbi,
};
use sha2::{Digest, Sha256};
use switchboard_plugin_api::{AdapterModuleRef, BuildFlags, Manifest, ABI_VERSION};

/// Why a plugin file was refused. Every variant names the file and says why in words an
/// operator can act on; none carries a pointer into the refused library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read plugin file {file}: {reason}")]
    Unreadable { file: PathBuf, reason: String },
    #[error("cannot stage plugin file {file} for loading: {reason}")]
    Stage { file: PathBuf, reason: String },
    #[error("{file} is not a loadable library: {reason}")]
    NotALibrary { file: PathBuf, reason: String },
    #[error("{file} is a library but not a switchboard adapter (it exports no root module)")]
    NotAnAdapter { file: PathBuf },
    #[error("{file} was built with an incompatible abi_stable or C ABI: {reason}")]
    IncompatibleAbiStable { file: PathBuf, reason: String },
    #[error("{file} was built against an incompatible version of the adapter interface: {reason}")]
    IncompatibleVersion { file: PathBuf, reason: String },
    #[error("{file} was built against an incompatible adapter interface (layout check failed):\n{reason}")]
    IncompatibleLayout { file: PathBuf, reason: String },
    #[error("{file} speaks adapter ABI v{found}; this gateway speaks v{expected}")]
    AbiVersion { file: PathBuf, found: u32, expected: u32 },
    #[error("{file} was built with panic = \"abort\": a panic in it would end the gateway; build it with panic = \"unwind\" (the default)")]
    PanicAbort { file: PathBuf },
    #[error("{file}: the adapter's root module failed to initialise: {reason}")]
    InitFailed { file: PathBuf, reason: String },
    #[error("{file}: the adapter's manifest could not be read: {reason}")]
    Manifest { file: PathBuf, reason: String },
    #[error("{file} is cut short ({len} bytes; its headers need at least {needed}): an interrupted copy?")]
    Truncated { file: PathBuf, len: u64, needed: u64 },
    #[error("{file} is writable by group or others (mode {mode:o}); refusing to load from it (chmod go-w)")]
    WritableByOthers { file: PathBuf, mode: u32 },
    #[error("{file} is owned by uid {owner}, not by the gateway's user (uid {expected}) or root; refusing to load it")]
    ForeignOwner { file: PathBuf, owner: u32, expected: u32 },
    #[error("{file} changed between its check and its copy (checked {checked}, copied {copied}); it is checked again at the next scan")]
    ChangedSinceChecked { file: PathBuf, checked: String, copied: String },
}

/// An ELF file whose headers point past its end was cut short (an interrupted copy).
/// `dlopen` of such a file maps pages beyond the end and dies of SIGBUS on first touch, so it
/// is refused by reading the headers first. Other formats are left to the loader.
pub fn check_complete(file: &Path) -> Result<(), LoadError> {
    let unreadable = |e: io::Error| LoadError::Unreadable { file: file.to_path_buf(), reason: e.to_string() };
    let mut header = [0u8; 64];
    let mut reader = fs::File::open(file).map_err(unreadable)?;
    let len = reader.metadata().map_err(unreadable)?.len();
    let read = read_up_to(&mut reader, &mut header).map_err(unreadable)?;
    if read < 16 || header[..4] != *b"\x7fELF" {
        return Ok(());
    }
    let wide = header[4] == 2;
    let little = header[5] == 1;
    let need = if wide { 64 } else { 52 };
    let truncated = |needed: u64| LoadError::Truncated { file: file.to_path_buf(), len, needed };
    if read < need {
        return Err(truncated(need as u64));
    }
    let number = |at: usize, size: usize| -> u64 {
        let bytes = &header[at..at + size];
        let fold = |acc: u64, b: &u8| (acc << 8) | u64::from(*b);
        if little {
            bytes.iter().rev().fold(0, fold)
        } else {
            bytes.iter().fold(0, fold)
        }
    };
    // e_phoff, e_shoff, e_phentsize, e_phnum, e_shentsize, e_shnum
    let (phoff, shoff, phentsize, phnum, shentsize, shnum) = if wide {
        (number(32, 8), number(40, 8), number(54, 2), number(56, 2), number(58, 2), number(60, 2))
    } else {
        (number(28, 4), number(32, 4), number(42, 2), number(44, 2), number(46, 2), number(48, 2))
    };
    let needed = (phoff + phentsize * phnum).max(shoff + shentsize * shnum);
    if needed > len {
        return Err(truncated(needed));
    }
    Ok(())
}

fn read_up_to(reader: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Code that anyone else could have written is not run: the file must belong to the
/// gateway's user or root, and nobody else may write it.
pub fn check_permissions(file: &Path) -> Result<(), LoadError> {
    let meta =
        fs::metadata(file).map_err(|e| LoadError::Unreadable { file: file.to_path_buf(), reason: e.to_string() })?;
    check_owner_and_mode(file, &meta)
}

/// The plugin directory: the same rule as for its files.
pub fn check_directory(dir: &Path, meta: &fs::Metadata) -> Result<(), LoadError> {
    check_owner_and_mode(dir, meta)
}

fn check_owner_and_mode(file: &Path, meta: &fs::Metadata) -> Result<(), LoadError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(LoadError::WritableByOthers { file: file.to_path_buf(), mode });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let expected = unsafe { libc::geteuid() };
        if meta.uid() != expected && meta.uid() != 0 {
            return Err(LoadError::ForeignOwner { file: file.to_path_buf(), owner: meta.uid(), expected });
        }
    }
    Ok(())
}

/// A plugin file's content identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256_hex: String,
    pub len: u64,
}

impl FileDigest {
    pub fn short(&self) -> &str {
        &self.sha256_hex[..12]
    }
}

/// Copy `file` to `<generations_dir>/<instance>.<generation>.<sha prefix>.<ext>` (a real copy,
/// never a hard link, so a later overwrite of `file` cannot change a loaded generation).
///
/// The file is opened once (not through a symlink) and everything is taken from that open
/// file: its owner and mode, the bytes copied and the hash of what was copied, which must be
/// `checked` — the content the catalog probed. A file swapped between the check and the copy
/// is refused, not loaded unchecked. The generations directory is private (0700).
pub fn stage(
    file: &Path,
    generations_dir: &Path,
    instance: &str,
    generation: u64,
    checked: &FileDigest,
) -> Result<(PathBuf, FileDigest), LoadError> {
    let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("so");
    let copy = generations_dir.join(format!("{instance}.{generation}.{}.{extension}", checked.short()));
    let partial = copy.with_extension("partial");
    let copied = copy_privately(file, generations_dir, &partial, Sync::ToDisk)?;
    if copied != *checked {
        let _ = fs::remove_file(&partial);
        return Err(LoadError::ChangedSinceChecked {
            file: file.to_path_buf(),
            checked: checked.short().to_string(),
            copied: copied.short().to_string(),
        });
    }
    finish_copy(file, &partial, &copy)?;
    Ok((copy, copied))
}

/// Copy `file` into the private directory `dir` as `<sha256>.<ext>`, taken from one open of
/// it as [`stage`] does: the catalog probes, validates and stages from this snapshot, so
/// what is loaded is byte for byte what was checked, whatever happens to `file` meanwhile.
pub fn snapshot(file: &Path, dir: &Path) -> Result<(PathBuf, FileDigest), LoadError> {
    static PARTIALS: AtomicU64 = AtomicU64::new(0);
    let partial = dir.join(format!(".{}.{}.partial", std::process::id(), PARTIALS.fetch_add(1, Ordering::Relaxed)));
    // A snapshot lives as long as its catalog: the page cache is all it needs.
    let digest = copy_privately(file, dir, &partial, Sync::PageCacheOnly)?;
    let extension = file.extension().and_then(|e| e.to_str()).unwrap_or("so");
    let copy = dir.join(format!("{}.{extension}", digest.sha256_hex));
    finish_copy(file, &partial, &copy)?;
    Ok((copy, digest))
}

/// Whether a copy is synced to disk before it is used.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sync {
    ToDisk,
    PageCacheOnly,
}

/// Open `file` once without following a symlink, check its owner and mode on the open file,
/// and copy it to `partial` (mode 0600, in `dir`, made private), hashing what was copied.
fn copy_privately(file: &Path, dir: &Path, partial: &Path, sync: Sync) -> Result<FileDigest, LoadError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let unreadable = |e: io::Error| LoadError::Unreadable { file: file.to_path_buf(), reason: e.to_string() };
    let failed = |e: io::Error| LoadError::Stage { file: file.to_path_buf(), reason: e.to_string() };
    let mut source = fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(file).map_err(unreadable)?;
    check_owner_and_mode(file, &source.metadata().map_err(unreadable)?)?;
    fs::create_dir_all(dir).map_err(failed)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(failed)?;
    let copied = (|| {
        let mut target = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(partial)?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut len = 0u64;
        loop {
            let n = source.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
            std::io::Write::write_all(&mut target, &buffer[..n])?;
            len += n as u64;
        }
        if sync == Sync::ToDisk {
            target.sync_data()?;
        }
        let sha256_hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        io::Result::Ok(FileDigest { sha256_hex, len })
    })();
    copied.map_err(|e| {
        let _ = fs::remove_file(partial);
        failed(e)
    })
}

/// Check the copied `partial` is a whole library and rename it to `copy`.
fn finish_copy(file: &Path, partial: &Path, copy: &Path) -> Result<(), LoadError> {
    if let Err(refusal) = check_complete(partial) {
        let _ = fs::remove_file(partial);
        return Err(refusal);
    }
    fs::rename(partial, copy).map_err(|e| LoadError::Stage { file: file.to_path_buf(), reason: e.to_string() })
}

/// Libraries this process has `dlopen`ed. Each one that brings its own Rust std takes a TLS
/// key that is never given back (ARCHITECTURE.md §3.5), unloaded or not.
static LIBRARIES_OPENED: AtomicU64 = AtomicU64::new(0);

pub fn libraries_opened() -> u64 {
    LIBRARIES_OPENED.load(Ordering::Relaxed)
}

/// An adapter library opened on the current (apartment) thread.
pub struct OpenedAdapter {
    /// Dropping this `dlclose`s the library; only after the apartment thread has exited.
    pub library: RawLibrary,
    pub module: AdapterModuleRef,
    pub manifest: Manifest,
    pub build: BuildOf,
}

/// Open, check and initialise the adapter at `path`. On failure the library (when it was
/// opened at all) is handed back so that it is closed after the apartment thread exits.
pub fn open_adapter(path: &Path) -> Result<OpenedAdapter, (LoadError, Option<RawLibrary>)> {
    let file = path.to_path_buf();
    let library = RawLibrary::load_at(path).map_err(|e| (classify(&file, e), None))?;
    LIBRARIES_OPENED.fetch_add(1, Ordering::Relaxed);
    match initialise(&file, &library) {
        Ok((module, manifest, build)) => Ok(OpenedAdapter { library, module, manifest, build }),
        Err(e) => Err((e, Some(library))),
    }
}

fn initialise(file: &Path, library: &RawLibrary) -> Result<(AdapterModuleRef, Manifest, BuildOf), LoadError> {
    // SAFETY: the header is only used while `library` is open (it is dropped after the
    // apartment thread, which owns every value derived from it, has exited).
    let header = unsafe { lib_header_from_raw_library(library) }.map_err(|e| classify(file, e))?;
    let layout = header.layout().ok_or_else(|| LoadError::IncompatibleLayout {
        file: file.to_path_buf(),
        reason: "the library exports no layout information to check".into(),
    })?;
    check_layout_both_ways(layout)
        .map_err(|reason| LoadError::IncompatibleLayout { file: file.to_path_buf(), reason })?;
    // SAFETY: the layout was checked just above, against fresh checking globals.
    let module = unsafe { header.init_root_module_with_unchecked_layout::<AdapterModuleRef>() }
        .map_err(|e| classify(file, e))?;
    let manifest = (module.manifest())()
        .into_result()
        .map_err(|e| LoadError::Manifest { file: file.to_path_buf(), reason: e.to_string() })?;
    if manifest.abi_version != ABI_VERSION {
        return Err(LoadError::AbiVersion {
            file: file.to_path_buf(),
            found: manifest.abi_version,
            expected: ABI_VERSION,
        });
    }
    let build = BuildOf::module(&module);
    if build.flags.is_some_and(BuildFlags::panic_abort) {
        return Err(LoadError::PanicAbort { file: file.to_path_buf() });
    }
    Ok((module, manifest, build))
}

/// The ABI minor and build flags a library reports (v1.1 fields of its root module).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOf {
    /// 0 for a library built before the field existed (v1.0).
    pub abi_minor: u32,
    /// `None` for a library built before the field existed: a v1.0 library cannot say how it
    /// handles panics (it is taken to unwind, as v1.0 plugins were required to).
    pub flags: Option<BuildFlags>,
}

impl BuildOf {
    fn module(module: &AdapterModuleRef) -> Self {
        Self {
            abi_minor: module.abi_minor().map_or(0, |minor| minor()),
            flags: module.build_flags().map(|flags| flags()),
        }
    }
}

/// A library whose interface is the host's or a later minor's passes abi_stable's check as it
/// is (the library's types may be larger); one built against an earlier minor passes it the
/// other way round (the host's types are the larger). Either is safe under the evolution rules
/// (docs/abi-evolution.md): optional module fields are read through the library's own field
/// bits, appended trait methods fall back to their default bodies, and the host never sends an
/// older library a variant it does not know. Anything else is refused with the forward
/// check's explanation (the host's view, which is what an operator compares).
fn check_layout_both_ways(library: &'static TypeLayout) -> Result<(), String> {
    let host = <AdapterModuleRef as StableAbi>::LAYOUT;
    match check_layout_compatibility_with_globals(host, library, &CheckingGlobals::new()) {
        Ok(()) => Ok(()),
        Err(forward) => match check_layout_compatibility_with_globals(library, host, &CheckingGlobals::new()) {
            Ok(()) => Ok(()),
            Err(_) => Err(forward.to_string()),
        },
    }
}

/// Turn abi_stable's error into ours, formatting it to an owned string right away: its
/// `Display` may follow pointers into the library, which is about to be closed.
fn classify(file: &Path, error: LibraryError) -> LoadError {
    let file = file.to_path_buf();
    let reason = error.to_string();
    match error {
        LibraryError::OpenError { .. } => LoadError::NotALibrary { file, reason: first_line(&reason) },
        LibraryError::GetSymbolError { .. } => LoadError::NotAnAdapter { file },
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            LoadError::IncompatibleAbiStable { file, reason }
        }
        LibraryError::ParseVersionError(_) | LibraryError::IncompatibleVersionNumber { .. } => {
            LoadError::IncompatibleVersion { file, reason }
        }
        LibraryError::AbiInstability(_) => LoadError::IncompatibleLayout { file, reason },
        LibraryError::RootModule { .. } => LoadError::InitFailed { file, reason },
        _ => LoadError::InitFailed { file, reason },
    }
}

fn first_line(text: &str) -> String {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ")
}

/// Whether `path` is still mapped into this process (Linux: `/proc/self/maps`).
/// `None` where the platform has no way to tell.
pub fn is_mapped(path: &Path) -> Option<bool> {
    let maps = fs::read_to_string("/proc/self/maps").ok()?;
    let needle = path.to_string_lossy();
    Some(maps.lines().any(|line| line.ends_with(needle.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_cut_short_is_recognised_and_a_whole_one_passes() {
        let me = std::env::current_exe().unwrap();
        check_complete(&me).expect("this test binary is whole");
        let bytes = fs::read(&me).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.so");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(check_complete(&cut), Err(LoadError::Truncated { .. })), "{:?}", check_complete(&cut));
        let text = dir.path().join("text.so");
        fs::write(&text, b"not an ELF file").unwrap();
        assert!(check_complete(&text).is_ok(), "other formats are left to the loader");
    }

    #[test]
    fn staging_copies_exactly_what_was_checked_into_a_private_directory() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adapter.so");
        fs::write(&file, b"not really a library, but bytes to copy").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let (snapshotted, checked) = snapshot(&file, &dir.path().join("snapshots")).unwrap();
        assert_eq!(fs::read(&snapshotted).unwrap(), fs::read(&file).unwrap());
        assert_eq!(fs::metadata(&snapshotted).unwrap().permissions().mode() & 0o777, 0o600);
        let generations = dir.path().join("generations");
        let (copy, copied) = stage(&file, &generations, "mm", 1, &checked).unwrap();
        assert_eq!(copied, checked);
        assert_eq!(fs::read(&copy).unwrap(), fs::read(&file).unwrap());
        assert_eq!(fs::metadata(&generations).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(&copy).unwrap().permissions().mode() & 0o777, 0o600);

        // Swapped after the check: refused, and nothing is left behind.
        fs::write(&file, b"other bytes, written after the probe").unwrap();
        let refused = stage(&file, &generations, "mm", 2, &checked);
        assert!(matches!(refused, Err(LoadError::ChangedSinceChecked { .. })), "{refused:?}");
        assert_eq!(fs::read_dir(&generations).unwrap().count(), 1, "only generation 1's copy");

        // A symlink is not followed.
        let link = dir.path().join("link.so");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let (_, checked) = snapshot(&file, &dir.path().join("snapshots")).unwrap();
        assert!(matches!(snapshot(&link, &dir.path().join("snapshots")), Err(LoadError::Unreadable { .. })));
        assert!(matches!(stage(&link, &generations, "mm", 3, &checked), Err(LoadError::Unreadable { .. })));
    }

    /// Random files where a plugin should be: byte soup, a real library cut anywhere, ELF
    /// headers with random bytes after them. The checks that run before any `dlopen` never
    /// panic and say what they refuse.
    mod randomized {
        use proptest::prelude::*;

        use super::super::{check_complete, snapshot};

        fn file_bytes() -> impl Strategy<Value = Vec<u8>> {
            let library = std::fs::read(std::env::current_exe().unwrap()).unwrap();
            let len = library.len();
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..4096),
                (0..len).prop_map(move |cut| library[..cut].to_vec()),
                prop::collection::vec(any::<u8>(), 0..512).prop_map(|tail| {
                    let mut bytes = b"\x7fELF\x02\x01\x01\x00".to_vec();
                    bytes.extend(tail);
                    bytes
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn no_file_makes_the_checks_panic(bytes in file_bytes()) {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("random.so");
                std::fs::write(&file, &bytes).unwrap();
                let snapshots = dir.path().join("snapshots");
                let checked = std::panic::catch_unwind(|| (check_complete(&file), snapshot(&file, &snapshots)));
                prop_assert!(checked.is_ok());
                if let Ok((Err(refusal), _)) = checked {
                    prop_assert!(!refusal.to_string().is_empty());
                }
            }
        }
    }
}
