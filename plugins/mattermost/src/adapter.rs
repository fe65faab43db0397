//! The adapter state machine: WebSocket lifecycle (hello, seq tracking, keepalive, resume,
//! backoff), `posted` filtering, reply delivery with splitting and retries, typing.
//!
//! Everything that must survive a generation change is in [`State`], which is exported on
//! `Shutdown(Replaced)` and restored by the next generation; the host keeps the socket, the
//! in-flight HTTP requests and the timers, so their results reach whichever generation runs.
//! The host also stores the state after every batch, so a restarted gateway (a *cold*
//! handover) resumes from the same cursor: it reconnects with the old connection id and
//! sequence number, fetches what was posted meanwhile when the server cannot resume, and looks
//! for its own posts before sending again a reply that may already have gone out.

use std::collections::{BTreeMap, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_plugin_api::{
    Action, Event, Handover, Header, HostHandle, InboundMessage, LogLevel, OutboundReply, PeerKind, ReplyTarget,
    ShutdownReason, StateBlob,
};

use crate::{
    settings::{ChatMode, Policy, Settings},
    text,
};

pub const STATE_FORMAT: u32 = 1;
const RECENT_POSTS: usize = 512;
/// Usernames remembered for catch-up (REST posts carry only the user id).
const KNOWN_USERS: usize = 2048;
/// A delivery the adapter gave up on waits this long for the host to hand it back.
const PARKED_FOR_MS: i64 = 3_600_000;
/// Catch-up requests that fail are retried this often before the held posts are released.
const CATCH_UP_ATTEMPTS: u32 = 5;
/// The props key that marks a reply part, so a restarted gateway can find what it posted.
pub const REPLY_MARK: &str = "switchboard_reply";
const MAX_DELIVERY_ATTEMPTS: u32 = 5;
const BUFFERED_POSTS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TimerPurpose {
    Ping,
    Reconnect,
    RetryMe,
    RetryDelivery(u64),
    RetryCatchUp(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Delivery {
    channel_id: String,
    root_id: String,
    parts: Vec<String>,
    next_part: usize,
    attempt: u32,
    first_post_id: String,
    in_flight: Option<u64>,
    #[serde(default)]
    queued_at_ms: i64,
    /// Parts may already be posted (a restart, or attempts that timed out): look first.
    #[serde(default)]
    verify: bool,
    /// Attempts exhausted; waiting for the host to hand the reply back.
    #[serde(default)]
    parked_at_ms: Option<i64>,
}

/// What the adapter knows of a conversation, for catch-up after a gap.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SeenChannel {
    /// Mattermost channel type: O, P, G or D.
    channel_type: String,
    channel_name: String,
    /// `create_at` of the newest post seen in it.
    last_post_at: i64,
}

/// What a pending HTTP request is for.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Pending {
    /// Posting a part of a reply.
    Post(u64),
    /// Looking for parts of a reply that may already be posted.
    Verify(u64),
    /// Fetching what a channel missed while resume was impossible.
    CatchUp(String),
}

/// Everything a generation hands to the next one.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    conn: Option<u64>,
    ws_open: bool,
    connection_id: String,
    /// The seq the next event must carry.
    expected_seq: i64,
    client_seq: i64,
    next_id: u64,
    bot_id: String,
    bot_username: String,
    me_request: Option<u64>,
    recent_posts: VecDeque<String>,
    /// `posted` payloads that arrived before the bot knew who it is.
    buffered: VecDeque<Value>,
    deliveries: BTreeMap<u64, Delivery>,
    requests: BTreeMap<u64, Pending>,
    timers: BTreeMap<u64, TimerPurpose>,
    #[serde(default)]
    seen: BTreeMap<String, SeenChannel>,
    #[serde(default)]
    usernames: BTreeMap<String, String>,
    /// Channels whose catch-up is running, with attempts so far; their live posts wait in `held`.
    #[serde(default)]
    catching_up: BTreeMap<String, u32>,
    #[serde(default)]
    held: VecDeque<Value>,
    reconnect_attempts: u32,
    ping_outstanding: Option<i64>,
    rng: u64,
    /// Tells this gateway's reply marks from another's posting as the same bot (a second
    /// deployment, a wiped state dir): reply ids alone repeat, and Mattermost would answer a
    /// repeated `pending_post_id` with the *other* reply's post. Empty in states saved before
    /// it existed (their marks stay as they were).
    #[serde(default)]
    mark_nonce: String,
}

pub struct Adapter {
    host: HostHandle,
    settings: Settings,
    token: String,
    state: State,
    adopted: bool,
    out: Vec<Action>,
    /// `state.recent_posts` as a set: looked up for every post, where a scan of the list was
    /// a few percent of the gateway's CPU under load.
    recent_index: HashSet<String>,
    /// Size of the last exported state.
    exported_size: std::cell::Cell<usize>,
}

