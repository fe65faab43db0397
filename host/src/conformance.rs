//! `switchboard check-plugin --conformance <file>`: the checks of
//! `switchboard_plugin_api::conformance` run against a built adapter library.
//!
//! The library runs in a child process (the same binary, `check-plugin <file>
//! --conformance-child`), so that a plugin that crashes, aborts or hangs cannot take the
//! checker down: the child loads the file as the gateway would (ownership, permissions,
//! completeness, layout and ABI version checks), runs the checks on a thread of its own and
//! writes one JSON line per call it is about to make and per check it completed. The parent
//! gives every call the gateway's call timeout; a child that goes quiet longer is killed and
//! reported as hung in that call, one that dies as crashed in it.
//!
//! The adapter is built from `--config <file.toml>` (a channel instance table, as under
//! `[channels.<id>]` in the gateway config; host keys are removed as the gateway does), else
//! from the sample config the library exports (`AdapterPlugin::sample_config`), else from an
//! empty table if that validates clean. Secrets are placeholders: no real one is read.

use std::{
    collections::VecDeque,
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::Duration,
};

use abi_stable::library::RawLibrary;
use serde::{Deserialize, Serialize};
use switchboard_plugin_api::{
    conformance::{run_checks, Outcome, Progress, TestHost, CHECKS},
    ConfigProblem,
};

use crate::{catalog::ManifestInfo, loader};

/// The flag that makes `check-plugin` the child side.
pub const CHILD_FLAG: &str = "--conformance-child";

/// The channel instance the adapter is built for (its sessions' keys name it).
const INSTANCE: &str = "conformance";

/// How many of the child's last stderr lines a crash report quotes.
const STDERR_LINES: usize = 5;

/// What to check, from the command line.
#[derive(Debug, Clone)]
pub struct Request {
    pub file: PathBuf,
    /// The channel instance table (TOML file) to build the adapter from.
    pub config: Option<PathBuf>,
    /// How long one call into the adapter may take.
    pub call_timeout: Duration,
}

/// Whether one check passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    NotRun,
}

/// One check in the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    pub name: String,
    /// What the check checks.
    pub checks: String,
    pub status: Status,
    /// Why it failed (every violation), or why it did not run.
    pub reasons: Vec<String>,
    pub note: Option<String>,
}

/// What `switchboard check-plugin --conformance` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub file: PathBuf,
    pub manifest: Option<ManifestInfo>,
    /// Where the config the adapter was built from came from.
    pub config_source: Option<String>,
    /// Why the file or the config could not be used at all (nothing was checked).
    pub error: Option<String>,
    /// How the run was cut short by the plugin: a hang or a crash, and in which call.
    pub aborted: Option<String>,
    /// Every check, in order.
    pub checks: Vec<CheckReport>,
}

impl Report {
    fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            manifest: None,
            config_source: None,
            error: None,
            aborted: None,
            checks: Vec::new(),
        }
    }

    /// 0: every check passed; 1: a check failed (or did not run); 2: the file or the config
    /// could not be used.
    pub fn exit_code(&self) -> u8 {
        if self.error.is_some() {
            2
        } else if self.aborted.is_some() || self.checks.iter().any(|c| c.status != Status::Pass) {
            1
        } else {
            0
        }
    }

    /// The report for a person.
    pub fn render(&self) -> String {
        let mut out = format!("conformance of {}\n", self.file.display());
        if let Some(m) = &self.manifest {
            out += &format!(
                "  adapter {} {} (build {}, ABI v{}.{})\n",
                m.adapter_name, m.adapter_version, m.build, m.abi_version, m.abi_minor
            );
        }
        if let Some(source) = &self.config_source {
            out += &format!("  config: {source}\n");
        }
        if let Some(error) = &self.error {
            out += &format!("error: {error}\n");
            return out;
        }
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for check in &self.checks {
            let status = match check.status {
                Status::Pass => "PASS   ",
                Status::Fail => "FAIL   ",
                Status::NotRun => "NOT RUN",
            };
            out += &format!("  {status} {:width$}  {}\n", check.name, check.checks);
            for reason in &check.reasons {
                out += &format!("          - {reason}\n");
            }
            if let Some(note) = &check.note {
                out += &format!("          note: {note}\n");
            }
        }
        if let Some(aborted) = &self.aborted {
            out += &format!("aborted: {aborted}\n");
        }
        let count = |status| self.checks.iter().filter(|c| c.status == status).count();
        out += &format!(
            "{}: {} passed, {} failed, {} not run\n",
            if self.exit_code() == 0 { "PASSED" } else { "FAILED" },
            count(Status::Pass),
            count(Status::Fail),
            count(Status::NotRun)
        );
        out
    }
}

