//! The end-to-end harness: finds the built `switchboard` binary, plugin and fixtures, runs the
//! real gateway as a child process in a scratch directory, captures its log, and waits for
//! conditions with [`assert_eventually!`](crate::assert_eventually) instead of sleeping.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// How long [`assert_eventually!`](crate::assert_eventually) waits unless told otherwise.
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(20);

/// Poll `$cond` (a boolean expression, re-evaluated each time) every 20 ms until it holds, or
/// panic with the message after the timeout (default [`DEFAULT_PATIENCE`]). Async context only.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(@within $crate::harness::DEFAULT_PATIENCE, $cond, $($msg)+)
    };
    (@within $patience:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + $patience;
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!("not within {:?}: {}", $patience, format!($($msg)+));
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(20)).await;
        }
    }};
}

/// Where the built artifacts are. `cargo xtask build` / `cargo xtask fixtures` make them;
/// `SWITCHBOARD_BIN`, `SWITCHBOARD_PLUGIN_DIR` and `SWITCHBOARD_FIXTURE_DIR` override.
#[derive(Clone, Debug)]
pub struct Artifacts {
    pub switchboard: PathBuf,
    pub plugin_dir: PathBuf,
    pub fixture_dir: PathBuf,
}

impl Artifacts {
    pub fn discover() -> Result<Self> {
        let target = target_dir()?;
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        let from_env = |name: &str, default: PathBuf| std::env::var_os(name).map(PathBuf::from).unwrap_or(default);
        let artifacts = Self {
            switchboard: from_env("SWITCHBOARD_BIN", target.join(profile).join("switchboard")),
            plugin_dir: from_env("SWITCHBOARD_PLUGIN_DIR", target.join("plugins").join(profile)),
            fixture_dir: from_env("SWITCHBOARD_FIXTURE_DIR", target.join("fixtures")),
        };
        if !artifacts.switchboard.is_file() {
            bail!("{} is missing: run `cargo xtask build` (or `cargo xtask test`)", artifacts.switchboard.display());
        }
        if !artifacts.mattermost_plugin().is_file() {
            bail!(
                "{} is missing: run `cargo xtask build` (or `cargo xtask test`)",
                artifacts.mattermost_plugin().display()
            );
        }
        Ok(artifacts)
    }

    pub fn mattermost_plugin(&self) -> PathBuf {
        self.plugin_dir.join(mattermost_file_name())
    }

    /// The Matrix adapter `cargo xtask build` puts beside the Mattermost one.
    pub fn matrix_plugin(&self) -> Result<PathBuf> {
        let path = self.plugin_dir.join(matrix_file_name());
        if !path.is_file() {
            bail!("{} is missing: run `cargo xtask build` (or `cargo xtask test`)", path.display());
        }
        Ok(path)
    }

    /// A fixture adapter from `cargo xtask fixtures` (`tests/fixtures/<name>/`), e.g. `abi-skew`.
    pub fn fixture(&self, name: &str) -> Result<PathBuf> {
        let path = self.fixture_dir.join(format!("{name}{}", std::env::consts::DLL_SUFFIX));
        if !path.is_file() {
            bail!("{} is missing: run `cargo xtask fixtures` (or `cargo xtask test`)", path.display());
        }
        Ok(path)
    }
}

