//! Replies: split into posts, one reply at a time per conversation and thread (so they arrive
//! in the order the host queued them, whatever is retried), each part marked so a restarted
//! gateway can find it, and looked for before it is sent again when it may already be posted.
//!
//! Exactly once does not lean on the server: Mattermost answers a repeated `pending_post_id`
//! with the first post only for 30 s (`PendingPostIDsCacheTTL`, app/post.go). A reply that may
//! have gone out — its request timed out or failed, the gateway restarted while it was in
//! flight, or the host says it was queued before a restart — is first looked for in its
//! channel by its mark (`props.switchboard_reply`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use switchboard_plugin_api::{Action, LogLevel, OutboundReply, ReplyTarget};

use super::{catch_up::PostList, number, requests::Pending, Adapter, TimerPurpose, REPLY_MARK};
use crate::text;

const MAX_DELIVERY_ATTEMPTS: u32 = 5;
/// A delivery the adapter gave up on waits this long for the host to hand it back.
const PARKED_FOR_MS: i64 = 3_600_000;
/// How far before a reply was queued its parts are looked for (clocks of the gateway and the
/// server differ).
const LOOK_BACK_MS: i64 = 60_000;
/// A reply the host says may have gone out, with no saved state to tell when: look this far.
const LOOK_BACK_UNKNOWN_MS: i64 = 600_000;
/// What a reply whose thread was deleted says first, posted in the channel instead.
pub const DELETED_THREAD_NOTE: &str = "(In reply to a thread that has since been deleted.)";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Delivery {
    pub(super) channel_id: String,
    root_id: String,
    parts: Vec<String>,
    next_part: usize,
    attempt: u32,
    first_post_id: String,
    pub(super) in_flight: Option<u64>,
    #[serde(default)]
    queued_at_ms: i64,
    /// Parts may already be posted (a restart, or attempts that timed out): look first.
    #[serde(default)]
    verify: bool,
    /// Attempts exhausted; waiting for the host to hand the reply back.
    #[serde(default)]
    parked_at_ms: Option<i64>,
    /// The thread the reply answers, which orders it among its conversation's replies (its
    /// `root_id` becomes "" when that thread was deleted). None in states of older builds.
    #[serde(default)]
    thread: Option<String>,
    /// Waiting in the request queue.
    #[serde(default)]
    pub(super) queued: bool,
    /// While looking page by page: the parts found so far.
    #[serde(default)]
    found: BTreeMap<usize, String>,
    #[serde(default)]
    look_page: Option<u32>,
}

impl Delivery {
    fn conversation(&self) -> (&str, &str) {
        (self.channel_id.as_str(), self.thread.as_deref().unwrap_or(&self.root_id))
    }

    pub(super) fn forget_the_old_process(&mut self) {
        let maybe_sent = self.in_flight.is_some()
            || self.queued
            || self.attempt > 0
            || self.next_part > 0
            || self.parked_at_ms.is_some();
        self.in_flight = None;
        self.queued = false;
        self.parked_at_ms = None;
        self.attempt = 0;
        self.look_page = None;
        self.found.clear();
        self.verify |= maybe_sent;
    }
}

impl Adapter {
    pub(super) fn may_have_gone_out(&mut self, reply_id: u64) {
        if let Some(known) = self.state.deliveries.get_mut(&reply_id) {
            known.verify = true;
        } else {
            self.state.maybe_sent.insert(reply_id);
        }
    }

    pub(super) fn deliver(&mut self, reply: OutboundReply) {
        let now = self.host.now_ms();
        self.state.deliveries.retain(|_, d| d.parked_at_ms.is_none_or(|at| now - at < PARKED_FOR_MS));
        let maybe_sent = self.state.maybe_sent.remove(&reply.reply_id);
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
        let parts = text::split(reply.text.as_str(), self.settings.max_post_chars);
        let queued_at_ms = if !maybe_sent {
            now
        } else if self.restored_clock_ms > 0 {
            self.restored_clock_ms
        } else {
            now - LOOK_BACK_UNKNOWN_MS
        };
        let ReplyTarget { conversation_id, thread_root_id } = reply.target;
        let delivery = Delivery {
            channel_id: conversation_id.to_string(),
            root_id: thread_root_id.to_string(),
            thread: Some(thread_root_id.to_string()),
            parts,
            next_part: 0,
            attempt: 0,
            first_post_id: String::new(),
            in_flight: None,
            queued_at_ms,
            verify: maybe_sent,
            parked_at_ms: None,
            queued: false,
            found: BTreeMap::new(),
            look_page: None,
        };
        self.state.deliveries.insert(reply.reply_id, delivery);
        self.send_part(reply.reply_id);
    }

