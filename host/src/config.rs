//! The gateway's TOML config: parsing and host-side validation.
//!
//! Every problem is collected with its key path before anything is rejected, so an operator
//! fixes a file in one pass (Vector's rule). Keys that belong to an adapter are not checked
//! here: they go to that adapter's `validate_config` (see [`crate::catalog`]).

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use toml::{Table, Value};

use crate::tls::CaFile;

/// The agent a channel instance without a binding uses.
pub const DEFAULT_AGENT: &str = "main";

/// Keys of a `[channels.<id>]` table that the host reads; the rest belong to the adapter.
/// What a `command` agent's environment holds unless its `env` says otherwise.
pub const COMMAND_AGENT_ENV: &[&str] = &["PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR"];

const HOST_CHANNEL_KEYS: &[&str] = &["plugin", "thread_sessions", "ca_file"];

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub plugins: PluginsConfig,
    pub retention: Retention,
    pub channels: BTreeMap<String, ChannelConfig>,
    pub agents: BTreeMap<String, AgentConfig>,
    pub bindings: Vec<Binding>,
}

/// More runtime threads than this is a typo, not a tuning.
const MAX_IO_THREADS: u64 = 256;

/// Leaves room below glibc's 1024 TLS keys for the host's own and its libraries'.
pub const MAX_GENERATION_BUDGET: u64 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub state_dir: PathBuf,
    /// A TCP address for the admin API (`None`: no TCP). Mutating routes there need the
    /// bearer token of `admin_token_env`; beyond loopback every route but the probes does.
    pub admin_listen: Option<SocketAddr>,
    /// The admin API's Unix socket (mode 0600; every route, no token); `None` turns it off.
    pub admin_socket: Option<PathBuf>,
    /// The environment variable that holds the admin API's bearer token for TCP.
    pub admin_token_env: Option<String>,
    /// How many agent turns run at once across all sessions.
    pub max_concurrent_turns: usize,
    /// The largest WebSocket message a channel's socket takes; a larger one closes the socket
    /// (the adapter reconnects and catches up).
    pub ws_max_message_bytes: usize,
    /// How long an agent works before the typing indicator shows: a fast answer needs none.
    pub typing_delay: Duration,
    /// How often the typing indicator is renewed while an agent works.
    pub typing_interval: Duration,
    /// How many turns may wait in one session's lane; more are refused (logged, counted).
    pub lane_capacity: usize,
    /// On SIGTERM/SIGINT: how long running turns and queued replies get to finish.
    pub stop_deadline: Duration,
    /// `full` survives a power loss, `normal` a crash of the process (SQLite `synchronous`).
    pub durability: crate::store::Durability,
    /// After this many adapter generations loaded in one process, the gateway re-executes
    /// itself (each loaded copy of Rust std costs a TLS key that is never freed; glibc has
    /// 1024). A warning is logged at 80 % of it.
    pub generation_budget: u64,
    /// How many times a channel instance's adapter may be restarted after a panic within
    /// `adapter_restart_window`; one more and the instance stops (terminal, logged).
    pub adapter_restart_budget: u32,
    pub adapter_restart_window: Duration,
    /// How long one call into an adapter (a batch of events, a constructor, a state export)
    /// may take; past it the generation is abandoned and the instance restarts from its last
    /// good state (the event it hung on is dead-lettered).
    pub adapter_call_timeout: Duration,
    /// How long a channel instance may have no WebSocket up (after it had one) before
    /// `/readyz` says the gateway is not ready; reconnects within it go unnoticed.
    pub disconnected_grace: Duration,
    /// How many stored sessions the session registry keeps in memory (least recently used
    /// leave first; the store has them all). Takes effect at the next start.
    pub session_cache_capacity: usize,
    /// Threads of the async runtime (sockets, HTTP, timers, session lanes); `None` picks
    /// [`GatewayConfig::io_threads`]'s default. Takes effect at the next start.
    pub io_threads: Option<usize>,
    /// How log lines are written (`SWITCHBOARD_LOG_FORMAT` wins). Takes effect at the next start.
    pub log_format: LogFormat,
}

/// How the gateway writes its log to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `2025-… INFO switchboard::routing: inbound session=… channel=…`, for people.
    #[default]
    Text,
    /// One JSON object per line, every field at the top level, for log collectors.
    Json,
}

