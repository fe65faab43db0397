//! Every HTTP request the adapter makes is built in [`Adapter::issue`] from what it is for
//! ([`Pending`]) and the state as it is then, and its answer is routed back by request id.
//! The access token goes into the `Authorization` header only, never into a URL or a log.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_plugin_api::{Action, Header, HttpCall, LogLevel};

use super::{Adapter, TimerPurpose};

/// Every request but a long-polling `/sync` times out after this.
const REQUEST_TIMEOUT_MS: u64 = 30_000;
/// How long the server holds a `/sync` open when nothing happens.
pub(super) const SYNC_TIMEOUT_MS: u64 = 30_000;
/// A failed side request (alias, join) is tried this many times.
const ATTEMPTS: u32 = 6;
/// The largest `/sync` or `/messages` answer taken (ABI v1.1 hosts; a v1.0 host caps every
/// answer at 8 MiB).
const LARGE_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Pending {
    /// `GET /account/whoami`: the token works and is the configured user's.
    WhoAmI,
    /// The bot's display name (a way people address it).
    Profile,
    /// Resolving an alias of the `rooms` allowlist.
    Alias(String),
    /// `GET /sync` from `since` (`None`: the first sync).
    Sync { since: Option<String> },
    /// Filling a limited timeline of the held sync answer: `/messages` backwards from `from`
    /// down to the held sync's `since`.
    Backfill { room: String, from: String },
    /// Accepting an invite.
    Join(String),
    /// A part of a reply.
    Send { reply_id: u64, part: usize },
    /// Typing on or off in a room (best effort, answers ignored).
    Typing { room: String, typing: bool },
}

impl Pending {
    /// The room a request concerns, if one.
    pub(super) fn room(&self) -> Option<String> {
        match self {
            Pending::Backfill { room, .. } | Pending::Join(room) | Pending::Typing { room, .. } => Some(room.clone()),
            _ => None,
        }
    }

    fn key(&self) -> String {
        format!("{self:?}")
    }
}

/// A Matrix error answer's `errcode` and, for a rate limit, how long to wait.
pub(super) struct MatrixError {
    pub(super) errcode: String,
    pub(super) retry_after_ms: Option<u64>,
}

impl MatrixError {
    pub(super) fn parse(headers: &[Header], body: &str) -> Self {
        let value: Value = serde_json::from_str(body).unwrap_or_default();
        let header_seconds = headers
            .iter()
            .find(|h| h.name.as_str().eq_ignore_ascii_case("retry-after"))
            .and_then(|h| h.value.as_str().trim().parse::<u64>().ok())
            .map(|s| s * 1000);
        Self {
            errcode: value["errcode"].as_str().unwrap_or_default().to_string(),
            retry_after_ms: value["retry_after_ms"].as_u64().or(header_seconds),
        }
    }

    pub(super) fn token_refused(&self, status: u16) -> bool {
        status == 401 || self.errcode == "M_UNKNOWN_TOKEN" || self.errcode == "M_MISSING_TOKEN"
    }
}

