//! The adapter state machine, by concern:
//! - `requests`: every HTTP request is built from what it is for (`requests::Pending`) in
//!   one function, so it can be sent again as the state is now (a retry, a rate limit, a
//!   swap), and a change of the host's request action is a change in one place;
//! - `sync`: the `/sync` long-poll — the first sync of a new account answers no history, the
//!   `since` cursor moves only in the batch that passes the messages on, limited timelines
//!   are filled from `/messages` before anything of that sync is passed on, failures back off;
//! - `rooms`: what the adapter knows of a room (public, DM, member count, alias) from the
//!   sync's state and `m.direct`; invites and auto-join; the `rooms` allowlist's aliases;
//! - `policy`: whether a message is answered (own messages, ignored users, edits, notices,
//!   chatmode, DM/group policies, the room allowlist) and as what inbound message;
//! - `delivery`: replies — split into events, one reply at a time per room and thread, a
//!   transaction id per part derived from the reply id (a resend is de-duplicated by the
//!   server), `429` waits, retries, typing notifications.
//!
//! Everything that must survive a generation change is in `State`, exported after every
//! batch: the host keeps the in-flight requests and timers across a warm swap, so the
//! successor must know what each request id is for — above all the `/sync` in flight and the
//! `since` it was sent with. A cold start (a new process) forgets requests and timers and
//! resumes from the saved `since`; replies not confirmed are handed out again by the host.

mod delivery;
mod policy;
mod requests;
mod rooms;
mod sync;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use switchboard_plugin_api::{Action, Event, Handover, HostHandle, LogLevel, ShutdownReason, StateBlob};

use crate::{settings::Settings, StartError};
use delivery::Delivery;
use requests::Pending;
use rooms::Room;
use sync::HeldSync;

pub const STATE_FORMAT: u32 = 1;
/// Threads whose last answered message is remembered (a reply in a thread points at it).
const THREAD_TIPS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum TimerPurpose {
    /// The next `/sync` after a failure or a rate limit.
    Sync,
    WhoAmI,
    Alias(String),
    Join(String),
    /// Send the next part of this reply again (rate limit, failure).
    Resend(u64),
}

/// The newest message answered in a thread: what a reply in it points at (`m.in_reply_to`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ThreadTip {
    room: String,
    root: String,
    event: String,
}

/// Everything a generation hands to the next one. Cursors and bookkeeping, not payloads
/// (replies under way are the exception: a warm successor must finish them).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    /// Which account on which server the cursor is of.
    account: String,
    /// The sync token up to which everything was passed on; `None` before the first sync.
    since: Option<String>,
    next_id: u64,
    /// Makes this gateway's transaction ids its own (reply ids start again with a new store).
    nonce: String,
    /// `whoami` confirmed the token and the user id.
    verified: bool,
    display_name: String,
    /// Aliases of the `rooms` allowlist, resolved to room ids.
    aliases: BTreeMap<String, String>,
    rooms: BTreeMap<String, Room>,
    /// Invites accepted whose join has not been confirmed yet.
    joining: BTreeSet<String>,
    /// Of those, the invites marked `is_direct`.
    direct_invites: BTreeSet<String>,
    /// HTTP requests in flight, by request id (the `/sync` one carries the `since` it was sent with).
    requests: BTreeMap<u64, Pending>,
    timers: BTreeMap<u64, TimerPurpose>,
    deliveries: BTreeMap<u64, Delivery>,
    thread_tips: VecDeque<ThreadTip>,
    /// Rooms where the bot shows typing.
    typing: BTreeSet<String>,
    sync_failures: u32,
    /// Failed attempts of other requests, by request.
    failures: BTreeMap<String, u32>,
    /// The server refused the token; logged once until it is accepted again.
    auth_refused: bool,
    rng: u64,
}

pub struct Adapter {
    host: HostHandle,
    settings: Settings,
    token: String,
    state: State,
    /// A sync answer held while its limited timelines are filled (never exported: a successor
    /// syncs again from `since`, which has not moved).
    held: Option<HeldSync>,
    out: Vec<Action>,
    cold: bool,
    /// The host speaks ABI v1.1 (`handed_over` answers): requests go out as `HttpCall`, with
    /// a response limit of the adapter's own; a v1.0 host gets `HttpRequest` (8 MiB).
    host_v1_1: bool,
}

