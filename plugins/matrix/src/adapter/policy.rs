//! Whether a message is answered, and as what inbound message.
//!
//! Not answered: the bot's own messages (the sync echoes them), senders in `ignore_users`,
//! edits (`m.replace`: the original was answered), redacted messages, and message types other
//! than `m.text` and `m.emote` — `m.notice` is what bots send (the spec asks clients never to
//! answer it automatically, which is what keeps two bots from answering each other; this
//! adapter sends its replies as notices), images and files carry no question. Then the room's
//! policy (`dm_policy` for DMs; `group_policy` and the `rooms` allowlist for the others) and,
//! outside DMs, the chatmode decide.

use std::collections::HashMap;

use serde_json::Value;
use switchboard_plugin_api::{Action, InboundMessage, LogLevel, PeerKind};

use super::{Adapter, ThreadTip, THREAD_TIPS};
use crate::{settings::ChatMode, text};

impl Adapter {
    /// The names the bot goes by in a body: its MXID, its display name and its localpart.
    fn own_names(&self) -> Vec<String> {
        let mut names = vec![self.settings.user_id.clone(), self.settings.localpart().to_string()];
        if !self.state.display_name.is_empty() {
            names.push(self.state.display_name.clone());
        }
        names
    }

    /// An `m.room.message` event of a joined room's timeline.
    pub(super) fn message(&mut self, room_id: &str, event: &Value, names: &HashMap<String, String>) {
        let (Some(event_id), Some(sender)) = (event["event_id"].as_str(), event["sender"].as_str()) else { return };
        if sender == self.settings.user_id {
            return;
        }
        let content = &event["content"];
        let relation = &content["m.relates_to"];
        let skip = |adapter: &mut Self, why: &str| {
            adapter.log(LogLevel::Debug, format!("message {event_id} in {room_id} not answered: {why}"))
        };
        if self.settings.ignored(sender) {
            return skip(self, "the sender is in ignore_users");
        }
        if relation["rel_type"] == "m.replace" {
            return skip(self, "an edit");
        }
        let Some(body) = content["body"].as_str() else { return skip(self, "redacted or without a body") };
        match content["msgtype"].as_str() {
            Some("m.text" | "m.emote") => {}
            Some(other) => return skip(self, &format!("of type {other}")),
            None => return skip(self, "without a msgtype"),
        }
        let thread_root = if relation["rel_type"] == "m.thread" { relation["event_id"].as_str() } else { None };
        // A rich reply (not a thread's fallback) quotes what it answers first.
        let body = if relation["m.in_reply_to"].is_object() && relation["is_falling_back"] != true {
            text::strip_reply_fallback(body)
        } else {
            body
        };
        let own_names = self.own_names();
        let own_names: Vec<&str> = own_names.iter().map(String::as_str).collect();
        let mentioned = content["m.mentions"]["user_ids"]
            .as_array()
            .is_some_and(|ids| ids.iter().any(|id| *id == self.settings.user_id.as_str()))
            || text::mentions(body, &own_names);
        let stripped = text::strip_mentions(body, &own_names);
        let peer_kind = self.room_kind(room_id);
        let decision = match peer_kind {
            PeerKind::Dm => self.policy_refusal(self.settings.dm_policy, sender).map_or(Ok(stripped), Err),
            _ if !self.room_listed(room_id, None) => Err("the room is not in the rooms allowlist"),
            _ => match self.policy_refusal(self.settings.group_policy, sender) {
                Some(refusal) => Err(refusal),
                None => self.chatmode(body, stripped, mentioned),
            },
        };
        let text = match decision {
            Ok(text) if text.trim().is_empty() => return skip(self, "empty once the mention is removed"),
            Ok(text) => text,
            Err(why) => return skip(self, why),
        };
        let thread_root = thread_root.unwrap_or_default();
        if !thread_root.is_empty() {
            self.remember_thread_tip(room_id, thread_root, event_id);
        }
        let sender_name = names.get(sender).cloned().unwrap_or_else(|| sender.to_string());
        self.out.push(Action::Inbound(InboundMessage {
            message_id: event_id.into(),
            peer_kind,
            peer_id: room_id.into(),
            thread_root_id: thread_root.into(),
            sender_id: sender.into(),
            sender_name: sender_name.into(),
            text: text.into(),
            created_at_ms: event["origin_server_ts"].as_i64().unwrap_or_default(),
        }));
    }

    fn chatmode(&self, body: &str, stripped: String, mentioned: bool) -> Result<String, &'static str> {
        match self.settings.chatmode {
            ChatMode::OnMessage => Ok(stripped),
            ChatMode::OnCall if mentioned => Ok(stripped),
            ChatMode::OnCall => Err("chatmode oncall and the bot was not mentioned"),
            ChatMode::OnChar => {
                let trimmed = body.trim_start();
                match self.settings.onchar_prefixes.iter().find(|p| trimmed.starts_with(p.as_str())) {
                    Some(prefix) => Ok(trimmed[prefix.len()..].trim().to_string()),
                    None => Err("chatmode onchar and no prefix"),
                }
            }
        }
    }

    /// The newest answered message of a thread: a reply in it points at it.
    fn remember_thread_tip(&mut self, room: &str, root: &str, event: &str) {
        let tips = &mut self.state.thread_tips;
        tips.retain(|t| !(t.room == room && t.root == root));
        tips.push_back(ThreadTip { room: room.into(), root: root.into(), event: event.into() });
        while tips.len() > THREAD_TIPS {
            tips.pop_front();
        }
    }

    /// What a reply in `root`'s thread of `room` points at: the newest message answered
    /// there, or the root.
    pub(super) fn thread_tip(&self, room: &str, root: &str) -> String {
        let tip = self.state.thread_tips.iter().rev().find(|t| t.room == room && t.root == root);
        tip.map_or_else(|| root.to_string(), |t| t.event.clone())
    }
}