/// A URL path segment or query value, percent-encoded (everything but unreserved characters).
pub(super) fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3 / 2);
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl Adapter {
    /// Send `pending` unless the same request is already in flight.
    pub(super) fn request(&mut self, pending: Pending) {
        if self.state.requests.values().any(|p| *p == pending) {
            return;
        }
        self.issue(pending);
    }

    /// Build the request for `pending` from the state as it is now and send it: the one place
    /// requests are made.
    fn issue(&mut self, pending: Pending) {
        let user = encode(&self.settings.user_id);
        let (method, path, body, timeout_ms) = match &pending {
            Pending::WhoAmI => ("GET", "/account/whoami".to_string(), None, REQUEST_TIMEOUT_MS),
            Pending::Profile => ("GET", format!("/profile/{user}/displayname"), None, REQUEST_TIMEOUT_MS),
            Pending::Alias(alias) => ("GET", format!("/directory/room/{}", encode(alias)), None, REQUEST_TIMEOUT_MS),
            Pending::Sync { since } => {
                let path = self.sync_path(since.as_deref());
                ("GET", path, None, SYNC_TIMEOUT_MS + REQUEST_TIMEOUT_MS)
            }
            Pending::Backfill { room, from } => {
                let Some(path) = self.backfill_path(room, from) else { return };
                ("GET", path, None, REQUEST_TIMEOUT_MS)
            }
            Pending::Join(room) => {
                ("POST", format!("/rooms/{}/join", encode(room)), Some(json!({})), REQUEST_TIMEOUT_MS)
            }
            Pending::Send { reply_id, part } => {
                let Some((path, content)) = self.send_request(*reply_id, *part) else { return };
                ("PUT", path, Some(content), REQUEST_TIMEOUT_MS)
            }
            Pending::Typing { room, typing } => {
                let body = if *typing { json!({"typing": true, "timeout": 30_000}) } else { json!({"typing": false}) };
                ("PUT", format!("/rooms/{}/typing/{user}", encode(room)), Some(body), REQUEST_TIMEOUT_MS)
            }
        };
        let request = self.next_id();
        let mut headers = vec![Header::new("Authorization", &format!("Bearer {}", self.token))];
        if body.is_some() {
            headers.push(Header::new("Content-Type", "application/json"));
        }
        let max_response_bytes = match pending {
            // A first sync, or one after a long gap, on a busy account is large.
            Pending::Sync { .. } | Pending::Backfill { .. } => LARGE_RESPONSE_BYTES,
            _ => 0,
        };
        self.state.requests.insert(request, pending);
        let url = self.settings.client_api(&path);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.out.push(if self.host_v1_1 {
            let mut call = HttpCall::text(request, method, &url, headers, &body, timeout_ms);
            call.max_response_bytes = max_response_bytes;
            Action::HttpCall(call)
        } else {
            Action::HttpRequest {
                request,
                method: method.into(),
                url: url.into(),
                headers: headers.into(),
                body: body.into(),
                timeout_ms,
            }
        });
    }

    pub(super) fn http_response(&mut self, request: u64, status: u16, headers: &[Header], body: &str) {
        let Some(pending) = self.state.requests.remove(&request) else { return };
        if (200..300).contains(&status) {
            self.state.failures.remove(&pending.key());
            if !matches!(pending, Pending::Typing { .. }) {
                self.token_accepted();
            }
        }
        match pending {
            Pending::WhoAmI => self.whoami_answered(status, headers, body),
            Pending::Profile => {
                let profile: Value = serde_json::from_str(body).unwrap_or_default();
                if let (200, Some(name)) = (status, profile["displayname"].as_str()) {
                    self.state.display_name = name.trim().to_string();
                }
            }
            Pending::Alias(alias) => self.alias_answered(alias, status, headers, body),
            Pending::Sync { since } => self.sync_answered(request, since, status, headers, body),
            Pending::Backfill { room, from } => self.backfill_answered(&room, &from, status, body),
            Pending::Join(room) => self.join_answered(room, status, headers, body),
            Pending::Send { reply_id, part } => self.send_answered(reply_id, part, status, headers, body),
            Pending::Typing { .. } => {}
        }
    }

    /// A response the host dead-lettered (the adapter failed on it twice): a sync's answer
    /// still moves `since` past it, without its messages (else the next sync brings them back
    /// and the adapter fails again); any other request counts as failed.
    pub(super) fn http_skipped(&mut self, request: u64, body: &str) {
        let next_batch = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|answer| answer["next_batch"].as_str().map(str::to_string));
        match (self.state.requests.get(&request), next_batch) {
            (Some(Pending::Sync { since }), Some(next_batch)) if *since == self.state.since => {
                self.state.requests.remove(&request);
                self.log(
                    LogLevel::Error,
                    format!(
                        "a sync answer was dead-lettered; its messages are skipped, the sync goes on from {next_batch}"
                    ),
                );
                self.state.since = Some(next_batch);
                self.maybe_start_sync();
            }
            _ => self.http_failed(request, "the response was dead-lettered"),
        }
    }

    pub(super) fn http_failed(&mut self, request: u64, error: &str) {
        let Some(pending) = self.state.requests.remove(&request) else { return };
        match pending {
            Pending::WhoAmI => self.whoami_answered(0, &[], error),
            Pending::Alias(alias) => self.alias_answered(alias, 0, &[], error),
            Pending::Sync { since } => self.sync_failed(since, error),
            Pending::Backfill { room, from } => self.backfill_answered(&room, &from, 0, error),
            Pending::Join(room) => self.join_answered(room, 0, &[], error),
            Pending::Send { reply_id, part } => self.send_failed(reply_id, part, error.to_string()),
            Pending::Profile | Pending::Typing { .. } => {}
        }
    }

    /// Try `pending` again after `purpose`'s timer; `false` once it failed [`ATTEMPTS`] times.
    pub(super) fn retry_later(&mut self, pending: &Pending, purpose: TimerPurpose, what: String) -> bool {
        let key = pending.key();
        let failures = {
            let count = self.state.failures.entry(key.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if failures >= ATTEMPTS {
            self.state.failures.remove(&key);
            self.log(LogLevel::Error, format!("{what}; giving up after {failures} attempts"));
            return false;
        }
        let wait = self.backoff(1000, failures - 1, 60_000);
        self.log(LogLevel::Warn, format!("{what}; retrying in {wait} ms"));
        self.set_timer(purpose, wait);
        true
    }

    fn whoami_answered(&mut self, status: u16, headers: &[Header], body: &str) {
        let answer: Value = serde_json::from_str(body).unwrap_or_default();
        let error = MatrixError::parse(headers, body);
        match (status, answer["user_id"].as_str()) {
            (200, Some(user_id)) if user_id == self.settings.user_id => {
                self.state.verified = true;
                self.state.failures.remove(&Pending::WhoAmI.key());
                self.log(LogLevel::Info, format!("signed in as {user_id}"));
                self.request(Pending::Profile);
                self.resolve_aliases();
                self.maybe_start_sync();
            }
            (200, Some(user_id)) => {
                let detail = format!(
                    "the access token in {} is {user_id}'s, not the configured user_id {}; not syncing",
                    self.settings.access_token_env, self.settings.user_id
                );
                self.log(LogLevel::Error, detail.clone());
                self.out.push(Action::Health { healthy: false, detail: detail.into() });
            }
            _ if error.token_refused(status) => {
                self.token_refused("whoami answered 401");
                self.set_timer(TimerPurpose::WhoAmI, 30_000);
            }
            _ => {
                let failures = self.state.failures.entry(Pending::WhoAmI.key()).or_insert(0);
                *failures += 1;
                let failures = *failures;
                let wait = match error.retry_after_ms {
                    Some(wait) if status == 429 => wait,
                    _ => self.backoff(1000, failures - 1, 60_000),
                };
                let what = if status == 0 { body.to_string() } else { format!("{status} {}", error.errcode) };
                self.log(LogLevel::Warn, format!("whoami failed ({what}); retrying in {wait} ms"));
                self.set_timer(TimerPurpose::WhoAmI, wait);
            }
        }
    }

    /// Resolve the aliases of the `rooms` allowlist not resolved yet.
    pub(super) fn resolve_aliases(&mut self) {
        let unresolved: Vec<String> = self
            .settings
            .rooms
            .iter()
            .filter(|r| r.starts_with('#') && !self.state.aliases.contains_key(*r))
            .cloned()
            .collect();
        for alias in unresolved {
            if !self.timer_armed(&TimerPurpose::Alias(alias.clone())) {
                self.request(Pending::Alias(alias));
            }
        }
    }

    /// Whether aliases are still being resolved (the first sync waits for them).
    pub(super) fn resolving_aliases(&self) -> bool {
        self.state.requests.values().any(|p| matches!(p, Pending::Alias(_)))
            || self.state.timers.values().any(|t| matches!(t, TimerPurpose::Alias(_)))
    }

    fn alias_answered(&mut self, alias: String, status: u16, headers: &[Header], body: &str) {
        let answer: Value = serde_json::from_str(body).unwrap_or_default();
        match (status, answer["room_id"].as_str()) {
            (200, Some(room_id)) => {
                self.log(LogLevel::Info, format!("room alias {alias} is {room_id}"));
                self.state.aliases.insert(alias, room_id.to_string());
            }
            (404, _) => {
                self.log(
                    LogLevel::Warn,
                    format!("room alias {alias} (in rooms) does not exist; its room is not answered"),
                );
            }
            _ => {
                let error = MatrixError::parse(headers, body);
                let what = format!("resolving {alias} failed ({status} {})", error.errcode);
                self.retry_later(&Pending::Alias(alias.clone()), TimerPurpose::Alias(alias), what);
            }
        }
        self.maybe_start_sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_encoded_as_path_segments() {
        assert_eq!(encode("!abc:example.org"), "%21abc%3Aexample.org");
        assert_eq!(encode("#ops:x"), "%23ops%3Ax");
        assert_eq!(encode("plain-id_1.2~"), "plain-id_1.2~");
        assert_eq!(encode("é"), "%C3%A9");
    }
}