impl LogFormat {
    /// The values `gateway.log_format` and `SWITCHBOARD_LOG_FORMAT` take.
    pub const NAMES: [&'static str; 2] = ["text", "json"];

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

impl GatewayConfig {
    /// How many threads the async runtime gets: as configured, else one per CPU. The heavy
    /// work runs on threads of its own (each adapter's apartment, the store's writer and sync
    /// threads), so the runtime mostly hands events between them, and fewer workers wake each
    /// other less. On 2 CPUs at 500 msg/s, one worker instead of two cut the context switches
    /// per reply by a third and the CPU per reply by 8–14 %, with the same burst throughput,
    /// but added 0.2–2 ms to the p99 latency (`cargo xtask bench`, A/B): a knob for operators
    /// who care more for CPU than for the last millisecond.
    pub fn io_threads(&self) -> usize {
        self.io_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// How long finished records are kept (days; 0 keeps them for good). Pruned hourly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Conversation turns (what agents are shown as history).
    pub transcripts_days: u64,
    pub dead_letters_days: u64,
    /// Answered inbound messages and delivered or failed replies. An inbound message's id is
    /// what recognises its redelivery: one older than this would be answered again.
    pub delivered_days: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    /// Pick up new builds dropped into `dir` by itself (otherwise only on a reload trigger).
    pub watch: bool,
    /// How long a changed file's size and mtime must hold still before it is loaded.
    pub settle: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChannelConfig {
    /// The adapter's manifest name.
    pub plugin: String,
    /// Give each thread its own session (`...:thread:<root id>`).
    pub thread_sessions: bool,
    /// Extra CA certificates this instance's HTTPS and WSS connections trust, besides the
    /// system's and the built-in public roots (read with the config: a changed file is a
    /// changed instance).
    pub ca_file: Option<CaFile>,
    /// The adapter's own keys, as JSON, for its `validate_config` and constructor.
    pub adapter_config: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub kind: AgentKind,
    /// How many earlier transcript turns of the session the agent is given.
    pub history_limit: usize,
    pub on_error: OnError,
    /// The most an agent may answer (its stdout or response body, bytes): beyond, its turn
    /// fails as `on_error` says, and no more of it is read.
    pub max_output_bytes: usize,
}

/// What the person sees when the agent fails.
#[derive(Debug, Clone, PartialEq)]
pub enum OnError {
    /// This text is posted (the failure itself goes to the log only).
    Reply(String),
    Silent,
}

pub const DEFAULT_ERROR_REPLY: &str = "Sorry, I could not answer that just now. Please try again in a moment.";

#[derive(Debug, Clone, PartialEq)]
pub enum AgentKind {
    /// Replies `echo: <text>`.
    Echo,
    /// Runs a program with a JSON request on stdin; its stdout is the reply. Its environment
    /// holds only the `env` variables (the gateway's own holds the bot token and model keys).
    Command { argv: Vec<String>, timeout: Duration, env: Vec<String> },
    /// An OpenAI-compatible chat completions API.
    OpenAi(OpenAiAgent),
    /// POSTs the JSON request to a webhook; the reply is the response's `text` field.
    Http { url: String, timeout: Duration, token_env: Option<String> },
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiAgent {
    /// Up to and including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// The environment variable that holds the API key (none: no `Authorization` header).
    pub api_key_env: Option<String>,
    pub system_prompt: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u64>,
    pub timeout: Duration,
    pub stream: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub channel: String,
    pub agent: String,
}

/// One problem in a config file, at a key path such as `channels.mattermost.plugin`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ConfigError {
    pub key_path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key_path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key_path, self.message)
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{} problem(s) in {}:\n{}", .errors.len(), .file.display(), list(.errors))]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n")
}

/// The keys of a channel instance table that belong to its adapter (the host's removed).
fn adapter_keys(table: &Table) -> Table {
    table
        .iter()
        .filter(|(key, _)| !HOST_CHANNEL_KEYS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// A channel instance table on its own (TOML text, the body of a `[channels.<id>]` table):
/// the adapter it names (`plugin`, if it names one) and its adapter config as the gateway
/// hands it over (JSON, host keys removed).
pub fn adapter_config_of(toml_text: &str) -> Result<(Option<String>, String), String> {
    let table: Table =
        toml_text.parse().map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.message().trim()))?;
    let plugin = table.get("plugin").and_then(Value::as_str).map(str::to_string);
    let json = serde_json::to_string(&adapter_keys(&table))
        .map_err(|e| format!("cannot hand these keys to the adapter: {e}"))?;
    Ok((plugin, json))
}

impl ChannelConfig {
    pub fn adapter_config_json(&self) -> String {
        self.adapter_config.to_string()
    }
}

impl Config {
    /// Read and validate the host-side part of a config file. Relative paths are resolved
    /// against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError { key_path: String::new(), message: format!("cannot read the file: {e}") }],
        })?;
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|errors| ConfigErrors { file: path.to_path_buf(), errors })
    }

    /// Like [`Config::load`], but also returns the config as far as it could be read, so the
    /// adapters can check their keys too and every problem is reported in one pass.
    pub fn load_best_effort(path: &Path) -> (Option<Config>, Vec<ConfigError>) {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                return (
                    None,
                    vec![ConfigError { key_path: String::new(), message: format!("cannot read the file: {e}") }],
                )
            }
        };
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let root: Table = match text.parse() {
            Ok(root) => root,
            Err(e) => {
                let e: toml::de::Error = e;
                let message = format!("not valid TOML: {}", e.message().trim());
                return (None, vec![ConfigError { key_path: String::new(), message }]);
            }
        };
        let mut reader = Reader { errors: Vec::new(), base_dir: base };
        let config = reader.config(&root);
        reader.errors.sort();
        reader.errors.dedup();
        (Some(config), reader.errors)
    }

    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<ConfigError>> {
        let root: Table = text.parse().map_err(|e: toml::de::Error| {
            vec![ConfigError { key_path: String::new(), message: format!("not valid TOML: {}", e.message().trim()) }]
        })?;
        let mut reader = Reader { errors: Vec::new(), base_dir };
        let config = reader.config(&root);
        if reader.errors.is_empty() {
            Ok(config)
        } else {
            reader.errors.sort();
            reader.errors.dedup();
            Err(reader.errors)
        }
    }

    /// The agent serving a channel instance.
    pub fn agent_for(&self, channel: &str) -> &str {
        self.bindings.iter().find(|b| b.channel == channel).map(|b| b.agent.as_str()).unwrap_or(DEFAULT_AGENT)
    }
}