impl Adapter {
    pub fn new(host: HostHandle, settings: Settings, handover: Handover) -> Result<Self, StartError> {
        let token = host
            .secret(settings.access_token_env.as_str().into())
            .into_option()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| StartError::MissingToken(settings.access_token_env.clone()))?;
        let host_v1_1 = host.handed_over().is_some();
        let mut adapter = Self {
            host,
            settings,
            token,
            state: State::default(),
            held: None,
            out: Vec::new(),
            cold: handover.cold,
            host_v1_1,
        };
        if let Some(previous) = handover.previous_state.into_option() {
            adapter.restore(previous.format_version, previous.data.as_str(), handover.cold);
        }
        adapter.state.account = adapter.settings.account();
        if adapter.state.rng == 0 {
            adapter.state.rng = ((adapter.host.now_ms() as u64) ^ (u64::from(std::process::id()) << 40)) | 1;
        }
        if adapter.state.nonce.is_empty() {
            adapter.state.nonce = format!("{:x}", adapter.random() & 0xffff_ffff);
        }
        Ok(adapter)
    }

    fn restore(&mut self, format_version: u32, data: &str, cold: bool) {
        if format_version != STATE_FORMAT {
            self.log(LogLevel::Warn, format!("unknown state format {format_version}; starting fresh"));
            return;
        }
        let state = match serde_json::from_str::<State>(data) {
            Ok(state) => state,
            Err(e) => return self.log(LogLevel::Warn, format!("previous state unreadable ({e}); starting fresh")),
        };
        if state.account != self.settings.account() {
            let message = format!(
                "the saved state is of {}, not {}: starting fresh (no history is answered)",
                state.account,
                self.settings.account()
            );
            return self.log(LogLevel::Warn, message);
        }
        self.state = state;
        if cold {
            self.forget_the_old_process();
        }
    }

    /// After a restart nothing of the old process's requests and timers exists. Replies not
    /// confirmed are handed out again by the host (their transaction ids make a resend of a
    /// part that did go out harmless), so the deliveries are dropped too.
    fn forget_the_old_process(&mut self) {
        let state = &mut self.state;
        state.requests.clear();
        state.timers.clear();
        state.deliveries.clear();
        state.failures.clear();
        state.sync_failures = 0;
        state.typing.clear();
        state.verified = false;
    }

    pub fn export_state(&self) -> StateBlob {
        let data = serde_json::to_string(&self.state).unwrap_or_default();
        StateBlob { format_version: STATE_FORMAT, data: data.into() }
    }

    /// The room an event concerns (for the host's dead-letter log line).
    pub fn conversation_of(&self, event: &Event) -> Option<String> {
        match event {
            Event::DeliverReply(reply) => Some(reply.target.conversation_id.to_string()),
            Event::AgentWorking { target } => Some(target.conversation_id.to_string()),
            Event::HttpResponse { request, .. } | Event::HttpFailed { request, .. } => {
                self.state.requests.get(request).and_then(Pending::room)
            }
            _ => None,
        }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        match event {
            Event::Started { generation } => self.started(generation),
            Event::HttpResponse { request, status, headers, body } => {
                self.http_response(request, status, &headers, body.as_str())
            }
            Event::HttpFailed { request, error } => self.http_failed(request, error.as_str()),
            Event::HttpResponseSkipped { request, body, .. } => {
                self.http_skipped(request, &String::from_utf8_lossy(&body))
            }
            Event::TimerFired { timer } => self.timer(timer),
            Event::DeliverReply(reply) => self.deliver(reply),
            // Transaction ids make a resend of a reply that went out post nothing new.
            Event::ReplyMayHaveGoneOut { .. } => {}
            Event::AgentWorking { target } => self.typing(target.conversation_id.as_str()),
            Event::Shutdown { reason: ShutdownReason::Stopping } => {
                self.log(LogLevel::Info, "stopping; the sync resumes from its saved position".into());
            }
            // Replaced: the host keeps the requests and timers for the next generation.
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

    fn set_timer(&mut self, purpose: TimerPurpose, after_ms: u64) {
        if let Some((&timer, _)) = self.state.timers.iter().find(|(_, p)| **p == purpose) {
            self.out.push(Action::SetTimer { timer, after_ms });
            return;
        }
        let timer = self.next_id();
        self.state.timers.insert(timer, purpose);
        self.out.push(Action::SetTimer { timer, after_ms });
    }

    fn timer_armed(&self, purpose: &TimerPurpose) -> bool {
        self.state.timers.values().any(|p| p == purpose)
    }

    /// xorshift64: jitter and a nonce need no cryptographic randomness.
    fn random(&mut self) -> u64 {
        let mut x = self.state.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.rng = x;
        x
    }

    /// `base` doubled per earlier failure, at most `max`, plus up to a quarter of jitter.
    fn backoff(&mut self, base: u64, failures: u32, max: u64) -> u64 {
        let wait = (base << failures.min(16)).min(max);
        wait + self.random() % (wait / 4 + 1)
    }

    fn started(&mut self, generation: u64) {
        if !self.cold && (self.sync_in_flight() || self.timer_armed(&TimerPurpose::Sync)) {
            self.log(
                LogLevel::Info,
                format!("generation {generation} takes over the sync in flight (since {:?})", self.state.since),
            );
            self.resolve_aliases();
            return;
        }
        self.log(
            LogLevel::Info,
            match &self.state.since {
                Some(since) => format!("generation {generation} starting; resuming the sync from {since}"),
                None => format!("generation {generation} starting; first sync (earlier messages are not answered)"),
            },
        );
        self.held = None;
        if self.state.verified {
            self.resolve_aliases();
            self.maybe_start_sync();
        } else if !self.timer_armed(&TimerPurpose::WhoAmI) {
            self.request(Pending::WhoAmI);
        }
        for room in self.state.joining.clone() {
            self.request(Pending::Join(room));
        }
    }

    fn timer(&mut self, timer: u64) {
        let Some(purpose) = self.state.timers.remove(&timer) else { return };
        match purpose {
            TimerPurpose::Sync => self.maybe_start_sync(),
            TimerPurpose::WhoAmI => self.request(Pending::WhoAmI),
            TimerPurpose::Alias(alias) => self.request(Pending::Alias(alias)),
            TimerPurpose::Join(room) => self.request(Pending::Join(room)),
            TimerPurpose::Resend(reply_id) => self.send_part(reply_id),
        }
    }

    /// The homeserver refused the token: unhealthy until a request is accepted again.
    fn token_refused(&mut self, what: &str) {
        if !self.state.auth_refused {
            self.state.auth_refused = true;
            let detail = format!(
                "the homeserver refused the access token of {} ({what}); check the variable {}",
                self.settings.user_id, self.settings.access_token_env
            );
            self.log(LogLevel::Error, detail.clone());
            self.out.push(Action::Health { healthy: false, detail: detail.into() });
        }
    }

    fn token_accepted(&mut self) {
        if self.state.auth_refused {
            self.state.auth_refused = false;
            self.log(LogLevel::Info, "the homeserver accepts the access token again".into());
            self.out.push(Action::Health { healthy: true, detail: "".into() });
        }
    }
}