/// What the parent hands the child on stdin (a config is no command-line argument: those are
/// readable by every local user).
#[derive(Debug, Serialize, Deserialize)]
struct ChildRequest {
    /// The `--config` file's text, and its name for the report.
    config: Option<(String, String)>,
}

/// One line of the child's stdout.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChildLine {
    Loaded { manifest: ManifestInfo, config_source: String },
    Calling { call: String },
    Checked { name: String, status: Status, reasons: Vec<String>, note: Option<String> },
    Refused { error: String },
}

/// Run the checks on `request.file` in a child process running `exe`.
pub fn check(exe: &Path, request: &Request) -> Report {
    let mut report = Report::new(&request.file);
    let config = match &request.config {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some((text, path.display().to_string())),
            Err(e) => {
                report.error = Some(format!("cannot read the config {}: {e}", path.display()));
                return report;
            }
        },
    };
    let spawned = Command::new(exe)
        .arg("check-plugin")
        .arg(&request.file)
        .arg(CHILD_FLAG)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            report.error = Some(format!("cannot run {}: {e}", exe.display()));
            return report;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A child that exits early does not read: its report says why.
        let _ = stdin.write_all(&serde_json::to_vec(&ChildRequest { config }).unwrap_or_default());
    }
    let (lines_tx, lines) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr_reader = child.stderr.take().map(|stderr| {
        let tail = Arc::clone(&stderr_tail);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut tail = tail.lock().unwrap();
                if tail.len() == STDERR_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        })
    });

    let mut calling = String::from("loading the library");
    let mut hung = false;
    loop {
        match lines.recv_timeout(request.call_timeout) {
            Ok(line) => match serde_json::from_str::<ChildLine>(&line) {
                Ok(ChildLine::Loaded { manifest, config_source }) => {
                    report.manifest = Some(manifest);
                    report.config_source = Some(config_source);
                }
                Ok(ChildLine::Calling { call }) => calling = call,
                Ok(ChildLine::Checked { name, status, reasons, note }) => {
                    report.checks.push(CheckReport { checks: description(&name), name, status, reasons, note })
                }
                Ok(ChildLine::Refused { error }) => report.error = Some(error),
                // The plugin's own output on stdout: not ours to read.
                Err(_) => {}
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                hung = true;
                // Our own child, by its id.
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait();
    if let Some(reader) = stderr_reader {
        // Once the child is gone, its stderr ends (unless a grandchild holds it: do not wait then).
        if reader.is_finished() || !hung {
            let _ = reader.join();
        }
    }
    if report.error.is_some() {
        return report;
    }
    let cut_short = if hung {
        Some(format!(
            "the adapter hung: `{calling}` did not return within {:?} (the gateway's watchdog would abandon this generation)",
            request.call_timeout
        ))
    } else {
        match status {
            Ok(status) if status.success() && report.checks.len() == CHECKS.len() => None,
            Ok(status) => Some(format!(
                "the process died during `{calling}` ({}){}",
                describe_exit(status),
                stderr_tail.lock().unwrap().back().map(|l| format!("; its last words: {l}")).unwrap_or_default()
            )),
            Err(e) => Some(format!("cannot tell how the child process ended: {e}")),
        }
    };
    if let Some(reason) = cut_short {
        complete_cut_short(&mut report, &calling, &reason);
        report.aborted = Some(reason);
    }
    report
}

fn description(name: &str) -> String {
    CHECKS.iter().find(|(n, _)| *n == name).map(|(_, d)| d.to_string()).unwrap_or_default()
}

/// Why a process ended, in words (a panic that was not caught aborts: SIGABRT).
fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc::SIGABRT) => {
            "killed by SIGABRT: an abort, e.g. a panic that was not caught (is the plugin built with panic = \"unwind\" \
             and exported with export_adapter!?) or a panic while panicking"
                .into()
        }
        Some(libc::SIGSEGV) => "killed by SIGSEGV: a memory fault (or a stack overflow)".into(),
        Some(signal) => format!("killed by signal {signal}"),
        None => status.to_string(),
    }
}

