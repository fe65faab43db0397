//! The adapter state machine, by concern:
//! - `connection`: the WebSocket lifecycle — connect, `hello`, seq tracking, keepalive,
//!   resume, reconnect backoff (reset once a connection is proven good), a refused token;
//! - `requests`: every REST request goes through one queue that honours `Retry-After` and
//!   bounds the concurrency of background requests (catch-up, look-ups);
//! - `catch_up`: after a gap the server could not resume — which conversations missed
//!   posts (including ones never seen before: a first DM) and which posts are new;
//! - `policy`: whether a post is answered (own posts, bots and webhooks, post types,
//!   chatmode, DM/group policies, channel allowlist) and as what inbound message;
//! - `delivery`: replies — splitting, one at a time per conversation and thread, retries,
//!   looking for parts already posted before sending them again.
//!
//! Everything that must survive a generation change is in `State`, which is exported on
//! `Shutdown(Replaced)` and restored by the next generation; the host keeps the socket, the
//! in-flight HTTP requests and the timers, so their results reach whichever generation runs.
//! The host also stores the state after batches, so a restarted gateway (a *cold* handover)
//! resumes from the same cursor: it reconnects with the old connection id and sequence
//! number, fetches what was posted meanwhile when the server cannot resume, and looks for its
//! own posts before sending again a reply that may already have gone out.

mod catch_up;
mod connection;
mod delivery;
mod policy;
mod requests;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_plugin_api::{Action, Event, Handover, HostHandle, LogLevel, ShutdownReason, StateBlob};

use crate::settings::Settings;
use catch_up::CatchUp;
use delivery::Delivery;
use requests::Pending;

