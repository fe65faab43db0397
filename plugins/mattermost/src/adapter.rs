//! The adapter state machine: WebSocket lifecycle (hello, seq tracking, keepalive, resume,
//! backoff), `posted` filtering, reply delivery with splitting and retries, typing.
//!
//! Everything that must survive a generation change is in [`State`], which is exported on
//! `Shutdown(Replaced)` and restored by the next generation; the host keeps the socket, the
//! in-flight HTTP requests and the timers, so their results reach whichever generation runs.

use std::collections::{BTreeMap, VecDeque};

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
const RECENT_POSTS: usize = 1024;
const MAX_DELIVERY_ATTEMPTS: u32 = 5;
const BUFFERED_POSTS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TimerPurpose {
    Ping,
    Reconnect,
    RetryMe,
    RetryDelivery(u64),
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
    requests: BTreeMap<u64, u64>,
    timers: BTreeMap<u64, TimerPurpose>,
    reconnect_attempts: u32,
    ping_outstanding: Option<i64>,
    rng: u64,
}

pub struct Adapter {
    host: HostHandle,
    settings: Settings,
    token: String,
    state: State,
    adopted: bool,
    out: Vec<Action>,
}

impl Adapter {
    pub fn new(host: HostHandle, settings: Settings, handover: Handover) -> Result<Self, String> {
        let token = host
            .secret(settings.bot_token_env.as_str().into())
            .into_option()
            .map(|t| t.to_string())
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| format!("the environment variable {} (bot_token_env) is not set", settings.bot_token_env))?;
        let mut adapter = Self { host, settings, token, state: State::default(), adopted: false, out: Vec::new() };
        if let Some(previous) = handover.previous_state.into_option() {
            if previous.format_version != STATE_FORMAT {
                adapter
                    .log(LogLevel::Warn, format!("unknown state format {}; starting fresh", previous.format_version));
            } else {
                match serde_json::from_str::<State>(previous.data.as_str()) {
                    Ok(state) => {
                        let alive = state.conn.is_some_and(|c| handover.connections.iter().any(|o| o.conn == c));
                        adapter.state = state;
                        adapter.adopted = alive;
                        if !alive {
                            adapter.state.conn = None;
                            adapter.state.ws_open = false;
                        }
                    }
                    Err(e) => adapter.log(LogLevel::Warn, format!("previous state unreadable ({e}); starting fresh")),
                }
            }
        }
        if adapter.state.rng == 0 {
            adapter.state.rng = (adapter.host.now_ms() as u64) | 1;
        }
        Ok(adapter)
    }

    pub fn export_state(&self) -> StateBlob {
        StateBlob { format_version: STATE_FORMAT, data: serde_json::to_string(&self.state).unwrap_or_default().into() }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Started { generation } => self.started(generation),
            Event::WsOpened { conn } if Some(conn) == self.state.conn => {
                self.state.ws_open = true;
                self.log(LogLevel::Info, "WebSocket open".into());
            }
            Event::WsFrame { conn, text } if Some(conn) == self.state.conn => self.frame(text.as_str()),
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
        if self.state.bot_id.is_empty() && self.state.me_request.is_none() {
            self.fetch_me();
        }
        // Deliveries waiting for nothing in flight (e.g. the bot id was unknown) go now.
        let idle: Vec<u64> = self
            .state
            .deliveries
            .iter()
            .filter(|(id, d)| d.in_flight.is_none() && !self.retry_pending(**id))
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
            let data = message["data"].clone();
            if self.state.bot_username.is_empty() {
                if self.state.buffered.len() < BUFFERED_POSTS {
                    self.state.buffered.push_back(data);
                } else {
                    self.log(LogLevel::Error, "too many posts before the bot identity is known; one dropped".into());
                }
            } else {
                self.posted(&data);
            }
        }
    }

    fn hello(&mut self, message: &Value, seq: i64) {
        let connection_id = message["data"]["connection_id"].as_str().unwrap_or_default().to_string();
        if !self.state.connection_id.is_empty() && connection_id != self.state.connection_id {
            self.log(
                LogLevel::Warn,
                format!(
                    "new connection id after a gap (was {}, now {connection_id}); messages may have been missed",
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
    }

    fn posted(&mut self, data: &Value) {
        let Some(post) = data["post"].as_str().and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
            self.log(LogLevel::Warn, "posted event without a readable post".into());
            return;
        };
        let field = |name: &str| post[name].as_str().unwrap_or_default().to_string();
        let (post_id, user_id, channel_id, root_id) =
            (field("id"), field("user_id"), field("channel_id"), field("root_id"));
        let message = field("message");
        if post_id.is_empty() || channel_id.is_empty() {
            return;
        }
        if user_id == self.state.bot_id || !field("type").is_empty() {
            return;
        }
        if self.state.recent_posts.contains(&post_id) {
            self.log(LogLevel::Debug, format!("post {post_id} seen before; not answered again"));
            return;
        }
        self.state.recent_posts.push_back(post_id.clone());
        if self.state.recent_posts.len() > RECENT_POSTS {
            self.state.recent_posts.pop_front();
        }
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
                created_at_ms: post["create_at"].as_i64().unwrap_or_default(),
            })),
            Ok(_) => self.log(LogLevel::Debug, format!("post {post_id} is empty after stripping; not answered")),
            Err(reason) => self.log(LogLevel::Debug, format!("post {post_id} not answered: {reason}")),
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
        let parts = text::split(reply.text.as_str(), self.settings.max_post_chars);
        let delivery = Delivery {
            channel_id: reply.target.conversation_id.to_string(),
            root_id: reply.target.thread_root_id.to_string(),
            parts,
            next_part: 0,
            attempt: 0,
            first_post_id: String::new(),
            in_flight: None,
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
        let mut body = json!({
            "channel_id": delivery.channel_id,
            "message": delivery.parts[delivery.next_part],
            // The server answers a repeat with the post it already made: retries cannot duplicate.
            "pending_post_id": format!("{bot_id}:{reply_id}:{}", delivery.next_part),
        });
        if !delivery.root_id.is_empty() {
            body["root_id"] = json!(delivery.root_id);
        }
        delivery.in_flight = Some(request);
        self.state.requests.insert(request, reply_id);
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
        let Some(reply_id) = self.state.requests.remove(&request) else { return };
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.in_flight = None;
        match status {
            200 | 201 => {
                let post: Value = serde_json::from_str(body).unwrap_or_default();
                if delivery.first_post_id.is_empty() {
                    delivery.first_post_id = post["id"].as_str().unwrap_or_default().to_string();
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

    fn http_failed(&mut self, request: u64, error: &str) {
        if self.state.me_request == Some(request) {
            self.state.me_request = None;
            self.log(LogLevel::Warn, format!("GET /users/me failed ({error}); retrying in 2 s"));
            self.set_timer(TimerPurpose::RetryMe, 2000);
            return;
        }
        let Some(reply_id) = self.state.requests.remove(&request) else { return };
        if let Some(delivery) = self.state.deliveries.get_mut(&reply_id) {
            delivery.in_flight = None;
            self.retry_or_fail(reply_id, error.to_string());
        }
    }

    fn retry_or_fail(&mut self, reply_id: u64, error: String) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.attempt += 1;
        if delivery.attempt >= MAX_DELIVERY_ATTEMPTS {
            self.state.deliveries.remove(&reply_id);
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