/// The check that was running when the run was cut short fails with `reason`; the checks
/// after it did not run.
fn complete_cut_short(report: &mut Report, calling: &str, reason: &str) {
    // export_state and conversation_of are reported last but called after every event.
    let running = if calling.starts_with("export_state() after") {
        Some("export_state")
    } else if calling.starts_with("conversation_of(") {
        Some("conversation_of")
    } else {
        CHECKS.iter().map(|(n, _)| *n).find(|n| !report.checks.iter().any(|c| c.name == *n))
    };
    let unreported: Vec<&(&str, &str)> =
        CHECKS.iter().filter(|(n, _)| !report.checks.iter().any(|c| c.name == *n)).collect();
    for (name, checks) in unreported {
        let (status, why) = if Some(*name) == running {
            (Status::Fail, reason.to_string())
        } else {
            (Status::NotRun, format!("the run ended in `{calling}`"))
        };
        report.checks.push(CheckReport {
            name: name.to_string(),
            checks: checks.to_string(),
            status,
            reasons: vec![why],
            note: None,
        });
    }
    // Keep the order of CHECKS.
    report.checks.sort_by_key(|c| CHECKS.iter().position(|(n, _)| *n == c.name));
}

/// The child side: load `file`, run the checks, write one JSON line to stdout per call and per check.
pub fn run_child(file: &Path) -> std::process::ExitCode {
    let mut input = String::new();
    let request = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<ChildRequest>(&input).map_err(|e| e.to_string()));
    let file = file.to_path_buf();
    // Plugin code runs on a thread of its own, as on the gateway's apartments, and the library
    // is closed only after that thread has exited: the plugin's std registers destructors for
    // the thread's locals, which run at its exit.
    let ran = std::thread::Builder::new().name("conformance".into()).spawn(move || match request {
        Ok(request) => child_checks(&file, request),
        Err(e) => {
            emit(&ChildLine::Refused { error: format!("{CHILD_FLAG}: a bad request on stdin: {e}") });
            None
        }
    });
    match ran.map(|thread| thread.join()) {
        Ok(Ok(library)) => {
            drop(library);
            std::process::ExitCode::SUCCESS
        }
        _ => std::process::ExitCode::FAILURE,
    }
}

fn emit(line: &ChildLine) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", serde_json::to_string(line).unwrap_or_default());
    let _ = stdout.flush();
}