/// Walks the TOML tree, collecting problems instead of stopping at the first.
struct Reader<'a> {
    errors: Vec<ConfigError>,
    base_dir: &'a Path,
}

impl Reader<'_> {
    fn problem(&mut self, key_path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError { key_path: key_path.into(), message: message.into() });
    }

    fn config(&mut self, root: &Table) -> Config {
        self.known_keys("", root, &["gateway", "plugins", "retention", "channels", "agents", "bindings"]);
        let empty = Table::new();
        let gateway = self.table_at(root, "", "gateway").unwrap_or(&empty);
        let gateway = self.gateway(gateway);
        let plugins = self.table_at(root, "", "plugins").unwrap_or(&empty);
        self.known_keys("plugins", plugins, &["dir", "watch", "settle_ms"]);
        let plugins = PluginsConfig {
            dir: self.path(plugins, "plugins", "dir", "plugins"),
            watch: self.boolean(plugins, "plugins", "watch", true),
            settle: Duration::from_millis(self.positive_int(plugins, "plugins", "settle_ms", 200)),
        };
        let retention = self.table_at(root, "", "retention").unwrap_or(&empty);
        self.known_keys("retention", retention, &["transcripts_days", "dead_letters_days", "delivered_days"]);
        let retention = Retention {
            transcripts_days: self.non_negative_int(retention, "retention", "transcripts_days", 90),
            dead_letters_days: self.non_negative_int(retention, "retention", "dead_letters_days", 30),
            delivered_days: self.non_negative_int(retention, "retention", "delivered_days", 7),
        };

        let mut channels = BTreeMap::new();
        if let Some(table) = self.table_at(root, "", "channels") {
            for (id, value) in table {
                let path = format!("channels.{id}");
                self.identifier(&path, id);
                match value.as_table() {
                    Some(channel) => {
                        if let Some(channel) = self.channel(&path, channel) {
                            channels.insert(id.clone(), channel);
                        }
                    }
                    None => self.problem(path, "expected a table"),
                }
            }
        }
        let mut agents = BTreeMap::new();
        if let Some(table) = self.table_at(root, "", "agents") {
            for (id, value) in table {
                let path = format!("agents.{id}");
                self.identifier(&path, id);
                match value.as_table() {
                    Some(agent) => {
                        if let Some(agent) = self.agent(&path, agent) {
                            agents.insert(id.clone(), agent);
                        }
                    }
                    None => self.problem(path, "expected a table"),
                }
            }
        }
        let bindings = self.bindings(root, &channels, &agents);
        for id in channels.keys() {
            let agent = bindings.iter().find(|b| &b.channel == id).map_or(DEFAULT_AGENT, |b| &b.agent);
            if agent == DEFAULT_AGENT && !agents.contains_key(DEFAULT_AGENT) {
                self.problem(
                    format!("channels.{id}"),
                    format!("no [[bindings]] entry names this channel and there is no default agent [agents.{DEFAULT_AGENT}]"),
                );
            }
        }
        Config { gateway, plugins, retention, channels, agents, bindings }
    }

    fn gateway(&mut self, table: &Table) -> GatewayConfig {
        self.known_keys(
            "gateway",
            table,
            &[
                "state_dir",
                "admin_listen",
                "admin_socket",
                "admin_token_env",
                "ws_max_message_bytes",
                "max_concurrent_turns",
                "typing_delay_ms",
                "typing_interval_ms",
                "lane_capacity",
                "stop_deadline_ms",
                "durability",
                "generation_budget",
                "adapter_restart_budget",
                "adapter_restart_window_ms",
                "adapter_call_timeout_ms",
                "disconnected_grace_ms",
                "io_threads",
                "session_cache_capacity",
                "log_format",
            ],
        );
        let state_dir = self.path(table, "gateway", "state_dir", "state");
        let admin_listen = match table.get("admin_listen") {
            None => None,
            Some(Value::String(s)) if s == "off" => None,
            Some(Value::String(s)) => match s.parse::<SocketAddr>() {
                Ok(addr) => Some(addr),
                Err(_) => {
                    self.problem(
                        "gateway.admin_listen",
                        format!("expected an address like \"127.0.0.1:9464\" or \"off\", got {s:?}"),
                    );
                    None
                }
            },
            Some(other) => {
                self.problem("gateway.admin_listen", format!("expected a string, got {}", other.type_str()));
                None
            }
        };
        let admin_socket = match table.get("admin_socket") {
            Some(Value::String(s)) if s == "off" => None,
            _ => Some(self.path(table, "gateway", "admin_socket", &state_dir.join("admin.sock").to_string_lossy())),
        };
        let admin_token_env = self.optional_string(table, "gateway", "admin_token_env");
        if let Some(name) = &admin_token_env {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                self.problem("gateway.admin_token_env", format!("expected an environment variable name, got {name:?}"));
            }
        }
        if let (Some(addr), None) = (admin_listen, &admin_token_env) {
            if !addr.ip().is_loopback() {
                self.problem(
                    "gateway.admin_listen",
                    format!("{addr} is reachable beyond this machine: set gateway.admin_token_env (a bearer token) or listen on 127.0.0.1"),
                );
            }
        }
        let max_concurrent_turns = self.positive_int(table, "gateway", "max_concurrent_turns", 64) as usize;
        // Mattermost's largest event (a 16,383-rune post, escaped, with metadata) is far below.
        let ws_max_message_bytes = self.positive_int(table, "gateway", "ws_max_message_bytes", 16 << 20) as usize;
        let typing_delay = Duration::from_millis(self.non_negative_int(table, "gateway", "typing_delay_ms", 300));
        let typing_interval = Duration::from_millis(self.positive_int(table, "gateway", "typing_interval_ms", 3000));
        let lane_capacity = self.positive_int(table, "gateway", "lane_capacity", 256) as usize;
        let stop_deadline = Duration::from_millis(self.positive_int(table, "gateway", "stop_deadline_ms", 10_000));
        let durability = match self.choice(table, "gateway", "durability", &["full", "normal"]).as_deref() {
            Some("normal") => crate::store::Durability::Normal,
            _ => crate::store::Durability::Full,
        };
        let generation_budget = self.positive_int(table, "gateway", "generation_budget", 900);
        if generation_budget > MAX_GENERATION_BUDGET {
            self.problem(
                "gateway.generation_budget",
                format!(
                    "at most {MAX_GENERATION_BUDGET}: each generation costs one of the process's 1024 TLS keys, \
                     for good"
                ),
            );
        }
        let adapter_restart_budget = self.positive_int(table, "gateway", "adapter_restart_budget", 5) as u32;
        let adapter_restart_window =
            Duration::from_millis(self.positive_int(table, "gateway", "adapter_restart_window_ms", 60_000));
        let adapter_call_timeout =
            Duration::from_millis(self.positive_int(table, "gateway", "adapter_call_timeout_ms", 10_000));
        let disconnected_grace =
            Duration::from_millis(self.non_negative_int(table, "gateway", "disconnected_grace_ms", 30_000));
        let session_cache_capacity = self.positive_int(
            table,
            "gateway",
            "session_cache_capacity",
            crate::session::DEFAULT_SESSION_CACHE_CAPACITY as u64,
        ) as usize;
        let io_threads = table.contains_key("io_threads").then(|| self.positive_int(table, "gateway", "io_threads", 1));
        if io_threads.is_some_and(|n| n > MAX_IO_THREADS) {
            self.problem("gateway.io_threads", format!("at most {MAX_IO_THREADS}"));
        }
        let log_format = self
            .choice(table, "gateway", "log_format", &LogFormat::NAMES)
            .and_then(|name| LogFormat::from_name(&name))
            .unwrap_or_default();
        GatewayConfig {
            log_format,
            state_dir,
            admin_listen,
            admin_socket,
            admin_token_env,
            ws_max_message_bytes,
            max_concurrent_turns,
            typing_delay,
            typing_interval,
            lane_capacity,
            stop_deadline,
            durability,
            generation_budget: generation_budget.min(MAX_GENERATION_BUDGET),
            adapter_restart_budget,
            adapter_restart_window,
            adapter_call_timeout,
            disconnected_grace,
            session_cache_capacity,
            io_threads: io_threads.map(|n| n.min(MAX_IO_THREADS) as usize),
        }
    }

    fn channel(&mut self, path: &str, table: &Table) -> Option<ChannelConfig> {
        let plugin = match table.get("plugin") {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(Value::String(_)) => {
                self.problem(format!("{path}.plugin"), "must name an adapter");
                None
            }
            Some(other) => {
                self.problem(format!("{path}.plugin"), format!("expected a string, got {}", other.type_str()));
                None
            }
            None => {
                self.problem(format!("{path}.plugin"), "missing: the name of the adapter that serves this channel");
                None
            }
        };
        let thread_sessions = match table.get("thread_sessions") {
            None => false,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(
                    format!("{path}.thread_sessions"),
                    format!("expected true or false, got {}", other.type_str()),
                );
                false
            }
        };
        let ca_file = self.ca_file(path, table);
        let adapter_config = match serde_json::to_value(adapter_keys(table)) {
            Ok(json) => json,
            Err(e) => {
                self.problem(path, format!("cannot hand these keys to the adapter: {e}"));
                serde_json::Value::Null
            }
        };
        Some(ChannelConfig { plugin: plugin?, thread_sessions, ca_file, adapter_config })
    }

    /// `ca_file`: a PEM file of CA certificates, relative to the config file's directory.
    fn ca_file(&mut self, path: &str, table: &Table) -> Option<CaFile> {
        let key_path = format!("{path}.ca_file");
        let raw = match table.get("ca_file") {
            None => return None,
            Some(Value::String(s)) if !s.trim().is_empty() => PathBuf::from(s),
            Some(other) => {
                self.problem(key_path, format!("expected a path to a PEM file of CA certificates, got {other}"));
                return None;
            }
        };
        let file = if raw.is_absolute() { raw } else { self.base_dir.join(raw) };
        match crate::tls::read_ca_file(&file) {
            Ok(certs) => Some(CaFile { path: file, certs }),
            Err(message) => {
                self.problem(key_path, message);
                None
            }
        }
    }

    fn agent(&mut self, path: &str, table: &Table) -> Option<AgentConfig> {
        const KINDS: &str = "one of echo, command, openai, http";
        const COMMON: &[&str] = &["kind", "history_limit", "on_error", "error_reply", "max_output_bytes"];
        let kind = match table.get("kind") {
            Some(Value::String(kind)) => kind.as_str(),
            Some(other) => {
                self.problem(format!("{path}.kind"), format!("expected a string, got {}", other.type_str()));
                return None;
            }
            None => {
                self.problem(format!("{path}.kind"), format!("missing: {KINDS}"));
                return None;
            }
        };
        let history_limit = self.non_negative_int(table, path, "history_limit", 20) as usize;
        let max_output_bytes = self.positive_int(table, path, "max_output_bytes", 1 << 20) as usize;
        let on_error = match self.choice(table, path, "on_error", &["reply", "silent"]).as_deref() {
            Some("silent") => OnError::Silent,
            _ => OnError::Reply(
                self.optional_string(table, path, "error_reply").unwrap_or_else(|| DEFAULT_ERROR_REPLY.to_string()),
            ),
        };
        let keys = |own: &[&'static str]| -> Vec<&'static str> { COMMON.iter().chain(own).copied().collect() };
        let kind = match kind {
            "echo" => {
                self.known_keys(path, table, &keys(&[]));
                AgentKind::Echo
            }
            "command" => {
                self.known_keys(path, table, &keys(&["command", "timeout_ms", "env"]));
                let argv = self.argv(table, path);
                let timeout = Duration::from_millis(self.positive_int(table, path, "timeout_ms", 30_000));
                let env = self.env_names(table, path);
                if argv.is_empty() {
                    return None;
                }
                AgentKind::Command { argv, timeout, env }
            }
            "openai" => {
                self.known_keys(
                    path,
                    table,
                    &keys(&[
                        "base_url",
                        "model",
                        "api_key_env",
                        "system_prompt",
                        "temperature",
                        "max_tokens",
                        "timeout_ms",
                        "stream",
                    ]),
                );
                let base_url = self.url(table, path, "base_url");
                let model = self.required_string(table, path, "model");
                let api_key_env = self.optional_string(table, path, "api_key_env");
                let system_prompt = self.optional_string(table, path, "system_prompt");
                let temperature = match table.get("temperature") {
                    None => None,
                    Some(Value::Float(t)) if (0.0..=2.0).contains(t) => Some(*t),
                    Some(Value::Integer(t)) if (0..=2).contains(t) => Some(*t as f64),
                    Some(other) => {
                        self.problem(
                            format!("{path}.temperature"),
                            format!("expected a number from 0 to 2, got {other}"),
                        );
                        None
                    }
                };
                let max_tokens = table.get("max_tokens").map(|_| self.positive_int(table, path, "max_tokens", 1));
                let timeout = Duration::from_millis(self.positive_int(table, path, "timeout_ms", 60_000));
                let stream = self.boolean(table, path, "stream", true);
                AgentKind::OpenAi(OpenAiAgent {
                    base_url: base_url?.trim_end_matches('/').to_string(),
                    model: model?,
                    api_key_env,
                    system_prompt,
                    temperature,
                    max_tokens,
                    timeout,
                    stream,
                })
            }
            "http" => {
                self.known_keys(path, table, &keys(&["url", "timeout_ms", "token_env"]));
                let url = self.url(table, path, "url");
                let timeout = Duration::from_millis(self.positive_int(table, path, "timeout_ms", 30_000));
                let token_env = self.optional_string(table, path, "token_env");
                AgentKind::Http { url: url?, timeout, token_env }
            }
            other => {
                self.problem(format!("{path}.kind"), format!("unknown agent kind {other:?}: expected {KINDS}"));
                return None;
            }
        };
        Some(AgentConfig { kind, history_limit, on_error, max_output_bytes })
    }

    /// The environment variables a `command` agent may see (`env`), by name.
    fn env_names(&mut self, table: &Table, path: &str) -> Vec<String> {
        let Some(value) = table.get("env") else {
            return COMMAND_AGENT_ENV.iter().map(|name| name.to_string()).collect();
        };
        let Value::Array(items) = value else {
            self.problem(format!("{path}.env"), "expected an array of environment variable names, e.g. [\"PATH\"]");
            return Vec::new();
        };
        let mut names = Vec::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(name) if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                    names.push(name.to_string())
                }
                _ => self
                    .problem(format!("{path}.env[{i}]"), format!("expected an environment variable name, got {item}")),
            }
        }
        names
    }

    fn argv(&mut self, table: &Table, path: &str) -> Vec<String> {
        match table.get("command") {
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut argv = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(s) => argv.push(s.to_string()),
                        None => self.problem(format!("{path}.command[{i}]"), "expected a string"),
                    }
                }
                argv
            }
            Some(Value::String(program)) if !program.trim().is_empty() => vec![program.clone()],
            Some(_) => {
                self.problem(
                    format!("{path}.command"),
                    "expected a program path or a non-empty array [program, args...]",
                );
                Vec::new()
            }
            None => {
                self.problem(
                    format!("{path}.command"),
                    "missing: the program to run, e.g. [\"/usr/local/bin/my-agent\", \"--json\"]",
                );
                Vec::new()
            }
        }
    }

    fn url(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        let url = self.required_string(table, path, key)?;
        if url.starts_with("http://") || url.starts_with("https://") {
            Some(url)
        } else {
            self.problem(format!("{path}.{key}"), format!("expected an http:// or https:// URL, got {url:?}"));
            None
        }
    }

    fn optional_string(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        match table.get(key) {
            None => None,
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected a non-empty string, got {other}"));
                None
            }
        }
    }

    fn boolean(&mut self, table: &Table, path: &str, key: &str, default: bool) -> bool {
        match table.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected true or false, got {}", other.type_str()));
                default
            }
        }
    }

    /// One of `allowed`, or `None` (with a problem when the key is there but wrong).
    fn choice(&mut self, table: &Table, path: &str, key: &str, allowed: &[&str]) -> Option<String> {
        match table.get(key) {
            None => None,
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => Some(s.clone()),
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected one of {}, got {other}", allowed.join(", ")));
                None
            }
        }
    }

    fn bindings(
        &mut self,
        root: &Table,
        channels: &BTreeMap<String, ChannelConfig>,
        agents: &BTreeMap<String, AgentConfig>,
    ) -> Vec<Binding> {
        let mut bindings = Vec::new();
        let Some(value) = root.get("bindings") else { return bindings };
        let Some(items) = value.as_array() else {
            self.problem("bindings", "expected an array of tables ([[bindings]])");
            return bindings;
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("bindings[{i}]");
            let Some(table) = item.as_table() else {
                self.problem(path, "expected a table");
                continue;
            };
            self.known_keys(&path, table, &["channel", "agent"]);
            let channel = self.required_string(table, &path, "channel");
            let agent = self.required_string(table, &path, "agent");
            if let Some(channel) = &channel {
                if !channels.contains_key(channel) {
                    self.problem(format!("{path}.channel"), format!("no channel instance [channels.{channel}]"));
                }
                if bindings.iter().any(|b: &Binding| &b.channel == channel) {
                    self.problem(
                        format!("{path}.channel"),
                        format!("channel {channel:?} is already bound to an agent"),
                    );
                }
            }
            if let Some(agent) = &agent {
                if !agents.contains_key(agent) {
                    self.problem(format!("{path}.agent"), format!("no agent [agents.{agent}]"));
                }
            }
            if let (Some(channel), Some(agent)) = (channel, agent) {
                bindings.push(Binding { channel, agent });
            }
        }
        bindings
    }

    fn known_keys(&mut self, path: &str, table: &Table, known: &[&str]) {
        for key in table.keys() {
            if !known.contains(&key.as_str()) {
                let full = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                self.problem(full, format!("unknown key (expected one of: {})", known.join(", ")));
            }
        }
    }

    fn table_at<'t>(&mut self, table: &'t Table, path: &str, key: &str) -> Option<&'t Table> {
        let value = table.get(key)?;
        let full = if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
        match value.as_table() {
            Some(t) => Some(t),
            None => {
                self.problem(full, format!("expected a table, got {}", value.type_str()));
                None
            }
        }
    }

    fn required_string(&mut self, table: &Table, path: &str, key: &str) -> Option<String> {
        match table.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(Value::String(_)) => {
                self.problem(format!("{path}.{key}"), "must not be empty");
                None
            }
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected a string, got {}", other.type_str()));
                None
            }
            None => {
                self.problem(format!("{path}.{key}"), "missing");
                None
            }
        }
    }

    fn path(&mut self, table: &Table, path: &str, key: &str, default: &str) -> PathBuf {
        let raw = match table.get(key) {
            None => default.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                self.problem(
                    format!("{path}.{key}"),
                    format!("expected a non-empty path string, got {}", other.type_str()),
                );
                default.to_string()
            }
        };
        let raw = PathBuf::from(raw);
        if raw.is_absolute() {
            raw
        } else {
            self.base_dir.join(raw)
        }
    }

    fn positive_int(&mut self, table: &Table, path: &str, key: &str, default: u64) -> u64 {
        match table.get(key) {
            None => default,
            Some(Value::Integer(n)) if *n > 0 => *n as u64,
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected a positive integer, got {other}"));
                default
            }
        }
    }

    fn non_negative_int(&mut self, table: &Table, path: &str, key: &str, default: u64) -> u64 {
        match table.get(key) {
            None => default,
            Some(Value::Integer(n)) if *n >= 0 => *n as u64,
            Some(other) => {
                self.problem(format!("{path}.{key}"), format!("expected 0 or a positive integer, got {other}"));
                default
            }
        }
    }

    /// Instance and agent ids appear inside session keys, whose parts are `:`-separated.
    fn identifier(&mut self, path: &str, id: &str) {
        let ok = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            self.problem(path, "ids may use only letters, digits, '-' and '_'");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"
[gateway]
state_dir = "state"

[plugins]
dir = "plugins"

[channels.mattermost]
plugin = "mattermost"
base_url = "http://127.0.0.1:8065"
bot_token_env = "MM_BOT_TOKEN"
chatmode = "oncall"
onchar_prefixes = [">", "!"]
dm_policy = "open"
group_policy = "open"
allow_from = []

[agents.main]
kind = "echo"

[[bindings]]
channel = "mattermost"
agent = "main"
"#;

    #[test]
    fn the_documented_minimal_config_parses() {
        let config = Config::parse(SEED, Path::new("/etc/switchboard")).unwrap();
        assert_eq!(config.gateway.state_dir, PathBuf::from("/etc/switchboard/state"));
        assert_eq!(config.plugins.dir, PathBuf::from("/etc/switchboard/plugins"));
        let channel = &config.channels["mattermost"];
        assert_eq!(channel.plugin, "mattermost");
        assert_eq!(channel.adapter_config["chatmode"], "oncall");
        assert!(channel.adapter_config.get("plugin").is_none(), "host keys are not handed to the adapter");
        assert_eq!(config.agent_for("mattermost"), "main");
    }

    #[test]
    fn io_threads_default_to_one_per_cpu_and_can_be_set() {
        let default = Config::parse(SEED, Path::new(".")).unwrap();
        assert_eq!(default.gateway.io_threads, None);
        assert_eq!(default.gateway.io_threads(), std::thread::available_parallelism().unwrap().get());
        let set = Config::parse(&SEED.replace("[gateway]", "[gateway]\nio_threads = 3"), Path::new(".")).unwrap();
        assert_eq!(set.gateway.io_threads(), 3);
        let errors =
            Config::parse(&SEED.replace("[gateway]", "[gateway]\nio_threads = 100000"), Path::new(".")).unwrap_err();
        assert!(errors.iter().any(|e| e.key_path == "gateway.io_threads" && e.message.contains("at most 256")));
    }

    #[test]
    fn the_session_cache_capacity_defaults_and_must_be_positive() {
        let default = Config::parse(SEED, Path::new(".")).unwrap();
        assert_eq!(default.gateway.session_cache_capacity, crate::session::DEFAULT_SESSION_CACHE_CAPACITY);
        let set = Config::parse(&SEED.replace("[gateway]", "[gateway]\nsession_cache_capacity = 10"), Path::new("."))
            .unwrap();
        assert_eq!(set.gateway.session_cache_capacity, 10);
        let errors = Config::parse(&SEED.replace("[gateway]", "[gateway]\nsession_cache_capacity = 0"), Path::new("."))
            .unwrap_err();
        assert!(errors.iter().any(|e| e.key_path == "gateway.session_cache_capacity"), "{errors:?}");
    }

    #[test]
    fn log_format_is_text_or_json_and_anything_else_is_an_error_at_its_key() {
        assert_eq!(Config::parse(SEED, Path::new(".")).unwrap().gateway.log_format, LogFormat::Text);
        let json = Config::parse(&SEED.replace("[gateway]", "[gateway]\nlog_format = \"json\""), Path::new("."));
        assert_eq!(json.unwrap().gateway.log_format, LogFormat::Json);
        for bad in ["\"xml\"", "\"JSON\"", "1"] {
            let errors =
                Config::parse(&SEED.replace("[gateway]", &format!("[gateway]\nlog_format = {bad}")), Path::new("."))
                    .unwrap_err();
            assert!(
                errors.iter().any(|e| e.key_path == "gateway.log_format" && e.message.contains("text, json")),
                "{bad}: {errors:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_key_path() {
        let text = r#"
[gateway]
state_dir = 7
colour = "blue"
typing_delay_ms = -1
io_threads = 0
[channels."bad:id"]
plugin = "mattermost"
[channels.second]
thread_sessions = "yes"
[agents.main]
kind = "oracle"
[agents.cmd]
kind = "command"
[[bindings]]
channel = "nowhere"
agent = "ghost"
"#;
        let errors = Config::parse(text, Path::new(".")).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.key_path.as_str()).collect();
        for expected in [
            "gateway.state_dir",
            "gateway.colour",
            "gateway.typing_delay_ms",
            "gateway.io_threads",
            "channels.bad:id",
            "channels.second.plugin",
            "channels.second.thread_sessions",
            "agents.main.kind",
            "agents.cmd.command",
            "bindings[0].channel",
            "bindings[0].agent",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
    }

    fn self_signed_ca_pem(name: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn ca_file_is_a_host_key_read_with_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let two = format!("{}{}", self_signed_ca_pem("one"), self_signed_ca_pem("two"));
        std::fs::write(dir.path().join("ca.pem"), &two).unwrap();
        let text = SEED.replace("plugin = \"mattermost\"\n", "plugin = \"mattermost\"\nca_file = \"ca.pem\"\n");
        let config = Config::parse(&text, dir.path()).unwrap();
        let channel = &config.channels["mattermost"];
        let ca_file = channel.ca_file.as_ref().unwrap();
        assert_eq!(ca_file.path, dir.path().join("ca.pem"));
        assert_eq!(ca_file.certs.len(), 2);
        assert!(channel.adapter_config.get("ca_file").is_none(), "ca_file is not handed to the adapter");
        assert_eq!(Config::parse(SEED, dir.path()).unwrap().channels["mattermost"].ca_file, None);

        // Same path, new content: the instance's config differs, so a reload rebuilds it.
        std::fs::write(dir.path().join("ca.pem"), self_signed_ca_pem("three")).unwrap();
        let reread = Config::parse(&text, dir.path()).unwrap();
        assert_ne!(reread.channels["mattermost"], config.channels["mattermost"]);
    }

    #[test]
    fn a_bad_ca_file_is_reported_at_its_key_path_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
        let with = |value: &str| {
            SEED.replace(
                "plugin = \"mattermost\"\n",
                &format!("plugin = \"mattermost\"\nca_file = {value}\nthread_sessions = 1\n"),
            )
        };
        for (value, wanted) in [
            ("\"missing.pem\"", "cannot read"),
            ("\"empty.pem\"", "holds no certificate"),
            ("3", "expected a path"),
            ("\"\"", "expected a path"),
        ] {
            let errors = Config::parse(&with(value), dir.path()).unwrap_err();
            let error = errors.iter().find(|e| e.key_path == "channels.mattermost.ca_file");
            assert!(error.is_some_and(|e| e.message.contains(wanted)), "ca_file = {value}: {errors:?}");
            assert!(errors.iter().any(|e| e.key_path == "channels.mattermost.thread_sessions"), "{errors:?}");
        }
    }

    #[test]
    fn broken_toml_is_one_clear_error() {
        let errors = Config::parse("[gateway\nstate_dir=", Path::new(".")).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].message.starts_with("not valid TOML"), "{}", errors[0]);
    }

    /// Random configs, from byte soup to the real config with its values swapped for wrong
    /// ones: never a panic, and every error says where and what.
    mod randomized {
        use proptest::prelude::*;

        use super::super::Config;

        const KEYS: &[&str] = &[
            "gateway.state_dir",
            "gateway.admin_listen",
            "gateway.admin_socket",
            "gateway.admin_token_env",
            "gateway.max_concurrent_turns",
            "gateway.lane_capacity",
            "gateway.durability",
            "gateway.io_threads",
            "gateway.session_cache_capacity",
            "gateway.log_format",
            "gateway.generation_budget",
            "gateway.ws_max_message_bytes",
            "plugins.dir",
            "plugins.settle_ms",
            "retention.delivered_days",
            "channels.mm.plugin",
            "channels.mm.thread_sessions",
            "channels.mm.ca_file",
            "agents.main.kind",
            "agents.main.command",
            "agents.main.env",
            "agents.main.max_output_bytes",
            "agents.main.on_error",
            "agents.main.base_url",
        ];

        fn toml_value() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                "[a-z0-9:/._ -]{0,24}".prop_map(|s| format!("{s:?}")),
                prop::collection::vec("[a-z]{0,6}", 0..4).prop_map(|v| format!("{v:?}")),
                Just("{ a = 1 }".to_string()),
                Just("1.5".to_string()),
            ]
        }

        fn config_text() -> impl Strategy<Value = String> {
            let line = (prop::sample::select(KEYS), toml_value());
            prop::collection::vec(line, 0..12).prop_map(|lines| {
                let mut tables: std::collections::BTreeMap<String, Vec<String>> = Default::default();
                for (key, value) in lines {
                    let (table, leaf) = key.rsplit_once('.').unwrap();
                    tables.entry(table.to_string()).or_default().push(format!("{leaf} = {value}"));
                }
                tables
                    .into_iter()
                    .map(|(table, mut lines)| {
                        lines.sort();
                        lines.dedup_by(|a, b| a.split(' ').next() == b.split(' ').next());
                        format!("[{table}]\n{}\n", lines.join("\n"))
                    })
                    .collect()
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(1024))]

            #[test]
            fn no_config_text_panics_and_every_error_is_placed(
                text in prop_oneof![".{0,200}".boxed(), config_text().boxed()]
            ) {
                let dir = std::env::temp_dir();
                let outcome = std::panic::catch_unwind(|| Config::parse(&text, &dir));
                prop_assert!(outcome.is_ok(), "panicked on {text:?}");
                if let Ok(Err(errors)) = outcome {
                    prop_assert!(!errors.is_empty());
                    for error in errors {
                        prop_assert!(!error.message.is_empty(), "{error:?}");
                    }
                }
            }
        }
    }
}
