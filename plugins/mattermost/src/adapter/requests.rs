//! Every REST request goes through here: built from what it is for ([`Pending`]) and the
//! adapter's state, so it can be sent again as it is now (after a rate limit, a retry, a
//! swap). A 429 holds *every* request until the server's `Retry-After` (the real server's
//! limit is per IP or user across all routes, app/ratelimit.go), and background requests —
//! catch-up pages, channel listings, user look-ups, looks for posted replies — go at most
//! [`BACKGROUND_CONCURRENCY`] at a time, so a gap over many channels does not fire all at once.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_plugin_api::{Action, Header, LogLevel};

use super::{Adapter, TimerPurpose};

/// Background requests in flight at most.
const BACKGROUND_CONCURRENCY: usize = 4;
/// A failed background request is tried this many times before it is given up.
const BACKGROUND_ATTEMPTS: u32 = 6;
/// Without a usable `Retry-After` or `X-Ratelimit-Reset`, a 429 holds requests this long.
const DEFAULT_RATE_LIMIT_WAIT_MS: u64 = 1000;

/// What a REST request is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Pending {
    /// Posting a part of a reply.
    Post(u64),
    /// Looking for parts of a reply that may already be posted.
    Verify(u64),
    /// Fetching what a channel missed while resume was impossible.
    CatchUp(String),
    /// `GET /users/me`.
    Me,
    /// After a gap: the bot's teams, then its channels in each (DMs and groups included).
    Teams,
    TeamChannels(String),
    /// The bot's channels when it is in no team.
    MyChannels,
    /// The username of a caught-up post's sender.
    User(String),
}

impl Pending {
    fn background(&self) -> bool {
        !matches!(self, Pending::Post(_) | Pending::Me)
    }

    fn key(&self) -> String {
        format!("{self:?}")
    }
}

impl Adapter {
    pub(super) fn auth_headers(&self) -> Vec<Header> {
        vec![
            Header { name: "Authorization".into(), value: format!("Bearer {}", self.token).into() },
            Header { name: "X-Requested-With".into(), value: "XMLHttpRequest".into() },
        ]
    }

    /// Send `pending` now if the rate limit and the concurrency bound allow, else queue it.
    pub(super) fn request(&mut self, pending: Pending) {
        if self.state.requests.values().any(|p| *p == pending) {
            return;
        }
        if self.may_send(&pending) {
            self.issue(pending);
        } else if !self.state.queue.contains(&pending) {
            self.mark_queued(&pending, true);
            self.state.queue.push_back(pending);
            self.wake_when_unthrottled();
        }
    }

    fn may_send(&self, pending: &Pending) -> bool {
        if self.host.now_ms() < self.state.throttled_until_ms {
            return false;
        }
        !pending.background()
            || self.state.requests.values().filter(|p| p.background()).count() < BACKGROUND_CONCURRENCY
    }

    /// Send what the queue holds, in order, as far as the limits allow.
    pub(super) fn pump(&mut self) {
        if self.state.queue.is_empty() {
            return;
        }
        if self.host.now_ms() < self.state.throttled_until_ms {
            self.wake_when_unthrottled();
            return;
        }
        let queued = std::mem::take(&mut self.state.queue);
        for pending in queued {
            if self.may_send(&pending) {
                self.issue(pending);
            } else {
                self.state.queue.push_back(pending);
            }
        }
    }

    fn wake_when_unthrottled(&mut self) {
        let wait = self.state.throttled_until_ms - self.host.now_ms();
        if wait > 0 && !self.state.timers.values().any(|t| matches!(t, TimerPurpose::Unthrottle)) {
            self.set_timer(TimerPurpose::Unthrottle, wait as u64);
        }
    }

    fn mark_queued(&mut self, pending: &Pending, queued: bool) {
        if let Pending::Post(reply_id) | Pending::Verify(reply_id) = pending {
            if let Some(delivery) = self.state.deliveries.get_mut(reply_id) {
                delivery.queued = queued;
            }
        }
    }

    /// Build the request for `pending` from the state as it is now, and send it.
    fn issue(&mut self, pending: Pending) {
        self.mark_queued(&pending, false);
        let built = match &pending {
            Pending::Post(reply_id) => self.post_request(*reply_id),
            Pending::Verify(reply_id) => self.verify_request(*reply_id),
            Pending::CatchUp(channel_id) => self.catch_up_request(channel_id),
            Pending::Me => Some(("GET", "/users/me".to_string(), String::new())),
            Pending::Teams => Some(("GET", "/users/me/teams".to_string(), String::new())),
            Pending::TeamChannels(team_id) => {
                Some(("GET", format!("/users/me/teams/{team_id}/channels"), String::new()))
            }
            Pending::MyChannels => Some(("GET", "/users/me/channels".to_string(), String::new())),
            Pending::User(user_id) => Some(("GET", format!("/users/{user_id}"), String::new())),
        };
        let Some((method, path, body)) = built else { return };
        let request = self.next_id();
        if let Pending::Post(reply_id) | Pending::Verify(reply_id) = &pending {
            if let Some(delivery) = self.state.deliveries.get_mut(reply_id) {
                delivery.in_flight = Some(request);
            }
        }
        let mut headers = self.auth_headers();
        if !body.is_empty() {
            headers.push(Header { name: "Content-Type".into(), value: "application/json".into() });
        }
        self.state.requests.insert(request, pending);
        self.out.push(Action::HttpRequest {
            request,
            method: method.into(),
            url: self.settings.api(&path).into(),
            headers: headers.into(),
            body: body.into(),
            timeout_ms: self.settings.request_timeout_ms,
        });
    }

