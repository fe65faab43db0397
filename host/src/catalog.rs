//! The plugin catalog: which adapter files are in the plugin directory, by manifest name.
//!
//! Files are probed, and adapter configs validated, in a short-lived child process
//! (`switchboard check-plugin`): loading a library costs the loading process a TLS key for
//! good (ARCHITECTURE.md §3.5), and a broken file should never be able to take the gateway
//! down. Only a generation that is going to run is loaded into the gateway itself.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::{
    apartment::Apartment,
    loader::{self, FileDigest},
};

/// A plugin's manifest, as reported by a probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestInfo {
    pub adapter_name: String,
    pub adapter_version: String,
    pub abi_version: u32,
    /// The ABI minor the library was built against (0: v1.0, which could not say).
    #[serde(default)]
    pub abi_minor: u32,
    pub build: String,
}

/// One problem an adapter found in its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub key_path: String,
    pub message: String,
}

/// What `switchboard check-plugin` prints (one JSON document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginReport {
    pub file: PathBuf,
    pub manifest: Option<ManifestInfo>,
    /// Why the file was refused, if it was.
    pub error: Option<String>,
    /// The problems found in each config passed with `--validate`, in order.
    pub validations: Vec<Vec<Problem>>,
}

/// How long the probe gives the library to load and each call to return (the gateway's
/// probe timeout, which kills the probe process, is longer).
const PROBE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Probe `file` in this process and validate `configs` with it; the body of
/// `switchboard check-plugin`. Loads the file on an apartment, as the gateway would.
pub fn check_plugin(file: &Path, configs: &[String]) -> PluginReport {
    let mut report = PluginReport { file: file.to_path_buf(), manifest: None, error: None, validations: Vec::new() };
    let apartment = match Apartment::open(file, "check-plugin".into(), PROBE_CALL_TIMEOUT) {
        Ok(apartment) => apartment,
        Err(e) => {
            report.error = Some(e.to_string());
            return report;
        }
    };
    let m = &apartment.manifest;
    report.manifest = Some(ManifestInfo {
        adapter_name: m.adapter_name.to_string(),
        adapter_version: m.adapter_version.to_string(),
        abi_version: m.abi_version,
        abi_minor: apartment.build.abi_minor,
        build: m.build.to_string(),
    });
    let configs = configs.to_vec();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build();
    let outcome = match runtime {
        Ok(rt) => rt.block_on(
            apartment.run(move |resident| configs.iter().map(|c| resident.validate_config(c)).collect::<Vec<_>>()),
        ),
        Err(_) => Err(crate::apartment::ApartmentGone::Gone),
    };
    match outcome {
        Ok(results) => {
            for result in results {
                match result {
                    Ok(problems) => report
                        .validations
                        .push(problems.into_iter().map(|(key_path, message)| Problem { key_path, message }).collect()),
                    Err(e) => {
                        report.error = Some(format!("validate_config failed: {e}"));
                        break;
                    }
                }
            }
        }
        Err(e) => report.error = Some(e.to_string()),
    }
    report
}

/// What tells a file's content may have changed without reading it: a new inode (a build
/// renamed into place), a size, an mtime, or a ctime (which no copy tool can set back:
/// `cp -p`, `rsync -a` and `install -p` keep the mtime, and Nix store files all have mtime 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A file in the plugin directory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    /// The private copy of `path` that was hashed, probed and validated; generations are
    /// staged from it, so a file changed after the check cannot be loaded unchecked.
    pub snapshot: PathBuf,
    pub digest: FileDigest,
    pub stamp: FileStamp,
    /// The manifest, or why the file was refused.
    pub probe: Result<ManifestInfo, String>,
}

/// Why no usable plugin file provides an adapter name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FindError {
    #[error("no adapter named {name:?} in {dir} ({}){}", found_note(.found), refused_note(.refused))]
    NotFound {
        name: String,
        dir: PathBuf,
        /// The adapters the directory does provide: `<name> in <file name>`.
        found: Vec<String>,
        refused: Vec<String>,
    },
    #[error("more than one file in {dir} provides adapter {name:?}: {}", .files.join(", "))]
    Ambiguous { name: String, dir: PathBuf, files: Vec<String> },
}

/// A plugin is named by its manifest, not its file name: say which names there are.
fn found_note(found: &[String]) -> String {
    if found.is_empty() {
        "no adapter files there: plugins are found by the adapter name in their manifest".into()
    } else {
        format!("plugins are found by the adapter name in their manifest; there: {}", found.join(", "))
    }
}