    /// Whether `reply_id` is the oldest reply of its conversation and thread still to go.
    fn is_next_in_conversation(&self, reply_id: u64) -> bool {
        let Some(delivery) = self.state.deliveries.get(&reply_id) else { return false };
        let conversation = delivery.conversation();
        self.state.deliveries.iter().find(|(_, d)| d.conversation() == conversation).map(|(id, _)| *id)
            == Some(reply_id)
    }

    /// Deliveries that wait for nothing (the bot id was unknown, a restart) go now.
    pub(super) fn send_idle_deliveries(&mut self) {
        let idle: Vec<u64> = self
            .state
            .deliveries
            .iter()
            .filter(|(id, d)| {
                d.in_flight.is_none() && !d.queued && d.parked_at_ms.is_none() && !self.retry_pending(**id)
            })
            .map(|(id, _)| *id)
            .collect();
        for reply_id in idle {
            self.send_part(reply_id);
        }
    }

    fn retry_pending(&self, reply_id: u64) -> bool {
        self.state.timers.values().any(|t| matches!(t, TimerPurpose::RetryDelivery(id) if *id == reply_id))
    }

    /// Send (or look for) the next part of `reply_id`, if it is its conversation's turn.
    pub(super) fn send_part(&mut self, reply_id: u64) {
        if self.state.bot_id.is_empty() {
            return; // sent once /users/me answers
        }
        let Some(delivery) = self.state.deliveries.get(&reply_id) else { return };
        if delivery.in_flight.is_some() || delivery.queued || delivery.parked_at_ms.is_some() {
            return;
        }
        if !self.is_next_in_conversation(reply_id) {
            return; // goes when the replies before it in its conversation are done
        }
        let pending = if delivery.verify { Pending::Verify(reply_id) } else { Pending::Post(reply_id) };
        self.request(pending);
    }

    /// `POST /posts` for the next part of `reply_id`.
    pub(super) fn post_request(&self, reply_id: u64) -> Option<(&'static str, String, String)> {
        let delivery = self.state.deliveries.get(&reply_id)?;
        let prefix = mark_prefix(&self.state.bot_id, &self.state.mark_nonce, reply_id);
        let mark = format!("{prefix}:{}", delivery.next_part);
        let mut body = json!({
            "channel_id": delivery.channel_id,
            "message": delivery.parts.get(delivery.next_part)?,
            // The server answers a repeat within its 30 s cache with the post it already made;
            // the mark in props lets a later look find it too.
            "pending_post_id": mark,
            "props": {REPLY_MARK: mark},
        });
        if !delivery.root_id.is_empty() {
            body["root_id"] = json!(delivery.root_id);
        }
        Some(("POST", "/posts".to_string(), body.to_string()))
    }

    /// A look at the reply's channel since it was queued (page by page when the `since`
    /// answer was cut at its limit).
    pub(super) fn verify_request(&self, reply_id: u64) -> Option<(&'static str, String, String)> {
        let delivery = self.state.deliveries.get(&reply_id)?;
        let path = match delivery.look_page {
            None => {
                let since = (delivery.queued_at_ms - LOOK_BACK_MS).max(0);
                format!("/channels/{}/posts?since={since}", delivery.channel_id)
            }
            Some(page) => format!("/channels/{}/posts?page={page}&per_page={}", delivery.channel_id, PostList::PAGE),
        };
        Some(("GET", path, String::new()))
    }