impl Adapter {
    pub fn new(host: HostHandle, settings: Settings, handover: Handover) -> Result<Self, String> {
        let token = host
            .secret(settings.bot_token_env.as_str().into())
            .into_option()
            .map(|t| t.to_string())
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| format!("the environment variable {} (bot_token_env) is not set", settings.bot_token_env))?;
        let mut adapter = Self {
            host,
            settings,
            token,
            state: State::default(),
            adopted: false,
            out: Vec::new(),
            recent_index: HashSet::new(),
            exported_size: std::cell::Cell::new(0),
        };
        if let Some(previous) = handover.previous_state.into_option() {
            if previous.format_version != STATE_FORMAT {
                adapter
                    .log(LogLevel::Warn, format!("unknown state format {}; starting fresh", previous.format_version));
            } else {
                match serde_json::from_str::<State>(previous.data.as_str()) {
                    Ok(state) => {
                        let alive = !handover.cold
                            && state.conn.is_some_and(|c| handover.connections.iter().any(|o| o.conn == c));
                        adapter.state = state;
                        adapter.adopted = alive;
                        if !alive {
                            adapter.state.conn = None;
                            adapter.state.ws_open = false;
                        }
                        if handover.cold {
                            adapter.forget_the_old_process();
                        }
                    }
                    Err(e) => adapter.log(LogLevel::Warn, format!("previous state unreadable ({e}); starting fresh")),
                }
            }
        }
        // States saved by older builds may list a post twice: keep each once.
        let mut recent_index = HashSet::new();
        adapter.state.recent_posts.retain(|id| recent_index.insert(id.clone()));
        adapter.recent_index = recent_index;
        if adapter.state.rng == 0 {
            adapter.state.rng = ((adapter.host.now_ms() as u64) ^ (u64::from(std::process::id()) << 40)) | 1;
            let nonce = adapter.random();
            adapter.state.mark_nonce = format!("{:x}", nonce & 0xffff_ffff_ffff);
        }
        Ok(adapter)
    }

    /// After a restart nothing of the old process's requests and timers exists: forget them,
    /// and treat every reply that may have been sent as "look before sending again".
    fn forget_the_old_process(&mut self) {
        let state = &mut self.state;
        state.requests.clear();
        state.timers.clear();
        state.me_request = None;
        state.ping_outstanding = None;
        state.reconnect_attempts = 0;
        state.catching_up.clear();
        // Held posts were never processed and their catch-up is gone: process them.
        let held = std::mem::take(&mut state.held);
        state.buffered.extend(held);
        for delivery in state.deliveries.values_mut() {
            let maybe_sent = delivery.in_flight.is_some()
                || delivery.attempt > 0
                || delivery.next_part > 0
                || delivery.parked_at_ms.is_some();
            delivery.in_flight = None;
            delivery.parked_at_ms = None;
            delivery.attempt = 0;
            delivery.verify |= maybe_sent;
        }
    }

    /// Remember `post_id` as handled (the last [`RECENT_POSTS`] are kept).
    fn remember_post(&mut self, post_id: &str) {
        if !self.recent_index.insert(post_id.to_string()) {
            return;
        }
        self.state.recent_posts.push_back(post_id.to_string());
        if self.state.recent_posts.len() > RECENT_POSTS {
            if let Some(oldest) = self.state.recent_posts.pop_front() {
                self.recent_index.remove(&oldest);
            }
        }
    }

    pub fn export_state(&self) -> StateBlob {
        // Exported after every batch: sized like the last one, it is written without regrowing.
        let mut json = Vec::with_capacity(self.exported_size.get() + 1024);
        let data = match serde_json::to_writer(&mut json, &self.state) {
            Ok(()) => String::from_utf8(json).unwrap_or_default(),
            Err(_) => String::new(),
        };
        self.exported_size.set(data.len());
        StateBlob { format_version: STATE_FORMAT, data: data.into() }
    }

    /// The Mattermost channel an event concerns (for the host's dead-letter log line).
    pub fn conversation_of(&self, event: &Event) -> Option<String> {
        match event {
            Event::WsFrame { text, .. } => {
                let message: Value = serde_json::from_str(text.as_str()).ok()?;
                post_channel(&message["data"])
                    .or_else(|| message["broadcast"]["channel_id"].as_str().map(str::to_string))
                    .filter(|c| !c.is_empty())
            }
            Event::WsFrameSkipped { text, .. } => {
                let message: Value = serde_json::from_str(text.as_str()).ok()?;
                post_channel(&message["data"]).filter(|c| !c.is_empty())
            }
            Event::DeliverReply(reply) => Some(reply.target.conversation_id.to_string()),
            Event::AgentWorking { target } => Some(target.conversation_id.to_string()),
            _ => None,
        }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Started { generation } => self.started(generation),
            Event::WsOpened { conn } if Some(conn) == self.state.conn => {
                self.state.ws_open = true;
                self.log(LogLevel::Info, "WebSocket open".into());
            }
            Event::WsFrame { conn, text } if Some(conn) == self.state.conn => self.frame(text.as_str()),
            Event::WsFrameSkipped { conn, text } if Some(conn) == self.state.conn => self.skip_frame(text.as_str()),
            Event::WsClosed { conn, code, reason } if Some(conn) == self.state.conn => {
                self.closed(code, reason.as_str())
            }
            Event::HttpResponse { request, status, headers, body } => {
                let retry_after = headers
                    .iter()
                    .find(|h| h.name.as_str().eq_ignore_ascii_case("retry-after"))
                    .and_then(|h| h.value.as_str().trim().parse::<u64>().ok());
                self.http_response(request, status, retry_after, body.as_str());
            }
            Event::HttpFailed { request, error } => self.http_failed(request, error.as_str()),
            Event::TimerFired { timer } => self.timer(timer),
            Event::DeliverReply(reply) => self.deliver(reply),
            Event::AgentWorking { target } => self.typing(&target),
            Event::Shutdown { reason: ShutdownReason::Stopping } => {
                if let Some(conn) = self.state.conn.take() {
                    self.out.push(Action::WsClose { conn, code: 1000, reason: "gateway stopping".into() });
                }
            }
            // Replaced: the host keeps the socket, requests and timers for the next generation.
            _ => {}
        }
        std::mem::take(&mut self.out)
    }

    fn log(&mut self, level: LogLevel, message: String) {
        self.out.push(Action::Log { level, message: message.into() });
    }

    fn next_id(&mut self) -> u64 {
        self.state.next_id += 1;
        self.state.next_id
    }

    fn auth_headers(&self) -> Vec<Header> {
        vec![
            Header { name: "Authorization".into(), value: format!("Bearer {}", self.token).into() },
            Header { name: "X-Requested-With".into(), value: "XMLHttpRequest".into() },
        ]
    }

    fn set_timer(&mut self, purpose: TimerPurpose, after_ms: u64) -> u64 {
        let timer = self.next_id();
        self.state.timers.insert(timer, purpose);
        self.out.push(Action::SetTimer { timer, after_ms });
        timer
    }

    fn started(&mut self, generation: u64) {
        if self.adopted {
            self.log(
                LogLevel::Info,
                format!(
                    "generation {generation} adopted WebSocket {} (connection id {}, next seq {}) with {} deliveries in flight",
                    self.state.conn.unwrap_or_default(),
                    self.state.connection_id,
                    self.state.expected_seq,
                    self.state.deliveries.len()
                ),
            );
            if !self.state.timers.values().any(|t| matches!(t, TimerPurpose::Ping)) {
                self.set_timer(TimerPurpose::Ping, self.settings.ping_interval_ms);
            }
        } else {
            // A fresh start, or the previous generation's socket is gone: (re)connect.
            self.state.timers.retain(|_, t| !matches!(t, TimerPurpose::Ping | TimerPurpose::Reconnect));
            self.connect();
        }
        if (self.state.bot_id.is_empty() || self.state.bot_username.is_empty()) && self.state.me_request.is_none() {
            self.fetch_me();
        } else if !self.state.buffered.is_empty() && !self.state.bot_username.is_empty() {
            for data in std::mem::take(&mut self.state.buffered) {
                self.posted(&data);
            }
        }
        // Deliveries waiting for nothing in flight (e.g. the bot id was unknown) go now.
        let idle: Vec<u64> = self
            .state
            .deliveries
            .iter()
            .filter(|(id, d)| d.in_flight.is_none() && d.parked_at_ms.is_none() && !self.retry_pending(**id))
            .map(|(id, _)| *id)
            .collect();
        for reply_id in idle {
            self.send_part(reply_id);
        }
    }

    fn retry_pending(&self, reply_id: u64) -> bool {
        self.state.timers.values().any(|t| matches!(t, TimerPurpose::RetryDelivery(id) if *id == reply_id))
    }

    fn fetch_me(&mut self) {
        let request = self.next_id();
        self.state.me_request = Some(request);
        self.out.push(Action::HttpRequest {
            request,
            method: "GET".into(),
            url: self.settings.api("/users/me").into(),
            headers: self.auth_headers().into(),
            body: "".into(),
            timeout_ms: self.settings.request_timeout_ms,
        });
    }

    fn connect(&mut self) {
        let conn = self.next_id();
        self.state.conn = Some(conn);
        self.state.ws_open = false;
        self.state.ping_outstanding = None;
        let url = if self.state.connection_id.is_empty() {
            format!("{}?connection_id=&sequence_number=0", self.settings.websocket_url())
        } else {
            format!(
                "{}?connection_id={}&sequence_number={}",
                self.settings.websocket_url(),
                self.state.connection_id,
                self.state.expected_seq
            )
        };
        self.out.push(Action::WsOpen { conn, url: url.into(), headers: self.auth_headers().into() });
        self.set_timer(TimerPurpose::Ping, self.settings.ping_interval_ms);
    }

    fn closed(&mut self, code: u16, reason: &str) {
        self.state.conn = None;
        self.state.ws_open = false;
        self.state.timers.retain(|_, t| !matches!(t, TimerPurpose::Ping));
        let base = self.settings.reconnect_initial_ms.saturating_mul(1u64 << self.state.reconnect_attempts.min(20));
        let capped = base.min(self.settings.reconnect_max_ms);
        let jitter = self.random() % (capped / 5 + 1);
        let delay = capped + jitter;
        self.state.reconnect_attempts += 1;
        self.log(LogLevel::Warn, format!("WebSocket closed ({code} {reason}); reconnecting in {delay} ms"));
        self.set_timer(TimerPurpose::Reconnect, delay);
    }

    /// xorshift64: jitter needs no cryptographic randomness.
    fn random(&mut self) -> u64 {
        let mut x = self.state.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.rng = x;
        x
    }

    fn frame(&mut self, text: &str) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            self.log(LogLevel::Warn, format!("ignored a WebSocket frame that is not JSON ({} bytes)", text.len()));
            return;
        };
        if message.get("seq_reply").is_some() || message.get("status").is_some() {
            if let (Some(reply), Some(ping)) = (message["seq_reply"].as_i64(), self.state.ping_outstanding) {
                if reply == ping {
                    self.state.ping_outstanding = None;
                }
            }
            if message["status"] == "FAIL" {
                self.log(LogLevel::Debug, format!("server refused a request: {}", message["error"]["id"]));
            }
            return;
        }
        let Some(event) = message["event"].as_str() else {
            self.log(LogLevel::Debug, "ignored a WebSocket frame without an event name".into());
            return;
        };
        let seq = message["seq"].as_i64();
        if event == "hello" {
            self.hello(&message, seq.unwrap_or(0));
            return;
        }
        if let Some(seq) = seq {
            if seq != self.state.expected_seq {
                self.log(
                    LogLevel::Warn,
                    format!("event seq {seq} but expected {}; reconnecting to resume", self.state.expected_seq),
                );
                if let Some(conn) = self.state.conn {
                    self.out.push(Action::WsClose { conn, code: 4001, reason: "sequence mismatch".into() });
                }
                return;
            }
            self.state.expected_seq = seq + 1;
        }
        if event == "posted" {
            let mut message = message;
            let data = message["data"].take();
            if self.state.bot_username.is_empty() {
                if self.state.buffered.len() < BUFFERED_POSTS {
                    self.state.buffered.push_back(data);
                } else {
                    self.log(LogLevel::Error, "too many posts before the bot identity is known; one dropped".into());
                }
            } else if !self.state.catching_up.is_empty()
                && post_channel(&data).is_some_and(|c| self.state.catching_up.contains_key(&c))
            {
                self.state.held.push_back(data);
            } else {
                self.posted(&data);
            }
        }
    }

    /// The host gave up on this frame: keep the sequence and the post cursor moving past it.
    fn skip_frame(&mut self, text: &str) {
        let Ok(message) = serde_json::from_str::<Value>(text) else { return };
        if let Some(seq) = message["seq"].as_i64().filter(|seq| *seq == self.state.expected_seq) {
            self.state.expected_seq = seq + 1;
        }
        if message["event"] == "posted" {
            let data = &message["data"];
            if let Some(post) = data["post"].as_str().and_then(|p| serde_json::from_str::<Value>(p).ok()) {
                let field = |name: &str| post[name].as_str().unwrap_or_default().to_string();
                let (post_id, channel_id) = (field("id"), field("channel_id"));
                if !post_id.is_empty() && !channel_id.is_empty() {
                    self.remember(&channel_id, data, post["create_at"].as_i64().unwrap_or_default(), &field("user_id"));
                    self.remember_post(&post_id);
                }
                self.log(LogLevel::Warn, format!("post {post_id} skipped: the host dead-lettered it"));
            }
        }
    }

    fn hello(&mut self, message: &Value, seq: i64) {
        let connection_id = message["data"]["connection_id"].as_str().unwrap_or_default().to_string();
        let gap = !self.state.connection_id.is_empty() && connection_id != self.state.connection_id;
        if gap {
            self.log(
                LogLevel::Warn,
                format!(
                    "new connection id after a gap (was {}, now {connection_id}); fetching what was posted meanwhile",
                    self.state.connection_id
                ),
            );
        } else {
            self.log(LogLevel::Info, format!("connected, connection id {connection_id}"));
        }
        if self.state.bot_id.is_empty() {
            if let Some(user_id) = message["broadcast"]["user_id"].as_str().filter(|u| !u.is_empty()) {
                self.state.bot_id = user_id.to_string();
            }
        }
        self.state.connection_id = connection_id;
        self.state.expected_seq = seq + 1;
        self.state.reconnect_attempts = 0;
        if gap {
            self.catch_up_all();
        }
    }

    /// Every conversation the bot has seen a post in or that has a session: fetch its posts
    /// since the last one seen. Live posts of those channels wait until their catch-up is done,
    /// so each channel is processed in order.
    fn catch_up_all(&mut self) {
        let mut channels: BTreeMap<String, i64> =
            self.state.seen.iter().map(|(id, seen)| (id.clone(), seen.last_post_at)).collect();
        for session in self.host.sessions("".into()).iter() {
            let id = session.target.conversation_id.to_string();
            channels.entry(id).or_insert(session.last_active_ms);
        }
        self.log(LogLevel::Info, format!("catching up {} conversation(s)", channels.len()));
        for (channel_id, since) in channels {
            if since > 0 && !self.state.catching_up.contains_key(&channel_id) {
                self.state.catching_up.insert(channel_id.clone(), 0);
                self.fetch_since(&channel_id);
            }
        }
    }

    fn fetch_since(&mut self, channel_id: &str) {
        let since = self.state.seen.get(channel_id).map_or(0, |s| s.last_post_at);
        let since = if since > 0 {
            since
        } else {
            self.host
                .sessions("".into())
                .iter()
                .filter(|s| s.target.conversation_id.as_str() == channel_id)
                .map(|s| s.last_active_ms)
                .max()
                .unwrap_or(0)
        };
        let request = self.next_id();
        self.state.requests.insert(request, Pending::CatchUp(channel_id.to_string()));
        self.out.push(Action::HttpRequest {
            request,
            method: "GET".into(),
            url: self.settings.api(&format!("/channels/{channel_id}/posts?since={}", since.saturating_sub(1))).into(),
            headers: self.auth_headers().into(),
            body: "".into(),
            timeout_ms: self.settings.request_timeout_ms,
        });
    }

    fn caught_up(&mut self, channel_id: &str, status: u16, body: &str) {
        if status != 200 {
            let attempts = self.state.catching_up.get(channel_id).copied().unwrap_or(0) + 1;
            if attempts < CATCH_UP_ATTEMPTS {
                self.state.catching_up.insert(channel_id.to_string(), attempts);
                let wait = 1000u64 << attempts;
                self.log(
                    LogLevel::Warn,
                    format!("catch-up of channel {channel_id} failed ({status}); retrying in {wait} ms"),
                );
                self.set_timer(TimerPurpose::RetryCatchUp(channel_id.to_string()), wait);
                return;
            }
            self.log(
                LogLevel::Error,
                format!("catch-up of channel {channel_id} failed {attempts} times ({status}); posts of the gap there are not answered"),
            );
        } else {
            let list: Value = serde_json::from_str(body).unwrap_or_default();
            let mut posts: Vec<Value> =
                list["posts"].as_object().map(|m| m.values().cloned().collect()).unwrap_or_default();
            posts.sort_by_key(|p| p["create_at"].as_i64().unwrap_or_default());
            let seen = self.state.seen.get(channel_id).cloned().unwrap_or_default();
            let count = posts.len();
            for post in posts {
                let user_id = post["user_id"].as_str().unwrap_or_default();
                let data = json!({
                    "post": post.to_string(),
                    "channel_type": if seen.channel_type.is_empty() { "O" } else { seen.channel_type.as_str() },
                    "channel_name": seen.channel_name,
                    "sender_name": self.state.usernames.get(user_id).cloned().unwrap_or_default(),
                });
                self.posted(&data);
            }
            self.log(LogLevel::Info, format!("caught up channel {channel_id}: {count} post(s) since the gap"));
        }
        self.state.catching_up.remove(channel_id);
        let held = std::mem::take(&mut self.state.held);
        for data in held {
            if post_channel(&data).as_deref() == Some(channel_id) {
                self.posted(&data);
            } else {
                self.state.held.push_back(data);
            }
        }
    }

    fn posted(&mut self, data: &Value) {
        let Some(post) = data["post"].as_str().and_then(|p| serde_json::from_str::<WirePost>(p).ok()) else {
            self.log(LogLevel::Warn, "posted event without a readable post".into());
            return;
        };
        let WirePost { id: post_id, user_id, channel_id, root_id, message, kind, create_at } = post;
        let (post_id, user_id, channel_id, root_id, message) = (
            post_id.unwrap_or_default(),
            user_id.unwrap_or_default(),
            channel_id.unwrap_or_default(),
            root_id.unwrap_or_default(),
            message.unwrap_or_default(),
        );
        let create_at = create_at.and_then(|n| n.as_i64()).unwrap_or_default();
        if post_id.is_empty() || channel_id.is_empty() {
            return;
        }
        self.remember(&channel_id, data, create_at, &user_id);
        if user_id == self.state.bot_id || kind.is_some_and(|k| !k.is_empty()) {
            return;
        }
        if self.recent_index.contains(&post_id) {
            self.log(LogLevel::Debug, format!("post {post_id} seen before; not answered again"));
            return;
        }
        if cfg!(feature = "fixture-panic-on-message") && message.contains(PANIC_TRIGGER) {
            panic!("fixture: this build panics on posts containing {PANIC_TRIGGER}");
        }
        self.remember_post(&post_id);
        let sender_name = data["sender_name"].as_str().unwrap_or_default().trim_start_matches('@').to_string();
        let channel_type = data["channel_type"].as_str().unwrap_or("O");
        let mentioned_by_server = data["mentions"]
            .as_str()
            .and_then(|m| serde_json::from_str::<Vec<String>>(m).ok())
            .is_some_and(|ids| ids.contains(&self.state.bot_id));
        let named = text::mentions(&message, &self.state.bot_username);
        let mentioned = named || (mentioned_by_server && channel_type != "D" && channel_type != "G");
        let stripped = text::strip_mentions(&message, &self.state.bot_username);

        let (peer_kind, decision) = match channel_type {
            "D" => (PeerKind::Dm, self.policy(self.settings.dm_policy, &user_id, &sender_name).map(|_| stripped)),
            "G" => (
                PeerKind::Group,
                self.policy(self.settings.group_policy, &user_id, &sender_name)
                    .and_then(|_| self.chatmode(&message, &stripped, mentioned)),
            ),
            _ => {
                let channel_name = data["channel_name"].as_str().unwrap_or_default();
                let listed = self.settings.channels.is_empty()
                    || self.settings.channels.iter().any(|c| *c == channel_id || c == channel_name);
                let decision = if listed {
                    self.chatmode(&message, &stripped, mentioned)
                } else {
                    Err("channel not in the channels allowlist")
                };
                (PeerKind::Channel, decision)
            }
        };
        match decision {
            Ok(text) if !text.trim().is_empty() => self.out.push(Action::Inbound(InboundMessage {
                message_id: post_id.into(),
                peer_kind,
                peer_id: channel_id.into(),
                thread_root_id: root_id.into(),
                sender_id: user_id.into(),
                sender_name: sender_name.into(),
                text: text.into(),
                created_at_ms: create_at,
            })),
            Ok(_) => self.log(LogLevel::Debug, format!("post {post_id} is empty after stripping; not answered")),
            Err(reason) => self.log(LogLevel::Debug, format!("post {post_id} not answered: {reason}")),
        }
    }

    fn remember(&mut self, channel_id: &str, data: &Value, create_at: i64, user_id: &str) {
        let seen = self.state.seen.entry(channel_id.to_string()).or_default();
        if let Some(kind) = data["channel_type"].as_str().filter(|k| !k.is_empty()) {
            seen.channel_type = kind.to_string();
        }
        if let Some(name) = data["channel_name"].as_str().filter(|n| !n.is_empty()) {
            seen.channel_name = name.to_string();
        }
        seen.last_post_at = seen.last_post_at.max(create_at);
        if let Some(name) = data["sender_name"].as_str().filter(|n| !n.is_empty()) {
            if self.state.usernames.len() >= KNOWN_USERS && !self.state.usernames.contains_key(user_id) {
                self.state.usernames.pop_first();
            }
            self.state.usernames.insert(user_id.to_string(), name.trim_start_matches('@').to_string());
        }
    }

    fn policy(&self, policy: Policy, user_id: &str, username: &str) -> Result<(), &'static str> {
        match policy {
            Policy::Open => Ok(()),
            Policy::Allowlist if self.settings.allowed(user_id, username) => Ok(()),
            Policy::Allowlist => Err("sender not in allow_from"),
            Policy::Disabled => Err("policy is disabled"),
        }
    }

    fn chatmode(&self, message: &str, stripped: &str, mentioned: bool) -> Result<String, &'static str> {
        match self.settings.chatmode {
            ChatMode::OnMessage => Ok(stripped.to_string()),
            ChatMode::OnCall if mentioned => Ok(stripped.to_string()),
            ChatMode::OnCall => Err("chatmode oncall and the bot was not mentioned"),
            ChatMode::OnChar => {
                let trimmed = message.trim_start();
                match self.settings.onchar_prefixes.iter().find(|p| trimmed.starts_with(p.as_str())) {
                    Some(prefix) => Ok(trimmed[prefix.len()..].trim().to_string()),
                    None if mentioned => Ok(stripped.to_string()),
                    None => Err("chatmode onchar and no prefix"),
                }
            }
        }
    }

    fn deliver(&mut self, reply: OutboundReply) {
        let now = self.host.now_ms();
        self.state.deliveries.retain(|_, d| d.parked_at_ms.is_none_or(|at| now - at < PARKED_FOR_MS));
        if let Some(known) = self.state.deliveries.get_mut(&reply.reply_id) {
            // The host hands a reply again after a restart or after this adapter gave up:
            // carry on with it (looking first), unless it is already under way.
            if known.parked_at_ms.take().is_some() {
                known.verify = true;
                known.attempt = 0;
                self.send_part(reply.reply_id);
            }
            return;
        }
        let parts = if cfg!(feature = "fixture-build-b") {
            text::split(&format!("{} {BUILD_B_TAG}", reply.text), self.settings.max_post_chars)
        } else {
            text::split(reply.text.as_str(), self.settings.max_post_chars)
        };
        let delivery = Delivery {
            channel_id: reply.target.conversation_id.to_string(),
            root_id: reply.target.thread_root_id.to_string(),
            parts,
            next_part: 0,
            attempt: 0,
            first_post_id: String::new(),
            in_flight: None,
            queued_at_ms: now,
            verify: false,
            parked_at_ms: None,
        };
        self.state.deliveries.insert(reply.reply_id, delivery);
        self.send_part(reply.reply_id);
    }

    fn send_part(&mut self, reply_id: u64) {
        if self.state.bot_id.is_empty() {
            return; // sent once /users/me answers
        }
        let request = self.next_id();
        let bot_id = self.state.bot_id.clone();
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        if delivery.verify {
            // Look for parts already posted (marked in props) since the reply was queued.
            let since = delivery.queued_at_ms.saturating_sub(60_000).max(0);
            let url = self.settings.api(&format!("/channels/{}/posts?since={since}", delivery.channel_id));
            delivery.in_flight = Some(request);
            self.state.requests.insert(request, Pending::Verify(reply_id));
            self.out.push(Action::HttpRequest {
                request,
                method: "GET".into(),
                url: url.into(),
                headers: self.auth_headers().into(),
                body: "".into(),
                timeout_ms: self.settings.request_timeout_ms,
            });
            return;
        }
        let mark = format!("{}:{}", mark_prefix(&bot_id, &self.state.mark_nonce, reply_id), delivery.next_part);
        let mut body = json!({
            "channel_id": delivery.channel_id,
            "message": delivery.parts[delivery.next_part],
            // The server answers a repeat within its 30 s cache with the post it already made;
            // the mark in props lets a later look find it too.
            "pending_post_id": mark,
            "props": {REPLY_MARK: mark},
        });
        if !delivery.root_id.is_empty() {
            body["root_id"] = json!(delivery.root_id);
        }
        delivery.in_flight = Some(request);
        self.state.requests.insert(request, Pending::Post(reply_id));
        let mut headers = self.auth_headers();
        headers.push(Header { name: "Content-Type".into(), value: "application/json".into() });
        self.out.push(Action::HttpRequest {
            request,
            method: "POST".into(),
            url: self.settings.api("/posts").into(),
            headers: headers.into(),
            body: body.to_string().into(),
            timeout_ms: self.settings.request_timeout_ms,
        });
    }

    fn http_response(&mut self, request: u64, status: u16, retry_after: Option<u64>, body: &str) {
        if self.state.me_request == Some(request) {
            self.state.me_request = None;
            let user: Value = serde_json::from_str(body).unwrap_or_default();
            match (status, user["id"].as_str(), user["username"].as_str()) {
                (200, Some(id), Some(username)) => {
                    self.state.bot_id = id.to_string();
                    self.state.bot_username = username.to_string();
                    self.log(LogLevel::Info, format!("signed in as @{username} ({id})"));
                    for data in std::mem::take(&mut self.state.buffered) {
                        self.posted(&data);
                    }
                    let waiting: Vec<u64> = self
                        .state
                        .deliveries
                        .iter()
                        .filter(|(_, d)| d.in_flight.is_none())
                        .map(|(id, _)| *id)
                        .collect();
                    for reply_id in waiting {
                        self.send_part(reply_id);
                    }
                }
                _ => {
                    let id = user["id"].as_str().unwrap_or_default().to_string();
                    self.log(LogLevel::Error, format!("GET /users/me answered {status} {id}; retrying in 5 s"));
                    self.set_timer(TimerPurpose::RetryMe, 5000);
                }
            }
            return;
        }
        let reply_id = match self.state.requests.remove(&request) {
            Some(Pending::Post(reply_id)) => reply_id,
            Some(Pending::Verify(reply_id)) => return self.verified(reply_id, status, body),
            Some(Pending::CatchUp(channel_id)) => return self.caught_up(&channel_id, status, body),
            None => return,
        };
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.in_flight = None;
        match status {
            200 | 201 => {
                if delivery.first_post_id.is_empty() {
                    let post: WirePost = serde_json::from_str(body).unwrap_or_default();
                    delivery.first_post_id = post.id.unwrap_or_default();
                }
                delivery.next_part += 1;
                delivery.attempt = 0;
                if delivery.next_part < delivery.parts.len() {
                    self.send_part(reply_id);
                } else if let Some(done) = self.state.deliveries.remove(&reply_id) {
                    self.out.push(Action::ReplyDelivered { reply_id, platform_message_id: done.first_post_id.into() });
                }
            }
            429 => {
                let wait = retry_after.unwrap_or(1).clamp(1, 300) * 1000;
                self.log(LogLevel::Warn, format!("rate limited posting reply {reply_id}; retrying in {wait} ms"));
                self.set_timer(TimerPurpose::RetryDelivery(reply_id), wait);
            }
            500..=599 => {
                let error = format!("server answered {status}");
                self.retry_or_fail(reply_id, error);
            }
            _ => {
                let error_id = serde_json::from_str::<Value>(body)
                    .ok()
                    .and_then(|b| b["id"].as_str().map(str::to_string))
                    .unwrap_or_default();
                self.state.deliveries.remove(&reply_id);
                self.out.push(Action::ReplyFailed {
                    reply_id,
                    error: format!("POST /posts answered {status} {error_id}").into(),
                    retryable: false,
                });
            }
        }
    }

    /// The answer to a look for parts of `reply_id` already posted.
    fn verified(&mut self, reply_id: u64, status: u16, body: &str) {
        let bot_id = self.state.bot_id.clone();
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.in_flight = None;
        if status != 200 {
            let error = format!("looking for parts already posted: server answered {status}");
            return self.retry_or_fail(reply_id, error);
        }
        let list: Value = serde_json::from_str(body).unwrap_or_default();
        let mut posted: BTreeMap<usize, String> = BTreeMap::new();
        if let Some(posts) = list["posts"].as_object() {
            for post in posts.values().filter(|p| p["user_id"] == bot_id.as_str()) {
                let Some(mark) = post["props"][REPLY_MARK].as_str() else { continue };
                let mut fields = mark.rsplitn(2, ':');
                let part = fields.next().and_then(|p| p.parse::<usize>().ok());
                if let (Some(part), Some(prefix)) = (part, fields.next()) {
                    if prefix == mark_prefix(&bot_id, &self.state.mark_nonce, reply_id) {
                        posted.insert(part, post["id"].as_str().unwrap_or_default().to_string());
                    }
                }
            }
        }
        delivery.verify = false;
        while posted.contains_key(&delivery.next_part) {
            if delivery.first_post_id.is_empty() {
                delivery.first_post_id = posted[&delivery.next_part].clone();
            }
            delivery.next_part += 1;
        }
        if !posted.is_empty() {
            let found = posted.len();
            self.log(
                LogLevel::Info,
                format!("reply {reply_id}: {found} part(s) were already posted; not sending them again"),
            );
        }
        let Some(delivery) = self.state.deliveries.get(&reply_id) else { return };
        if delivery.next_part >= delivery.parts.len() {
            if let Some(done) = self.state.deliveries.remove(&reply_id) {
                self.out.push(Action::ReplyDelivered { reply_id, platform_message_id: done.first_post_id.into() });
            }
        } else {
            self.send_part(reply_id);
        }
    }

    fn http_failed(&mut self, request: u64, error: &str) {
        if self.state.me_request == Some(request) {
            self.state.me_request = None;
            self.log(LogLevel::Warn, format!("GET /users/me failed ({error}); retrying in 2 s"));
            self.set_timer(TimerPurpose::RetryMe, 2000);
            return;
        }
        let reply_id = match self.state.requests.remove(&request) {
            Some(Pending::Post(reply_id) | Pending::Verify(reply_id)) => reply_id,
            Some(Pending::CatchUp(channel_id)) => return self.caught_up(&channel_id, 0, error),
            None => return,
        };
        if let Some(delivery) = self.state.deliveries.get_mut(&reply_id) {
            delivery.in_flight = None;
            // The request may have reached the server before it failed: look before resending.
            delivery.verify = true;
            self.retry_or_fail(reply_id, error.to_string());
        }
    }

    fn retry_or_fail(&mut self, reply_id: u64, error: String) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.attempt += 1;
        if delivery.attempt >= MAX_DELIVERY_ATTEMPTS {
            // Parked, not dropped: the host hands it back later, and parts may have gone out.
            delivery.parked_at_ms = Some(self.host.now_ms());
            delivery.verify = true;
            self.out.push(Action::ReplyFailed {
                reply_id,
                error: format!("gave up after {MAX_DELIVERY_ATTEMPTS} attempts: {error}").into(),
                retryable: true,
            });
            return;
        }
        let wait = 500u64 << delivery.attempt.min(6);
        self.log(LogLevel::Warn, format!("posting reply {reply_id} failed ({error}); retrying in {wait} ms"));
        self.set_timer(TimerPurpose::RetryDelivery(reply_id), wait);
    }

    fn timer(&mut self, timer: u64) {
        let Some(purpose) = self.state.timers.remove(&timer) else { return };
        match purpose {
            TimerPurpose::Ping => {
                let Some(conn) = self.state.conn else { return };
                if self.state.ping_outstanding.is_some() {
                    self.log(LogLevel::Warn, "the server did not answer the last ping; reconnecting".into());
                    self.out.push(Action::WsClose { conn, code: 4000, reason: "ping timeout".into() });
                    return;
                }
                if self.state.ws_open {
                    self.state.client_seq += 1;
                    let seq = self.state.client_seq;
                    self.state.ping_outstanding = Some(seq);
                    self.out
                        .push(Action::WsSend { conn, text: json!({"action": "ping", "seq": seq}).to_string().into() });
                }
                self.set_timer(TimerPurpose::Ping, self.settings.ping_interval_ms);
            }
            TimerPurpose::Reconnect => {
                if self.state.conn.is_none() {
                    self.connect();
                }
            }
            TimerPurpose::RetryMe => {
                if self.state.bot_id.is_empty() || self.state.bot_username.is_empty() {
                    self.fetch_me();
                }
            }
            TimerPurpose::RetryDelivery(reply_id) => self.send_part(reply_id),
            TimerPurpose::RetryCatchUp(channel_id) => self.fetch_since(&channel_id),
        }
    }

    fn typing(&mut self, target: &ReplyTarget) {
        if !self.settings.typing || !self.state.ws_open {
            return;
        }
        let Some(conn) = self.state.conn else { return };
        self.state.client_seq += 1;
        let frame = json!({
            "action": "user_typing",
            "seq": self.state.client_seq,
            "data": {"channel_id": target.conversation_id.as_str(), "parent_id": target.thread_root_id.as_str()},
        });
        self.out.push(Action::WsSend { conn, text: frame.to_string().into() });
    }
}

/// The part of a reply mark before the part number.
fn mark_prefix(bot_id: &str, nonce: &str, reply_id: u64) -> String {
    if nonce.is_empty() {
        format!("{bot_id}:{reply_id}")
    } else {
        format!("{bot_id}:{nonce}:{reply_id}")
    }
}

/// What the `fixture-panic-on-message` build panics on.
pub const PANIC_TRIGGER: &str = "PANIC-ON-THIS";
/// What the `fixture-build-b` build appends to every reply (tells two builds apart).
pub const BUILD_B_TAG: &str = "[build b]";

/// The fields of a post the adapter reads (the REST and WebSocket JSON carry many more).
/// Read into a struct, not a `Value`: every post of every channel goes through here.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WirePost {
    id: Option<String>,
    user_id: Option<String>,
    channel_id: Option<String>,
    root_id: Option<String>,
    message: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    create_at: Option<serde_json::Number>,
}

/// The channel id of a `posted` event's data.
fn post_channel(data: &Value) -> Option<String> {
    let post: Value = serde_json::from_str(data["post"].as_str()?).ok()?;
    post["channel_id"].as_str().map(str::to_string)
}