fn refused_note(refused: &[String]) -> String {
    if refused.is_empty() {
        String::new()
    } else {
        format!(" (refused files: {})", refused.join("; "))
    }
}

/// The plugin directory as last scanned. A file is hashed again when its [`FileStamp`] changed;
/// probes are cached by hash.
#[derive(Debug)]
pub struct Catalog {
    dir: PathBuf,
    /// The `switchboard` executable that runs the child-process probes.
    exe: PathBuf,
    entries: BTreeMap<PathBuf, Entry>,
    probe_timeout: Duration,
    /// Probe results by file content (SHA-256).
    probes: HashMap<String, Result<ManifestInfo, String>>,
    /// Validation results by file content and config.
    validations: HashMap<(String, String), Vec<Problem>>,
    /// Why the directory itself was refused at the last scan.
    dir_refused: Option<String>,
    /// Where this catalog keeps its snapshots (private; removed with the catalog).
    snapshots: tempfile::TempDir,
}

impl Catalog {
    /// A catalog of `dir` whose probes run `exe`; its snapshots go into a private directory
    /// of its own under `snapshots_in`.
    pub fn new(dir: PathBuf, exe: PathBuf, snapshots_in: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(snapshots_in)?;
        let snapshots = tempfile::Builder::new().prefix("catalog-").tempdir_in(snapshots_in)?;
        Ok(Self {
            dir,
            exe,
            entries: BTreeMap::new(),
            probe_timeout: Duration::from_secs(20),
            probes: HashMap::new(),
            validations: HashMap::new(),
            dir_refused: None,
            snapshots,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Re-read the directory, probing new and changed files. Returns the files refused in
    /// this scan (path, reason) so the caller can log them.
    pub async fn scan(&mut self) -> Result<Vec<(PathBuf, String)>, std::io::Error> {
        let mut seen = BTreeMap::new();
        let mut refused = Vec::new();
        // Whoever may write the directory may swap a build in: it must be as guarded as the
        // files (owned by the gateway's user or root, not writable by group or others).
        let dir_meta = tokio::fs::metadata(&self.dir).await?;
        if let Err(refusal) = loader::check_directory(&self.dir, &dir_meta) {
            self.entries.clear();
            self.dir_refused = Some(refusal.to_string());
            refused.push((self.dir.clone(), refusal.to_string()));
            return Ok(refused);
        }
        self.dir_refused = None;
        let mut reader = tokio::fs::read_dir(&self.dir).await?;
        while let Some(item) = reader.next_entry().await? {
            let path = item.path();
            if !is_candidate(&path) {
                continue;
            }
            let Ok(meta) = item.metadata().await else { continue };
            if !meta.is_file() {
                continue;
            }
            if let Err(refusal) = loader::check_permissions(&path).and_then(|()| loader::check_complete(&path)) {
                refused.push((path.clone(), refusal.to_string()));
                continue;
            }
            let stamp = FileStamp::of(&meta);
            let cached = self.entries.get(&path).filter(|e| e.stamp == stamp);
            let entry = match cached {
                Some(entry) => entry.clone(),
                None => {
                    let (snapshot, digest) = match loader::snapshot(&path, self.snapshots.path()) {
                        Ok(taken) => taken,
                        Err(e) => {
                            refused.push((path.clone(), e.to_string()));
                            continue;
                        }
                    };
                    // The same bytes probe the same: a build dropped in again is not re-probed.
                    let probe = match self.probes.get(&digest.sha256_hex) {
                        Some(known) => known.clone(),
                        None => match self.probe(&snapshot, &path).await {
                            Ok(report) => {
                                let probe = match (report.manifest, report.error) {
                                    (Some(manifest), None) => Ok(manifest),
                                    (_, Some(error)) => Err(error),
                                    (None, None) => Err("the probe reported no manifest".into()),
                                };
                                self.probes.insert(digest.sha256_hex.clone(), probe.clone());
                                probe
                            }
                            // A probe that crashed or timed out is tried again next time.
                            Err(failure) => Err(failure),
                        },
                    };
                    if let Err(reason) = &probe {
                        refused.push((path.clone(), reason.clone()));
                    }
                    Entry { path: path.clone(), snapshot, digest, stamp, probe }
                }
            };
            seen.insert(path, entry);
        }
        self.entries = seen;
        self.forget_unused_snapshots();
        Ok(refused)
    }

    /// Remove the snapshots no entry refers to any more (files replaced or gone).
    fn forget_unused_snapshots(&self) {
        let Ok(listing) = std::fs::read_dir(self.snapshots.path()) else { return };
        for item in listing.flatten() {
            let path = item.path();
            if !self.entries.values().any(|e| e.snapshot == path) {
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// The one file that provides adapter `name`.
    pub fn find(&self, name: &str) -> Result<&Entry, FindError> {
        let matching: Vec<&Entry> =
            self.entries.values().filter(|e| e.probe.as_ref().is_ok_and(|m| m.adapter_name == name)).collect();
        match matching.as_slice() {
            [one] => Ok(one),
            [] => Err(FindError::NotFound {
                name: name.into(),
                dir: self.dir.clone(),
                found: self
                    .entries
                    .values()
                    .filter_map(|e| {
                        let manifest = e.probe.as_ref().ok()?;
                        let file = e.path.file_name().unwrap_or_default().to_string_lossy();
                        Some(format!("{} in {file}", manifest.adapter_name))
                    })
                    .collect(),
                refused: self
                    .dir_refused
                    .iter()
                    .cloned()
                    .chain(self.entries.values().filter_map(|e| {
                        e.probe.as_ref().err().map(|why| format!("{}: {}", e.path.display(), first_line(why)))
                    }))
                    .collect(),
            }),
            many => Err(FindError::Ambiguous {
                name: name.into(),
                dir: self.dir.clone(),
                files: many.iter().map(|e| e.path.display().to_string()).collect(),
            }),
        }
    }

    /// Validate each config with the adapter in `entry`, in a child process (results are
    /// remembered by file content and config: validation is pure).
    pub async fn validate(&mut self, entry: &Entry, configs: &[String]) -> Result<Vec<Vec<Problem>>, String> {
        let key = |config: &String| (entry.digest.sha256_hex.clone(), config.clone());
        if let Some(known) = configs.iter().map(|c| self.validations.get(&key(c)).cloned()).collect::<Option<Vec<_>>>()
        {
            return Ok(known);
        }
        let mut command = Command::new(&self.exe);
        // The configs go on stdin: a command line is readable by every local user.
        command.arg("check-plugin").arg(&entry.snapshot).arg("--validate-stdin");
        let input = serde_json::to_vec(configs).unwrap_or_default();
        let report = self.run_probe(command, &entry.path, input).await?;
        match report.error {
            Some(error) => Err(error),
            None if report.validations.len() == configs.len() => {
                for (config, problems) in configs.iter().zip(&report.validations) {
                    self.validations.insert(key(config), problems.clone());
                }
                Ok(report.validations)
            }
            None => Err("the probe did not validate every config".into()),
        }
    }

    /// Probe `snapshot`, the copy of `path` taken for it.
    async fn probe(&self, snapshot: &Path, path: &Path) -> Result<PluginReport, String> {
        let mut command = Command::new(&self.exe);
        command.arg("check-plugin").arg(snapshot);
        let mut report = self.run_probe(command, path, Vec::new()).await?;
        // The operator knows the file by its name in the plugin directory.
        if let Some(error) = report.error.as_mut() {
            *error = error.replace(&snapshot.display().to_string(), &path.display().to_string());
        }
        Ok(report)
    }

    async fn run_probe(&self, mut command: Command, path: &Path, input: Vec<u8>) -> Result<PluginReport, String> {
        command
            .kill_on_drop(true)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let run = async {
            let mut child = command.spawn()?;
            if let Some(mut stdin) = child.stdin.take() {
                use tokio::io::AsyncWriteExt;
                // A probe that exits early does not read: a broken pipe is its answer.
                let _ = stdin.write_all(&input).await;
            }
            child.wait_with_output().await
        };
        let output = tokio::time::timeout(self.probe_timeout, run)
            .await
            .map_err(|_| format!("probing {} took longer than {:?}", path.display(), self.probe_timeout))?
            .map_err(|e| format!("cannot run {} check-plugin: {e}", self.exe.display()))?;
        serde_json::from_slice(&output.stdout).map_err(|_| {
            // The child died before it could report: the file crashed the loader.
            let stderr = String::from_utf8_lossy(&output.stderr);
            format!(
                "{} crashed the probe ({}){}",
                path.display(),
                output.status,
                stderr.lines().last().map(|l| format!(": {l}")).unwrap_or_default()
            )
        })
    }
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

/// Library files only; hidden, temporary and partial files are skipped (deployers write a
/// temporary name and rename it into place).
pub fn is_candidate(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    if name.starts_with('.') || name.ends_with('~') {
        return false;
    }
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}
