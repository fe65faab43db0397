//! The adapter's config keys (the `[channels.<id>]` table without the host's keys `plugin`,
//! `thread_sessions` and `ca_file`), validated all at once with key paths.

use serde_json::{Map, Value};
use switchboard_plugin_api::ConfigProblem;

const KEYS: &[&str] = &[
    "homeserver_url",
    "user_id",
    "access_token_env",
    "chatmode",
    "onchar_prefixes",
    "dm_policy",
    "group_policy",
    "allow_from",
    "rooms",
    "auto_join",
    "ignore_users",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatMode {
    /// Answer when the bot is mentioned (DMs always count as addressed).
    OnCall,
    /// Answer every message.
    OnMessage,
    /// Answer messages that start with one of `onchar_prefixes`.
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
    pub homeserver_url: String,
    /// The bot's MXID, `@localpart:server`.
    pub user_id: String,
    pub access_token_env: String,
    pub chatmode: ChatMode,
    pub onchar_prefixes: Vec<String>,
    pub dm_policy: Policy,
    pub group_policy: Policy,
    /// Lower-cased MXIDs.
    pub allow_from: Vec<String>,
    /// Room ids (`!…`) or aliases (`#…:server`); empty = every joined room.
    pub rooms: Vec<String>,
    pub auto_join: bool,
    /// Lower-cased MXIDs whose messages are never answered (other bots).
    pub ignore_users: Vec<String>,
}

impl Settings {
    /// A client-server API v3 URL for `path_and_query` (which starts with `/`).
    pub fn client_api(&self, path_and_query: &str) -> String {
        format!("{}/_matrix/client/v3{path_and_query}", self.homeserver_url)
    }

    /// The bot's localpart (`switchboard` of `@switchboard:localhost`).
    pub fn localpart(&self) -> &str {
        self.user_id.trim_start_matches('@').split(':').next().unwrap_or_default()
    }

    pub fn allowed(&self, user_id: &str) -> bool {
        let user_id = user_id.to_lowercase();
        self.allow_from.contains(&user_id)
    }

    pub fn ignored(&self, user_id: &str) -> bool {
        let user_id = user_id.to_lowercase();
        self.ignore_users.contains(&user_id)
    }

    /// Which account and server a saved state belongs to: a state of another one is not resumed.
    pub fn account(&self) -> String {
        format!("{} on {}", self.user_id, self.homeserver_url)
    }
}

/// `@localpart:server`, as far as a config can tell.
fn is_user_id(value: &str) -> bool {
    match value.strip_prefix('@').and_then(|rest| rest.split_once(':')) {
        Some((local, server)) => !local.is_empty() && !server.is_empty() && !value.contains(char::is_whitespace),
        None => false,
    }
}

/// A room id (`!opaque`, with or without `:server` depending on the room version) or an alias
/// (`#name:server`).
fn is_room(value: &str) -> bool {
    if value.contains(char::is_whitespace) {
        return false;
    }
    if let Some(id) = value.strip_prefix('!') {
        return !id.is_empty();
    }
    matches!(value.strip_prefix('#').and_then(|rest| rest.split_once(':')), Some((name, server)) if !name.is_empty() && !server.is_empty())
}

/// How a list's items must look: a check, and what to say when one fails it.
type ItemShape = (fn(&str) -> bool, &'static str);

/// Parse `json`, collecting every problem.
pub fn parse(json: &str) -> Result<Settings, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut problem = |key: &str, message: String| problems.push(ConfigProblem::new(key, message));
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
        problem(key, format!("unknown key for the matrix adapter (known: {})", KEYS.join(", ")));
    }

    // A required string: its check, what it should be (said when it is not) and an example.
    let mut required = |key: &str, check: fn(&str) -> bool, shape: &str, example: &str| match table.get(key) {
        Some(Value::String(value)) if check(value) => value.clone(),
        Some(other) => {
            problem(key, format!("expected {shape}, e.g. {example:?}; got {other}"));
            String::new()
        }
        None => {
            problem(key, format!("missing: {shape}, e.g. {example:?}"));
            String::new()
        }
    };
    let homeserver_url = required(
        "homeserver_url",
        |url| url.starts_with("http://") || url.starts_with("https://"),
        "the homeserver's http:// or https:// URL",
        "https://matrix.example.org",
    )
    .trim_end_matches('/')
    .to_string();
    let user_id = required("user_id", is_user_id, "the bot's Matrix id", "@switchboard:example.org");
    let access_token_env = required(
        "access_token_env",
        |name| !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "the name of the environment variable that holds the access token",
        "MATRIX_ACCESS_TOKEN",
    );
    let chatmode = match table.get("chatmode").map(|v| (v, v.as_str())) {
        None | Some((_, Some("oncall"))) => ChatMode::OnCall,
        Some((_, Some("onmessage"))) => ChatMode::OnMessage,
        Some((_, Some("onchar"))) => ChatMode::OnChar,
        Some((value, _)) => {
            problem("chatmode", format!("expected one of oncall, onmessage, onchar; got {value}"));
            ChatMode::OnCall
        }
    };
    let mut policy = |key: &str| match table.get(key).map(|v| (v, v.as_str())) {
        None | Some((_, Some("open"))) => Policy::Open,
        Some((_, Some("allowlist"))) => Policy::Allowlist,
        Some((_, Some("disabled"))) => Policy::Disabled,
        Some((value, _)) => {
            problem(key, format!("expected one of open, allowlist, disabled; got {value}"));
            Policy::Open
        }
    };
    let dm_policy = policy("dm_policy");
    let group_policy = policy("group_policy");
    // Each list item is checked by `valid` (what it should look like, for the message).
    let mut strings = |key: &str, default: &[&str], valid: Option<ItemShape>| -> Vec<String> {
        match table.get(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str().map(str::trim) {
                        Some(s) if !s.is_empty() => match valid {
                            Some((check, shape)) if !check(s) => {
                                problem(&format!("{key}[{i}]"), format!("expected {shape}, got {item}"))
                            }
                            _ => out.push(s.to_string()),
                        },
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
    let user_shape: ItemShape = (is_user_id, "a Matrix user id like \"@alice:example.org\"");
    let onchar_prefixes = strings("onchar_prefixes", &[">", "!"], None);
    let allow_from: Vec<String> =
        strings("allow_from", &[], Some(user_shape)).iter().map(|id| id.to_lowercase()).collect();
    let rooms = strings("rooms", &[], Some((is_room, "a room id (\"!…\") or alias (\"#name:example.org\")")));
    let ignore_users: Vec<String> =
        strings("ignore_users", &[], Some(user_shape)).iter().map(|id| id.to_lowercase()).collect();
    let auto_join = match table.get("auto_join") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            problem("auto_join", format!("expected true or false, got {other}"));
            true
        }
    };
    if (dm_policy == Policy::Allowlist || group_policy == Policy::Allowlist) && allow_from.is_empty() {
        problem("allow_from", "an allowlist policy is set but allow_from is empty, so nobody would be answered".into());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        homeserver_url,
        user_id,
        access_token_env,
        chatmode,
        onchar_prefixes,
        dm_policy,
        group_policy,
        allow_from,
        rooms,
        auto_join,
        ignore_users,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_aliases_are_told_apart_from_garbage() {
        assert!(is_user_id("@alice:example.org"));
        assert!(!is_user_id("alice:example.org"));
        assert!(!is_user_id("@alice"));
        assert!(!is_user_id("@:example.org"));
        assert!(is_room("!Y14LkkjbxfNz3DBtL9jEJhmSljaf-bMt4PIx0e60nmM"), "room version 12 ids have no server");
        assert!(is_room("!abc:example.org"));
        assert!(is_room("#ops:example.org"));
        assert!(!is_room("#ops"));
        assert!(!is_room("ops"));
    }
}