pub const STATE_FORMAT: u32 = 1;
const RECENT_POSTS: usize = 512;
/// Usernames remembered for catch-up (REST posts carry only the user id).
const KNOWN_USERS: usize = 2048;
/// The props key that marks a reply part, so a restarted gateway can find what it posted.
pub const REPLY_MARK: &str = "switchboard_reply";
const BUFFERED_POSTS: usize = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum TimerPurpose {
    Ping,
    Reconnect,
    RetryMe,
    RetryDelivery(u64),
    RetryCatchUp(String),
    /// A request waits for this timer: the server rate-limited us, or it failed and is tried
    /// again later.
    Retry(Pending),
    /// The rate limit's wait is over: send what queued meanwhile.
    Unthrottle,
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
    /// REST requests in flight.
    requests: BTreeMap<u64, Pending>,
    timers: BTreeMap<u64, TimerPurpose>,
    #[serde(default)]
    seen: BTreeMap<String, SeenChannel>,
    #[serde(default)]
    usernames: BTreeMap<String, String>,
    /// Live posts of conversations being caught up (or of any, while the gap's conversations
    /// are being found): processed after the catch-up, so each conversation stays in order.
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
    /// The newest server time known (posts' `create_at`, ping replies' `server_time`): where
    /// a gap starts for a conversation with no post seen.
    #[serde(default)]
    server_clock_ms: i64,
    /// The host's clock at the last event handled (a restarted gateway knows from it when its
    /// saved state was written).
    #[serde(default)]
    clock_ms: i64,
    /// Whether the current connection proved good (a `hello`, an event in sequence, or an
    /// answered ping): its drop then reconnects without backoff.
    #[serde(default)]
    conn_proven: bool,
    /// The server refused the token; logged once until it is accepted again.
    #[serde(default)]
    auth_refused: bool,
    /// Requests waiting to be sent (rate limit, background concurrency).
    #[serde(default)]
    queue: VecDeque<Pending>,
    /// No request leaves before then (host ms): the server rate-limited us.
    #[serde(default)]
    throttled_until_ms: i64,
    /// Failed attempts of background requests, by request.
    #[serde(default)]
    failures: BTreeMap<String, u32>,
    #[serde(default)]
    catch_ups: BTreeMap<String, CatchUp>,
    /// After a gap: the server time it started at, while the gap's conversations are found.
    #[serde(default)]
    discovering: Option<catch_up::Discovery>,
    /// Senders of caught-up posts being looked up.
    #[serde(default)]
    user_lookups: BTreeSet<String>,
    /// Replies the host says may already be posted (queued before a restart).
    #[serde(default)]
    maybe_sent: BTreeSet<u64>,
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
    /// The host clock when the restored state was written (0 without one).
    restored_clock_ms: i64,
    /// A state was restored that was saved before its first `hello` (the process died within
    /// the moments before the state was stored again): the first `hello` is then a gap too.
    restored_before_hello: bool,
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
            restored_clock_ms: 0,
            restored_before_hello: false,
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
                        adapter.restored_clock_ms = state.clock_ms;
                        adapter.restored_before_hello = state.connection_id.is_empty() && !alive;
                        adapter.state = state;
                        adapter.adopted = alive;
                        if !alive {
                            adapter.state.conn = None;
                            adapter.state.ws_open = false;
                        }
                        if handover.cold {
                            adapter.forget_the_old_process();
                        }
                        adapter.restart_catch_ups();
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
        state.queue.clear();
        state.failures.clear();
        state.throttled_until_ms = 0;
        state.me_request = None;
        state.ping_outstanding = None;
        state.reconnect_attempts = 0;
        state.conn_proven = false;
        state.user_lookups.clear();
        // Catch-ups and a discovery in progress start again once this generation has started,
        // not when a `hello` says there was a gap: the connection may well resume, and what
        // was missed before would then be lost. Their held posts wait for them as before.
        for delivery in state.deliveries.values_mut() {
            delivery.forget_the_old_process();
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

    /// Forget that `post_id` was handled (a replayed post is to be handled again).
    fn forget_post(&mut self, post_id: &str) {
        if self.recent_index.remove(post_id) {
            self.state.recent_posts.retain(|known| known != post_id);
        }
    }

    /// The catch-ups' fetched posts are left out (see the `catch_up` module): this is written after
    /// every batch.
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
            Event::WsFrameSkipped { text, .. } | Event::WsFrameReplayed { text } => {
                let message: Value = serde_json::from_str(text.as_str()).ok()?;
                post_channel(&message["data"]).filter(|c| !c.is_empty())
            }
            Event::DeliverReply(reply) => Some(reply.target.conversation_id.to_string()),
            Event::AgentWorking { target } => Some(target.conversation_id.to_string()),
            _ => None,
        }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        self.state.clock_ms = self.host.now_ms();
        match event {
            Event::Started { generation } => self.started(generation),
            Event::WsOpened { conn } if Some(conn) == self.state.conn => self.opened(),
            Event::WsFrame { conn, text } if Some(conn) == self.state.conn => self.frame(text.as_str()),
            Event::WsFrameSkipped { conn, text } if Some(conn) == self.state.conn => self.skip_frame(text.as_str()),
            Event::WsFrameReplayed { text } => self.replayed_frame(text.as_str()),
            Event::WsClosed { conn, code, reason } if Some(conn) == self.state.conn => {
                self.closed(code, reason.as_str())
            }
            Event::HttpResponse { request, status, headers, body } => {
                self.http_response(request, status, &headers, body.as_str())
            }
            Event::HttpFailed { request, error } => self.http_failed(request, error.as_str()),
            Event::TimerFired { timer } => self.timer(timer),
            Event::ReplyMayHaveGoneOut { reply_id } => self.may_have_gone_out(reply_id),
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

    fn set_timer(&mut self, purpose: TimerPurpose, after_ms: u64) -> u64 {
        let timer = self.next_id();
        self.state.timers.insert(timer, purpose);
        self.out.push(Action::SetTimer { timer, after_ms });
        timer
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
        self.send_idle_deliveries();
        self.resume_catch_ups();
        self.pump();
    }

    fn timer(&mut self, timer: u64) {
        let Some(purpose) = self.state.timers.remove(&timer) else { return };
        match purpose {
            TimerPurpose::Ping => self.ping_due(),
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
            TimerPurpose::RetryCatchUp(channel_id) => {
                if self.state.catch_ups.contains_key(&channel_id) {
                    self.request(Pending::CatchUp(channel_id));
                }
            }
            TimerPurpose::Retry(pending) => self.request(pending),
            TimerPurpose::Unthrottle => self.pump(),
        }
    }
}

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
    delete_at: Option<serde_json::Number>,
    props: Option<WireProps>,
}

/// The post props that say who really wrote a post (app/post.go, app/notification.go).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WireProps {
    from_bot: Option<Value>,
    from_webhook: Option<Value>,
    override_username: Option<Value>,
}

impl WireProps {
    /// Props are free-form: `"true"` from the server, `true` from some integrations.
    fn flag(value: &Option<Value>) -> bool {
        match value {
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
            _ => false,
        }
    }

    fn by_bot_or_webhook(&self) -> bool {
        Self::flag(&self.from_bot) || Self::flag(&self.from_webhook)
    }

    fn override_username(&self) -> Option<&str> {
        if !Self::flag(&self.from_webhook) {
            return None;
        }
        self.override_username.as_ref().and_then(Value::as_str).filter(|n| !n.is_empty())
    }
}

/// The channel id of a `posted` event's data.
fn post_channel(data: &Value) -> Option<String> {
    let post: Value = serde_json::from_str(data["post"].as_str()?).ok()?;
    post["channel_id"].as_str().map(str::to_string)
}

/// A JSON number field as i64 (0 when missing).
fn number(value: &Value) -> i64 {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64)).unwrap_or_default()
}
