//! The adapter's config keys (the `[channels.<id>]` table minus the host's keys), validated
//! all at once with key paths.

use serde_json::{Map, Value};
use switchboard_plugin_api::ConfigProblem;

pub const MAX_POST_CHARS: u64 = 16383;

const KEYS: &[&str] = &[
    "base_url",
    "bot_token_env",
    "chatmode",
    "onchar_prefixes",
    "dm_policy",
    "group_policy",
    "allow_from",
    "channels",
    "typing",
    "max_post_chars",
    "reconnect_initial_ms",
    "reconnect_max_ms",
    "request_timeout_ms",
    "ping_interval_ms",
    "allow_bots",
    "mention_words",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatMode {
    OnCall,
    OnMessage,
    OnChar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Open,
    Allowlist,
    Disabled,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// Without a trailing slash.
    pub base_url: String,
    pub bot_token_env: String,
    pub chatmode: ChatMode,
    pub onchar_prefixes: Vec<String>,
    pub dm_policy: Policy,
    pub group_policy: Policy,
    /// Lower-cased user ids or usernames (without `@`).
    pub allow_from: Vec<String>,
    /// Channel ids or names; empty = every channel the bot is in.
    pub channels: Vec<String>,
    pub typing: bool,
    pub max_post_chars: usize,
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    pub request_timeout_ms: u64,
    pub ping_interval_ms: u64,
    /// Answer posts by bot accounts and webhooks too (off: two bots would answer each other).
    pub allow_bots: bool,
    /// Words besides `@<bot>` that count as calling the bot in `oncall` (whole words, any case).
    pub mention_words: Vec<String>,
}

impl Settings {
    pub fn websocket_url(&self) -> String {
        let base = if let Some(rest) = self.base_url.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base_url.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.base_url.clone()
        };
        format!("{base}/api/v4/websocket")
    }

    pub fn api(&self, path: &str) -> String {
        format!("{}/api/v4{path}", self.base_url)
    }

    pub fn allowed(&self, user_id: &str, username: &str) -> bool {
        let id = user_id.to_lowercase();
        let name = username.trim_start_matches('@').to_lowercase();
        self.allow_from.iter().any(|a| *a == id || *a == name)
    }
}

/// Parse `json`, collecting every problem.
pub fn parse(json: &str) -> Result<Settings, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut problem =
        |key: &str, message: String| problems.push(ConfigProblem { key_path: key.into(), message: message.into() });
    let table: Map<String, Value> = match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(table)) => table,
        Ok(_) => {
            problem("", "the channel config must be a table".into());
            return Err(problems);
        }
        Err(e) => {
            problem("", format!("not valid JSON: {e}"));
            return Err(problems);
        }
    };
    for key in table.keys().filter(|k| !KEYS.contains(&k.as_str())) {
        problem(key, format!("unknown key for the mattermost adapter (known: {})", KEYS.join(", ")));
    }

    let base_url = match table.get("base_url") {
        Some(Value::String(url)) if url.starts_with("http://") || url.starts_with("https://") => {
            url.trim_end_matches('/').to_string()
        }
        Some(other) => {
            problem("base_url", format!("expected an http:// or https:// URL, got {other}"));
            String::new()
        }
        None => {
            problem("base_url", "missing: the Mattermost server URL, e.g. \"https://chat.example.com\"".into());
            String::new()
        }
    };
    let bot_token_env = match table.get("bot_token_env") {
        Some(Value::String(name))
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            name.clone()
        }
        Some(_) => {
            problem("bot_token_env", "expected the name of an environment variable, e.g. \"MM_BOT_TOKEN\"".into());
            String::new()
        }
        None => {
            problem("bot_token_env", "missing: the environment variable that holds the bot token".into());
            String::new()
        }
    };
    let chatmode = match table.get("chatmode").map(|v| (v, v.as_str())) {
        None => ChatMode::OnCall,
        Some((_, Some("oncall"))) => ChatMode::OnCall,
        Some((_, Some("onmessage"))) => ChatMode::OnMessage,
        Some((_, Some("onchar"))) => ChatMode::OnChar,
        Some((value, _)) => {
            problem("chatmode", format!("expected one of oncall, onmessage, onchar; got {value}"));
            ChatMode::OnCall
        }
    };
    let mut policy = |key: &str| match table.get(key).map(|v| (v, v.as_str())) {
        None => Policy::Open,
        Some((_, Some("open"))) => Policy::Open,
        Some((_, Some("allowlist"))) => Policy::Allowlist,
        Some((_, Some("disabled"))) => Policy::Disabled,
        Some((value, _)) => {
            problem(key, format!("expected one of open, allowlist, disabled; got {value}"));
            Policy::Open
        }
    };
    let dm_policy = policy("dm_policy");
    let group_policy = policy("group_policy");
    let mut strings = |key: &str, default: &[&str]| -> Vec<String> {
        match table.get(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().map(str::trim) {
                        Some(s) if !s.is_empty() => out.push(s.to_string()),
                        _ => problem(&format!("{key}[{i}]"), format!("expected a non-empty string, got {item}")),
                    }
                }
                out
            }
            Some(other) => {
                problem(key, format!("expected an array of strings, got {other}"));
                Vec::new()
            }
        }
    };
    let onchar_prefixes = strings("onchar_prefixes", &[">", "!"]);
    let allow_from: Vec<String> =
        strings("allow_from", &[]).into_iter().map(|a| a.trim_start_matches('@').to_lowercase()).collect();
    let channels = strings("channels", &[]);
    let mention_words = strings("mention_words", &[]);
    let mut flag = |key: &str, default: bool| match table.get(key) {
        None => default,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problem(key, format!("expected true or false, got {other}"));
            default
        }
    };
    let typing = flag("typing", true);
    let allow_bots = flag("allow_bots", false);
    let mut number = |key: &str, default: u64, min: u64, max: u64| match table.get(key) {
        None => default,
        Some(value) => match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => n,
            _ => {
                problem(key, format!("expected a whole number from {min} to {max}, got {value}"));
                default
            }
        },
    };
    let max_post_chars = number("max_post_chars", MAX_POST_CHARS, 1, MAX_POST_CHARS) as usize;
    let reconnect_initial_ms = number("reconnect_initial_ms", 1000, 10, 600_000);
    let reconnect_max_ms = number("reconnect_max_ms", 60_000, 10, 3_600_000);
    let request_timeout_ms = number("request_timeout_ms", 15_000, 100, 600_000);
    let ping_interval_ms = number("ping_interval_ms", 30_000, 100, 3_600_000);
    if reconnect_max_ms < reconnect_initial_ms {
        problem("reconnect_max_ms", "must not be smaller than reconnect_initial_ms".into());
    }
    if (dm_policy == Policy::Allowlist || group_policy == Policy::Allowlist) && allow_from.is_empty() {
        problem("allow_from", "an allowlist policy is set but allow_from is empty, so nobody would be answered".into());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        base_url,
        bot_token_env,
        chatmode,
        onchar_prefixes,
        dm_policy,
        group_policy,
        allow_from,
        channels,
        typing,
        max_post_chars,
        reconnect_initial_ms,
        reconnect_max_ms,
        request_timeout_ms,
        ping_interval_ms,
        allow_bots,
        mention_words,
    })
}
