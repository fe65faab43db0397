//! The WebSocket: connect with the resume parameters, `hello`, per-connection seq, keepalive,
//! reconnect with backoff.
//!
//! The backoff resets once a connection is *proven good* — a `hello`, an event in sequence,
//! or an answer to the `ping` sent as soon as the socket opens (as the official client does
//! on open) — not on `hello` alone: a successful resume sends no `hello`
//! (app/platform/web_hub.go, only when `reuseCount == 0`), so a hello-only reset would let a
//! few resumed drops push every reconnect to the maximum wait. A header-authenticated upgrade
//! with a revoked token still upgrades, unauthenticated (no `hello`, closed after 5 s,
//! web_conn.go): the ping then comes back as `not_authenticated`, which is logged once as a
//! refused token, and reconnects back off.

use serde_json::{json, Value};
use switchboard_plugin_api::{Action, LogLevel};

use super::{number, post_channel, Adapter, TimerPurpose, BUFFERED_POSTS};

/// Connections in a row that never proved good before the instance reports itself unhealthy.
const UNPROVEN_BEFORE_UNHEALTHY: u32 = 3;

impl Adapter {
    pub(super) fn connect(&mut self) {
        let conn = self.next_id();
        self.state.conn = Some(conn);
        self.state.ws_open = false;
        self.state.conn_proven = false;
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

    pub(super) fn opened(&mut self) {
        self.state.ws_open = true;
        self.log(LogLevel::Info, "WebSocket open".into());
        // Asked at once: its answer proves the connection (a resume sends no hello), and an
        // unauthenticated socket answers it with `not_authenticated`.
        self.send_ping();
    }

    fn send_ping(&mut self) {
        let Some(conn) = self.state.conn else { return };
        self.state.client_seq += 1;
        let seq = self.state.client_seq;
        self.state.ping_outstanding = Some(seq);
        self.out.push(Action::WsSend { conn, text: json!({"action": "ping", "seq": seq}).to_string().into() });
    }

    pub(super) fn ping_due(&mut self) {
        let Some(conn) = self.state.conn else { return };
        if self.state.ping_outstanding.is_some() && self.state.ws_open {
            self.log(LogLevel::Warn, "the server did not answer the last ping; reconnecting".into());
            self.out.push(Action::WsClose { conn, code: 4000, reason: "ping timeout".into() });
            return;
        }
        if self.state.ws_open {
            self.send_ping();
        }
        self.set_timer(TimerPurpose::Ping, self.settings.ping_interval_ms);
    }

    pub(super) fn closed(&mut self, code: u16, reason: &str) {
        if self.state.conn_proven {
            self.state.reconnect_attempts = 0;
        } else if self.state.reconnect_attempts + 1 == UNPROVEN_BEFORE_UNHEALTHY && !self.state.auth_refused {
            let detail = format!(
                "no working WebSocket after {UNPROVEN_BEFORE_UNHEALTHY} attempts (last closed: {code} {reason})"
            );
            self.log(LogLevel::Error, format!("{detail}; still retrying"));
            self.report_health(false, detail);
        }
        self.state.conn = None;
        self.state.ws_open = false;
        self.state.conn_proven = false;
        self.state.timers.retain(|_, t| !matches!(t, TimerPurpose::Ping));
        let base = self.settings.reconnect_initial_ms.saturating_mul(1u64 << self.state.reconnect_attempts.min(20));
        let capped = base.min(self.settings.reconnect_max_ms);
        let jitter = self.random() % (capped / 5 + 1);
        let delay = capped + jitter;
        self.state.reconnect_attempts += 1;
        self.log(LogLevel::Warn, format!("WebSocket closed ({code} {reason}); reconnecting in {delay} ms"));
        self.set_timer(TimerPurpose::Reconnect, delay);
    }

    /// The connection works: its drop reconnects at once (with jitter), as after the first.
    fn proven(&mut self) {
        if self.state.conn_proven {
            return;
        }
        self.state.conn_proven = true;
        let was_unhealthy = self.state.auth_refused || self.state.reconnect_attempts >= UNPROVEN_BEFORE_UNHEALTHY;
        self.state.reconnect_attempts = 0;
        if self.state.auth_refused {
            self.state.auth_refused = false;
            self.log(LogLevel::Info, "the server accepts the bot token again".into());
        }
        if was_unhealthy {
            self.report_health(true, String::new());
        }
    }

    fn report_health(&mut self, healthy: bool, detail: String) {
        self.out.push(Action::Health { healthy, detail: detail.into() });
    }

    /// The server refused the token: one clear error per streak (the token itself never).
    pub(super) fn token_refused(&mut self, what: &str) {
        if !self.state.auth_refused {
            self.state.auth_refused = true;
            let env = self.settings.bot_token_env.clone();
            self.log(
                LogLevel::Error,
                format!("the Mattermost server refused the bot token from {env} ({what}); check that the token is valid and not revoked; retrying with backoff"),
            );
            self.report_health(false, format!("the Mattermost server refused the bot token from {env}"));
        }
    }

    pub(super) fn frame(&mut self, text: &str) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            self.log(LogLevel::Warn, format!("ignored a WebSocket frame that is not JSON ({} bytes)", text.len()));
            return;
        };
        if message.get("seq_reply").is_some() || message.get("status").is_some() {
            return self.action_reply(&message);
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
            self.proven();
        }
        if event == "posted" {
            let mut message = message;
            self.post_arrived(message["data"].take());
        }
    }

    /// A post from a `posted` frame: handled now, or kept until it can be (the bot's identity
    /// unknown yet, or its channel still catching up).
    fn post_arrived(&mut self, data: Value) {
        if self.state.bot_username.is_empty() {
            if self.state.buffered.len() < BUFFERED_POSTS {
                self.state.buffered.push_back(data);
            } else {
                self.log(LogLevel::Error, "too many posts before the bot identity is known; one dropped".into());
            }
        } else if self.must_hold(post_channel(&data).as_deref()) {
            self.state.held.push_back(data);
        } else {
            self.posted(&data);
        }
    }

    /// The answer to one of the adapter's own WebSocket actions (`ping`, `user_typing`).
    fn action_reply(&mut self, message: &Value) {
        let answered_ping =
            message["seq_reply"].as_i64().is_some() && message["seq_reply"].as_i64() == self.state.ping_outstanding;
        if message["status"] == "OK" {
            if answered_ping {
                self.state.ping_outstanding = None;
                let server_time = number(&message["data"]["server_time"]);
                self.state.server_clock_ms = self.state.server_clock_ms.max(server_time);
                self.proven();
            }
            return;
        }
        let error_id = message["error"]["id"].as_str().unwrap_or_default();
        if error_id == "api.web_socket_router.not_authenticated.app_error" {
            self.state.ping_outstanding = None;
            self.token_refused("the WebSocket is not authenticated");
            if let Some(conn) = self.state.conn {
                self.out.push(Action::WsClose { conn, code: 1000, reason: "not authenticated".into() });
            }
            return;
        }
        if answered_ping {
            // A refused ping still shows the connection is alive.
            self.state.ping_outstanding = None;
        }
        self.log(LogLevel::Debug, format!("server refused a request: {error_id}"));
    }

    /// A frame the host dead-lettered before, handed again by an operator: its post is handled
    /// as a new one (the skip remembered it as seen), and neither the sequence nor the post
    /// cursor moves, since the frame did not come from the socket. The host hands it over
    /// once and keeps one inbound message per post id, so it cannot be answered twice.
    pub(super) fn replayed_frame(&mut self, text: &str) {
        let Ok(mut message) = serde_json::from_str::<Value>(text) else {
            self.log(LogLevel::Warn, format!("ignored a replayed frame that is not JSON ({} bytes)", text.len()));
            return;
        };
        if message["event"] != "posted" {
            self.log(LogLevel::Info, "a replayed frame carries no post; nothing to do".into());
            return;
        }
        let data = message["data"].take();
        let post_id = data["post"]
            .as_str()
            .and_then(|p| serde_json::from_str::<Value>(p).ok())
            .and_then(|post| post["id"].as_str().map(str::to_string))
            .unwrap_or_default();
        self.log(LogLevel::Info, format!("post {post_id} replayed by the host; handling it as new"));
        self.forget_post(&post_id);
        self.post_arrived(data);
    }

    /// The host gave up on this frame: keep the sequence and the post cursor moving past it.
    pub(super) fn skip_frame(&mut self, text: &str) {
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
                    // Posts before it there may not be handed yet (held, or still to be caught
                    // up): the newest post known there is where a catch-up would start.
                    if !self.must_hold(Some(&channel_id)) {
                        self.remember(&channel_id, data, number(&post["create_at"]), &field("user_id"));
                    }
                    self.remember_post(&post_id);
                }
                self.log(LogLevel::Warn, format!("post {post_id} skipped: the host dead-lettered it"));
            }
        }
    }

    fn hello(&mut self, message: &Value, seq: i64) {
        let connection_id = message["data"]["connection_id"].as_str().unwrap_or_default().to_string();
        // What was posted since the restored state was saved may be missed too when that state
        // was saved before its connection said hello.
        let before_hello = std::mem::take(&mut self.restored_before_hello);
        let gap = (!self.state.connection_id.is_empty() && connection_id != self.state.connection_id) || before_hello;
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
        self.proven();
        if gap {
            self.gap();
        }
    }
}