    pub(super) fn post_answered(&mut self, reply_id: u64, status: u16, body: &str) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.in_flight = None;
        let error_id = || {
            serde_json::from_str::<Value>(body)
                .ok()
                .and_then(|b| b["id"].as_str().map(str::to_string))
                .unwrap_or_default()
        };
        match status {
            200 | 201 => {
                if delivery.first_post_id.is_empty() {
                    let post: Value = serde_json::from_str(body).unwrap_or_default();
                    delivery.first_post_id = post["id"].as_str().unwrap_or_default().to_string();
                }
                delivery.next_part += 1;
                delivery.attempt = 0;
                if delivery.next_part < delivery.parts.len() {
                    self.send_part(reply_id);
                } else {
                    self.finish(reply_id, Ok(()));
                }
            }
            400 if !delivery.root_id.is_empty() && error_id() == "api.post.create_post.root_id.app_error" => {
                // The thread's root was deleted (app/post.go): the reply still belongs to this
                // conversation, so it goes into the channel, saying what it answers.
                delivery.root_id.clear();
                let first = delivery.parts.get(delivery.next_part).cloned().unwrap_or_default();
                let noted = format!("{DELETED_THREAD_NOTE}\n\n{first}");
                if noted.chars().count() <= self.settings.max_post_chars {
                    delivery.parts[delivery.next_part] = noted;
                } else {
                    delivery.parts.insert(delivery.next_part, DELETED_THREAD_NOTE.to_string());
                }
                let channel = delivery.channel_id.clone();
                self.log(
                    LogLevel::Warn,
                    format!("reply {reply_id}: its thread in channel {channel} was deleted; posting it in the channel"),
                );
                self.send_part(reply_id);
            }
            500 if error_id() == "api.post.deduplicate_create_post.pending" => {
                // An earlier request with this pending_post_id is still being handled by the
                // server: it may yet create the post, so look before posting again.
                delivery.verify = true;
                self.retry_or_fail(reply_id, "the server is still creating an earlier attempt".into());
            }
            500..=599 => self.retry_or_fail(reply_id, format!("server answered {status}")),
            _ => {
                let error = format!("POST /posts answered {status} {}", error_id());
                self.finish(reply_id, Err((error, false)));
            }
        }
    }

    /// The reply is done (delivered, or failed for good, or parked): report it and let the
    /// next reply of its conversation go.
    fn finish(&mut self, reply_id: u64, outcome: Result<(), (String, bool)>) {
        let Some(done) = self.state.deliveries.remove(&reply_id) else { return };
        self.out.push(match outcome {
            Ok(()) => Action::ReplyDelivered { reply_id, platform_message_id: done.first_post_id.clone().into() },
            Err((error, retryable)) => Action::ReplyFailed { reply_id, error: error.into(), retryable },
        });
        self.send_next_of(done.conversation());
    }

    fn send_next_of(&mut self, (channel, thread): (&str, &str)) {
        let next = self.state.deliveries.iter().find(|(_, d)| d.conversation() == (channel, thread)).map(|(id, _)| *id);
        if let Some(next) = next {
            if !self.retry_pending(next) {
                self.send_part(next);
            }
        }
    }

    /// The answer to a look for parts of `reply_id` already posted.
    pub(super) fn verified(&mut self, reply_id: u64, status: u16, body: &str) {
        let bot_id = self.state.bot_id.clone();
        let prefix = mark_prefix(&bot_id, &self.state.mark_nonce, reply_id);
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.in_flight = None;
        if status != 200 {
            let error = format!("looking for parts already posted: server answered {status}");
            return self.retry_or_fail(reply_id, error);
        }
        let list = PostList::parse(body);
        for post in list.posts.values().filter(|p| p["user_id"] == bot_id.as_str()) {
            let Some(mark) = post["props"][REPLY_MARK].as_str() else { continue };
            let mut fields = mark.rsplitn(2, ':');
            let part = fields.next().and_then(|p| p.parse::<usize>().ok());
            if let (Some(part), Some(found_prefix)) = (part, fields.next()) {
                if found_prefix == prefix && number(&post["delete_at"]) == 0 {
                    delivery.found.insert(part, post["id"].as_str().unwrap_or_default().to_string());
                }
            }
        }
        let since = (delivery.queued_at_ms - LOOK_BACK_MS).max(0);
        let more = match delivery.look_page {
            None => list.order.len() >= PostList::SINCE_LIMIT,
            Some(_) => list.order.len() >= PostList::PAGE && list.oldest_create_at() > since,
        };
        if more && delivery.look_page.is_none_or(|page| page + 1 < PostList::MAX_PAGES) {
            delivery.look_page = Some(delivery.look_page.map_or(0, |page| page + 1));
            self.request(Pending::Verify(reply_id));
            return;
        }
        delivery.verify = false;
        delivery.look_page = None;
        let found = std::mem::take(&mut delivery.found);
        while let Some(post_id) = found.get(&delivery.next_part) {
            if delivery.first_post_id.is_empty() {
                delivery.first_post_id = post_id.clone();
            }
            delivery.next_part += 1;
        }
        let done = delivery.next_part >= delivery.parts.len();
        if !found.is_empty() {
            self.log(
                LogLevel::Info,
                format!("reply {reply_id}: {} part(s) were already posted; not sending them again", found.len()),
            );
        }
        if done {
            self.finish(reply_id, Ok(()));
        } else {
            self.send_part(reply_id);
        }
    }

    /// The request may have reached the server before it failed: look before resending.
    pub(super) fn delivery_failed(&mut self, reply_id: u64, error: &str) {
        if let Some(delivery) = self.state.deliveries.get_mut(&reply_id) {
            delivery.in_flight = None;
            delivery.look_page = None;
            delivery.found.clear();
            delivery.verify = true;
            self.retry_or_fail(reply_id, error.to_string());
        }
    }

    fn retry_or_fail(&mut self, reply_id: u64, error: String) {
        let Some(delivery) = self.state.deliveries.get_mut(&reply_id) else { return };
        delivery.attempt += 1;
        if delivery.attempt >= MAX_DELIVERY_ATTEMPTS {
            // Parked, not dropped: the host hands it back later, and parts may have gone out.
            // It keeps its place: later replies of its conversation wait behind it.
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

    pub(super) fn typing(&mut self, target: &ReplyTarget) {
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
