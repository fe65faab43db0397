//! Replies: split into events, one reply at a time per room and thread (so they arrive in the
//! order the host queued them, whatever is retried), each part sent with
//! `PUT /rooms/{room}/send/m.room.message/{txnId}`.
//!
//! The transaction id is `switchboard-<nonce>-<reply id>-<part>`: the server answers a repeat
//! from the same access token with the event it already made (Synapse keeps them for a day),
//! so a part sent again — after a timeout, a 5xx, a swap or a restart, or when the host hands a
//! reply out again after `ReplyMayHaveGoneOut` — is posted once. The nonce is made on the
//! first start and kept in the state: reply ids start again with a new store, and a repeated
//! transaction id would otherwise be answered with an old reply's event. A new access token
//! (a new device) is a new de-duplication scope.
//!
//! Replies are sent as `m.notice` (what bots send; see the `policy` module). In a thread a
//! reply is a thread event pointing (as its fallback for clients without threads) at the
//! newest message answered there.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_plugin_api::{Action, Header, LogLevel, OutboundReply};

use super::{
    requests::{encode, MatrixError, Pending},
    Adapter, TimerPurpose,
};
use crate::text;

/// The body of one event at most, as JSON-escaped bytes (an event is at most 64 KiB).
pub const MAX_PART_BYTES: usize = 16 * 1024;
/// A part that fails (5xx, no answer) is tried this many times before the reply is given
/// back to the host as failed (it hands it out again later).
const MAX_ATTEMPTS: u32 = 5;
/// A 429 without `retry_after_ms` waits this long.
const DEFAULT_RATE_LIMIT_WAIT_MS: u64 = 1000;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Delivery {
    room: String,
    /// The thread ("" when none).
    thread_root: String,
    /// What a thread reply points at as its fallback.
    #[serde(default)]
    in_reply_to: String,
    parts: Vec<String>,
    next_part: usize,
    first_event_id: String,
    in_flight: bool,
    attempts: u32,
}

impl Delivery {
    fn conversation(&self) -> (&str, &str) {
        (&self.room, &self.thread_root)
    }
}

impl Adapter {
    pub(super) fn deliver(&mut self, reply: OutboundReply) {
        if self.state.deliveries.contains_key(&reply.reply_id) {
            return; // already under way
        }
        let room = reply.target.conversation_id.to_string();
        let thread_root = reply.target.thread_root_id.to_string();
        let in_reply_to = if thread_root.is_empty() { String::new() } else { self.thread_tip(&room, &thread_root) };
        let delivery = Delivery {
            parts: text::split(reply.text.as_str(), MAX_PART_BYTES),
            room,
            thread_root,
            in_reply_to,
            next_part: 0,
            first_event_id: String::new(),
            in_flight: false,
            attempts: 0,
        };
        self.state.deliveries.insert(reply.reply_id, delivery);
        self.send_part(reply.reply_id);
    }

    /// Whether `reply_id` is the oldest reply of its room and thread still to go.
    fn is_next_in_conversation(&self, reply_id: u64) -> bool {
        let Some(delivery) = self.state.deliveries.get(&reply_id) else { return false };
        let conversation = delivery.conversation();
        self.state.deliveries.iter().find(|(_, d)| d.conversation() == conversation).map(|(id, _)| *id)
            == Some(reply_id)
    }

    /// Send the next part of `reply_id` if it is its conversation's turn and nothing of it is
    /// under way or waiting for a timer.
    pub(super) fn send_part(&mut self, reply_id: u64) {
        let Some(delivery) = self.state.deliveries.get(&reply_id) else { return };
        if delivery.in_flight
            || self.timer_armed(&TimerPurpose::Resend(reply_id))
            || !self.is_next_in_conversation(reply_id)
        {
            return;
        }
        let part = delivery.next_part;
        if let Some(delivery) = self.state.deliveries.get_mut(&reply_id) {
            delivery.in_flight = true;
        }
        self.request(Pending::Send { reply_id, part });
    }

    /// The path and content of part `part` of `reply_id`.
    pub(super) fn send_request(&self, reply_id: u64, part: usize) -> Option<(String, Value)> {
        let delivery = self.state.deliveries.get(&reply_id)?;
        let body = delivery.parts.get(part)?;
        let txn_id = format!("switchboard-{}-{reply_id}-{part}", self.state.nonce);
        let mut content = json!({"msgtype": "m.notice", "body": body});
        if !delivery.thread_root.is_empty() {
            content["m.relates_to"] = json!({
                "rel_type": "m.thread",
                "event_id": delivery.thread_root,
                "is_falling_back": true,
                "m.in_reply_to": {"event_id": delivery.in_reply_to},
            });
        }
        let path = format!("/rooms/{}/send/m.room.message/{}", encode(&delivery.room), encode(&txn_id));
        Some((path, content))
    }