pub fn mattermost_file_name() -> String {
    format!("{}switchboard_mattermost{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

pub fn matrix_file_name() -> String {
    format!("{}switchboard_matrix{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX)
}

/// The cargo target directory this test binary was built into (`target/<profile>/deps/<exe>`
/// or `target/<profile>/<exe>`).
pub(crate) fn target_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut dir = exe.parent();
    while let Some(candidate) = dir {
        if candidate.file_name().is_some_and(|n| n == "debug" || n == "release") {
            return candidate.parent().map(Path::to_path_buf).context("profile directory has a parent");
        }
        dir = candidate.parent();
    }
    bail!("cannot tell the target directory from {}", exe.display())
}

/// Put a plugin file into `dir` the way an operator should: copy beside it, then rename.
pub fn install_plugin(from: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let staging = dir.join(format!(".{name}.partial"));
    std::fs::copy(from, &staging).with_context(|| format!("cannot copy {}", from.display()))?;
    let to = dir.join(name);
    std::fs::rename(&staging, &to)?;
    Ok(to)
}

/// The gateway config of the seed scenario: one Mattermost channel instance `mattermost`
/// against the simulator at `base_url`, bound to agent `main` whose table body is `agent`.
pub fn seed_config(base_url: &str, plugin_dir: &Path, chatmode: &str, agent: &str) -> String {
    format!(
        r#"[gateway]
state_dir = "state"
admin_listen = "127.0.0.1:0"
typing_interval_ms = 200

[plugins]
dir = "{plugins}"

[channels.mattermost]
plugin = "mattermost"
base_url = "{base_url}"
bot_token_env = "MM_BOT_TOKEN"
chatmode = "{chatmode}"
onchar_prefixes = [">", "!"]
dm_policy = "open"
group_policy = "open"
allow_from = []

[agents.main]
{agent}

[[bindings]]
channel = "mattermost"
agent = "main"
"#,
        plugins = plugin_dir.display(),
    )
}

/// CPU time (user + system, in clock ticks) process `pid` has used so far (Linux).
pub fn cpu_ticks_of(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the fields after it are fixed.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// The admin address a log line announces (`admin listening on <addr>`), in a text line or
/// in the `message` of a JSON one.
fn admin_address(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("admin listening on ")?;
    let address: String =
        rest.chars().take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '[' | ']')).collect();
    address.parse().ok()
}

/// A running `switchboard run` child process with its log captured.
pub struct Gateway {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    http: reqwest::Client,
}

impl Gateway {
    /// Start `switchboard run --config <config_path>` in `workdir` and wait until its admin
    /// listener is up. `SWITCHBOARD_ECHO_LOG=1` echoes the gateway's log to stderr.
    pub async fn start(binary: &Path, workdir: &Path, config_path: &Path, env: &[(&str, &str)]) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(config_path)
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("SWITCHBOARD_LOG").is_none() {
            command.env("SWITCHBOARD_LOG", "info,switchboard=debug");
        }
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().with_context(|| format!("cannot start {}", binary.display()))?;
        let stderr = child.stderr.take().context("child stderr is piped")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let echo = std::env::var_os("SWITCHBOARD_ECHO_LOG").is_some();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if echo {
                    eprintln!("[gateway] {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let admin = loop {
            let found = log.lock().unwrap().iter().find_map(|line| admin_address(line));
            if let Some(addr) = found {
                break addr;
            }
            if let Some(status) = child.try_wait()? {
                bail!("the gateway exited during start-up ({status}):\n{}", log.lock().unwrap().join("\n"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("the gateway did not open its admin listener:\n{}", log.lock().unwrap().join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Self { child, log, admin, config_path: config_path.to_path_buf(), http: reqwest::Client::new() })
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn log_text(&self) -> String {
        self.log().join("\n")
    }

    /// Lines containing every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log.lock().unwrap().iter().filter(|line| needles.iter().all(|n| line.contains(n))).cloned().collect()
    }

    pub fn count(&self, needles: &[&str]) -> usize {
        self.lines_with(needles).len()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Rewrite the config file and send SIGUSR1.
    pub fn reload_with(&self, config: &str) -> Result<()> {
        std::fs::write(&self.config_path, config)?;
        self.signal(libc::SIGUSR1);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size of the gateway process, in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// CPU time the gateway process has used so far (user + system), in clock ticks (Linux).
    pub fn cpu_ticks(&self) -> Option<u64> {
        cpu_ticks_of(self.child.id())
    }

    /// Context switches of all the gateway's threads so far, voluntary and not (Linux): each
    /// hand-off between threads that finds the other one asleep costs one.
    pub fn context_switches(&self) -> Option<u64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).ok()?;
        let mut total = 0;
        for task in tasks.flatten() {
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
            total += status
                .lines()
                .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(total)
    }

    /// The exit status code once the process has ended (`None` while it runs or if killed).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|status| status.code())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The admin address the gateway announced last (a re-exec binds a new port 0).
    pub fn latest_admin(&self) -> SocketAddr {
        self.log.lock().unwrap().iter().rev().find_map(|line| admin_address(line)).unwrap_or(self.admin)
    }

    /// `GET /status` on the admin listener.
    pub async fn status(&self) -> Result<serde_json::Value> {
        let url = format!("http://{}/status", self.latest_admin());
        Ok(self.http.get(url).send().await?.error_for_status()?.json().await?)
    }

    pub async fn admin_get(&self, path: &str) -> Result<(u16, String)> {
        let response = self.http.get(format!("http://{}{path}", self.latest_admin())).send().await?;
        Ok((response.status().as_u16(), response.text().await?))
    }

    /// SIGTERM, then wait up to 15 s (SIGKILL after that).
    /// `kill -9`: no chance to store anything.
    pub fn kill_hard(mut self) -> Result<ExitStatus> {
        self.child.kill()?;
        Ok(self.child.wait()?)
    }

    pub async fn stop(mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("the gateway ignored SIGTERM for 15 s:\n{}", self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