    pub(super) fn http_response(&mut self, request: u64, status: u16, headers: &[Header], body: &str) {
        if self.state.me_request == Some(request) {
            // A request of a build that kept `/users/me` apart.
            self.state.me_request = None;
            self.state.requests.insert(request, Pending::Me);
        }
        let Some(pending) = self.state.requests.remove(&request) else { return };
        if status == 429 {
            self.rate_limited(pending, headers);
            return;
        }
        if (200..300).contains(&status) {
            self.state.failures.remove(&pending.key());
        }
        match pending {
            Pending::Post(reply_id) => self.post_answered(reply_id, status, body),
            Pending::Verify(reply_id) => self.verified(reply_id, status, body),
            Pending::CatchUp(channel_id) => self.caught_up(&channel_id, status, body),
            Pending::Me => self.me_answered(status, body),
            Pending::Teams => self.teams_answered(status, body),
            Pending::TeamChannels(team_id) => self.channels_answered(Pending::TeamChannels(team_id), status, body),
            Pending::MyChannels => self.channels_answered(Pending::MyChannels, status, body),
            Pending::User(user_id) => self.user_answered(&user_id, status, body),
        }
        self.pump();
    }

    pub(super) fn http_failed(&mut self, request: u64, error: &str) {
        if self.state.me_request == Some(request) {
            self.state.me_request = None;
            self.state.requests.insert(request, Pending::Me);
        }
        let Some(pending) = self.state.requests.remove(&request) else { return };
        match pending {
            Pending::Post(reply_id) | Pending::Verify(reply_id) => self.delivery_failed(reply_id, error),
            Pending::CatchUp(channel_id) => self.caught_up(&channel_id, 0, error),
            Pending::Me => {
                self.log(LogLevel::Warn, format!("GET /users/me failed ({error}); retrying in 2 s"));
                self.set_timer(TimerPurpose::RetryMe, 2000);
            }
            other => self.background_failed(other, error),
        }
        self.pump();
    }

    /// A 429: hold every request until the server's wait is over, then send this one first.
    fn rate_limited(&mut self, pending: Pending, headers: &[Header]) {
        let header = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.as_str().eq_ignore_ascii_case(name))
                .and_then(|h| h.value.as_str().trim().parse::<u64>().ok())
        };
        let wait_ms = header("retry-after")
            .or_else(|| header("x-ratelimit-reset"))
            .map_or(DEFAULT_RATE_LIMIT_WAIT_MS, |s| s.clamp(1, 300) * 1000);
        // Requests that wait for the same limit do not all come back in the same millisecond.
        let jitter = self.random() % 250;
        let until = self.host.now_ms() + (wait_ms + jitter) as i64;
        if until > self.state.throttled_until_ms {
            if self.host.now_ms() >= self.state.throttled_until_ms {
                self.log(
                    LogLevel::Warn,
                    format!("rate limited by the server (429 for {pending:?}); holding requests for {wait_ms} ms"),
                );
            }
            self.state.throttled_until_ms = until;
        }
        if let Pending::Post(reply_id) | Pending::Verify(reply_id) = &pending {
            if let Some(delivery) = self.state.deliveries.get_mut(reply_id) {
                delivery.in_flight = None;
            }
        }
        self.mark_queued(&pending, true);
        self.state.queue.push_front(pending);
        self.wake_when_unthrottled();
    }

    /// Try a failed background request again later; `false` once it has failed too often.
    pub(super) fn retry_later(&mut self, pending: Pending, error: &str) -> bool {
        let key = pending.key();
        let attempts = {
            let count = self.state.failures.entry(key.clone()).or_insert(0);
            *count += 1;
            *count
        };
        if attempts >= BACKGROUND_ATTEMPTS {
            self.state.failures.remove(&key);
            self.log(LogLevel::Error, format!("{pending:?} failed {attempts} times ({error}); giving up"));
            return false;
        }
        let wait = (500u64 << attempts.min(7)) + self.random() % 500;
        self.log(LogLevel::Warn, format!("{pending:?} failed ({error}); retrying in {wait} ms"));
        self.set_timer(TimerPurpose::Retry(pending), wait);
        true
    }

    fn background_failed(&mut self, pending: Pending, error: &str) {
        match pending {
            Pending::Teams | Pending::TeamChannels(_) | Pending::MyChannels
                if !self.retry_later(pending.clone(), error) =>
            {
                self.discovery_failed();
            }
            Pending::User(user_id) => self.user_answered(&user_id, 0, ""),
            _ => {}
        }
    }

    pub(super) fn fetch_me(&mut self) {
        self.request(Pending::Me);
    }

    fn me_answered(&mut self, status: u16, body: &str) {
        let user: Value = serde_json::from_str(body).unwrap_or_default();
        match (status, user["id"].as_str(), user["username"].as_str()) {
            (200, Some(id), Some(username)) => {
                self.state.bot_id = id.to_string();
                self.state.bot_username = username.to_string();
                self.log(LogLevel::Info, format!("signed in as @{username} ({id})"));
                for data in std::mem::take(&mut self.state.buffered) {
                    self.posted(&data);
                }
                self.send_idle_deliveries();
            }
            (401, ..) => {
                self.token_refused("GET /users/me answered 401");
                self.set_timer(TimerPurpose::RetryMe, 30_000);
            }
            _ => {
                let id = user["id"].as_str().unwrap_or_default().to_string();
                self.log(LogLevel::Error, format!("GET /users/me answered {status} {id}; retrying in 5 s"));
                self.set_timer(TimerPurpose::RetryMe, 5000);
            }
        }
    }
}