    pub(super) fn send_answered(&mut self, reply_id: u64, part: usize, status: u16, headers: &[Header], body: &str) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        if delivery.next_part != part {
            return; // an answer to an earlier attempt of a part already done
        }
        delivery.in_flight = false;
        let answer: Value = serde_json::from_str(body).unwrap_or_default();
        if let (200, Some(event_id)) = (status, answer["event_id"].as_str()) {
            if delivery.first_event_id.is_empty() {
                delivery.first_event_id = event_id.to_string();
            }
            delivery.next_part += 1;
            delivery.attempts = 0;
            if delivery.next_part < delivery.parts.len() {
                return self.send_part(reply_id);
            }
            let first_event_id = delivery.first_event_id.clone();
            return self
                .finish(reply_id, Action::ReplyDelivered { reply_id, platform_message_id: first_event_id.into() });
        }
        let error = MatrixError::parse(headers, body);
        if status == 429 {
            let wait = error.retry_after_ms.unwrap_or(DEFAULT_RATE_LIMIT_WAIT_MS).clamp(1, 300_000);
            self.log(
                LogLevel::Warn,
                format!("reply {reply_id} rate limited ({}); sending again in {wait} ms", error.errcode),
            );
            return self.set_timer(TimerPurpose::Resend(reply_id), wait);
        }
        if error.token_refused(status) {
            self.token_refused("sending a reply answered 401");
            let failed = Action::ReplyFailed {
                reply_id,
                error: "the homeserver refused the access token".into(),
                retryable: true,
            };
            return self.finish(reply_id, failed);
        }
        if status == 200 || status >= 500 {
            // A 200 without an event id is as ambiguous as a 5xx: the same transaction id
            // makes the next attempt harmless either way.
            return self.send_failed(reply_id, part, format!("the homeserver answered {status} {}", error.errcode));
        }
        let failed = Action::ReplyFailed {
            reply_id,
            error: format!("the homeserver refused the reply: {status} {}", error.errcode).into(),
            retryable: false,
        };
        self.finish(reply_id, failed)
    }

    /// A part got no usable answer: send it again later, or give the reply back to the host.
    pub(super) fn send_failed(&mut self, reply_id: u64, part: usize, error: String) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        if delivery.next_part != part {
            return;
        }
        delivery.in_flight = false;
        delivery.attempts += 1;
        let attempts = delivery.attempts;
        if attempts >= MAX_ATTEMPTS {
            let error = format!("gave up after {attempts} attempts: {error}");
            return self.finish(reply_id, Action::ReplyFailed { reply_id, error: error.into(), retryable: true });
        }
        let wait = self.backoff(500, attempts - 1, 30_000);
        self.log(LogLevel::Warn, format!("sending reply {reply_id} failed ({error}); sending again in {wait} ms"));
        self.set_timer(TimerPurpose::Resend(reply_id), wait);
    }

    /// The reply is done (delivered or failed): report it and let the next reply of its
    /// conversation go.
    fn finish(&mut self, reply_id: u64, outcome: Action) {
        let Some(done) = self.state.deliveries.remove(&reply_id) else { return };
        self.out.push(outcome);
        if let Some((&timer, _)) = self.state.timers.iter().find(|(_, p)| **p == TimerPurpose::Resend(reply_id)) {
            self.state.timers.remove(&timer);
            self.out.push(Action::CancelTimer { timer });
        }
        let next =
            self.state.deliveries.iter().find(|(_, d)| d.conversation() == done.conversation()).map(|(id, _)| *id);
        if let Some(next) = next {
            self.send_part(next);
        }
        let room_busy = self.state.deliveries.values().any(|d| d.room == done.room);
        if !room_busy && self.state.typing.remove(&done.room) {
            self.request(Pending::Typing { room: done.room, typing: false });
        }
    }

    /// An agent works on an answer for `room`: show typing there (best effort).
    pub(super) fn typing(&mut self, room: &str) {
        if room.is_empty() {
            return;
        }
        self.state.typing.insert(room.to_string());
        self.request(Pending::Typing { room: room.to_string(), typing: true });
    }
}