/// Load `file` and run the checks on it; returns the library, to be closed once this thread
/// has exited.
fn child_checks(file: &Path, request: ChildRequest) -> Option<RawLibrary> {
    let refuse = |error: String| emit(&ChildLine::Refused { error });
    if let Err(refusal) = loader::check_permissions(file).and_then(|()| loader::check_complete(file)) {
        refuse(refusal.to_string());
        return None;
    }
    emit(&ChildLine::Calling { call: "loading the library".into() });
    let opened = match loader::open_adapter(file) {
        Ok(opened) => opened,
        Err((error, library)) => {
            refuse(error.to_string());
            return library;
        }
    };
    let manifest = ManifestInfo {
        adapter_name: opened.manifest.adapter_name.to_string(),
        adapter_version: opened.manifest.adapter_version.to_string(),
        abi_version: opened.manifest.abi_version,
        abi_minor: opened.build.abi_minor,
        build: opened.manifest.build.to_string(),
    };
    let (config_json, config_source) = match instance_config(&opened, &manifest, request) {
        Ok(config) => config,
        Err(error) => {
            refuse(error);
            return Some(opened.library);
        }
    };
    emit(&ChildLine::Loaded { manifest, config_source });
    let host = TestHost::new(INSTANCE).with_placeholder_secrets();
    run_checks(&opened.module, host, &config_json, &[], &mut |progress| match progress {
        Progress::Calling(call) => emit(&ChildLine::Calling { call: call.to_string() }),
        Progress::Checked(result) => {
            let (status, reasons) = match &result.outcome {
                Outcome::Passed => (Status::Pass, Vec::new()),
                Outcome::Failed(violations) => (Status::Fail, violations.clone()),
                Outcome::NotRun(why) => (Status::NotRun, vec![why.clone()]),
            };
            emit(&ChildLine::Checked { name: result.name.to_string(), status, reasons, note: result.note.clone() })
        }
    });
    // Plugin-made values go before their library.
    let loader::OpenedAdapter { library, module, manifest, .. } = opened;
    drop((module, manifest));
    Some(library)
}

/// The adapter config to build from (JSON) and where it came from.
fn instance_config(
    opened: &loader::OpenedAdapter,
    manifest: &ManifestInfo,
    request: ChildRequest,
) -> Result<(String, String), String> {
    let given = request.config.is_some();
    let (toml_text, source) = match request.config {
        Some((text, name)) => (text, format!("{name} (--config)")),
        None => match sample_config(opened)? {
            Some(text) => (text, "the plugin's sample config (AdapterPlugin::sample_config)".to_string()),
            None => {
                emit(&ChildLine::Calling { call: "validate_config({})".into() });
                let problems = (opened.module.validate_config())("{}".into()).into_result().map_err(|e| {
                    format!("no config to build the adapter from, and validate_config({{}}) failed: {e}")
                })?;
                if !problems.is_empty() {
                    return Err(format!(
                        "no config to build the adapter from: pass --config <file.toml> (a [channels.<id>] table), or have the \
                         plugin supply one (AdapterPlugin::sample_config); an empty table has problems: {}",
                        listed(&problems)
                    ));
                }
                return Ok(("{}".into(), "an empty table (no --config, no sample; {} validates clean)".into()));
            }
        },
    };
    let (plugin, json) = crate::config::adapter_config_of(&toml_text).map_err(|e| format!("{source}: {e}"))?;
    if let Some(plugin) = plugin.filter(|p| *p != manifest.adapter_name) {
        return Err(format!("{source} is for plugin {plugin:?}, but this file is adapter {:?}", manifest.adapter_name));
    }
    if given {
        // A config the adapter rightly refuses is the operator's to fix, not a failed check (a
        // sample with problems is the plugin's fault: the checks report it).
        emit(&ChildLine::Calling { call: "validate_config(--config)".into() });
        if let Ok(problems) = (opened.module.validate_config())(json.as_str().into()).into_result() {
            if !problems.is_empty() {
                return Err(format!("{source} has problems: {}", listed(&problems)));
            }
        }
    }
    Ok((json, source))
}

fn listed(problems: &[ConfigProblem]) -> String {
    problems.iter().map(|p| format!("`{}`: {}", p.key_path, p.message)).collect::<Vec<_>>().join("; ")
}

/// The sample config the library's root module offers, if it offers one (v1.1 and later).
fn sample_config(opened: &loader::OpenedAdapter) -> Result<Option<String>, String> {
    let Some(entry) = opened.module.sample_config() else { return Ok(None) };
    emit(&ChildLine::Calling { call: "sample_config()".into() });
    match entry().into_result() {
        Ok(sample) => Ok(sample.into_option().map(|s| s.as_str().to_owned())),
        Err(e) => Err(format!("the plugin's sample_config() failed: {e}")),
    }
}
