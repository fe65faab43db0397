//! Whether a post is answered, and as what inbound message.
//!
//! Not answered: the bot's own posts (the server echoes them), posts of other types than a
//! user's (`system_*` and the like; `/me` posts, type `me`, are a user's), deleted posts,
//! posts by bot accounts or webhooks (`props.from_bot` / `props.from_webhook`, app/post.go)
//! unless `allow_bots` — two bots answering each other never stop —, and what the chatmode
//! and the policies leave out. In `oncall` only an explicit `@bot` (or a configured mention
//! word) counts: the server also puts the bot into `mentions` for `@channel`, `@all`, `@here`
//! and the bot's mention keys (app/notification.go), which would make it answer every
//! announcement.

use serde_json::Value;
use switchboard_plugin_api::{Action, InboundMessage, LogLevel, PeerKind};

use super::{Adapter, WirePost};
use crate::{
    settings::{ChatMode, Policy},
    text,
};

impl Adapter {
    pub(super) fn posted(&mut self, data: &Value) {
        let Some(post) = data["post"].as_str().and_then(|p| serde_json::from_str::<WirePost>(p).ok()) else {
            self.log(LogLevel::Warn, "posted event without a readable post".into());
            return;
        };
        let WirePost { id: post_id, user_id, channel_id, root_id, message, kind, create_at, delete_at, props } = post;
        let (post_id, user_id, channel_id, root_id, message, kind) = (
            post_id.unwrap_or_default(),
            user_id.unwrap_or_default(),
            channel_id.unwrap_or_default(),
            root_id.unwrap_or_default(),
            message.unwrap_or_default(),
            kind.unwrap_or_default(),
        );
        let create_at = create_at.and_then(|n| n.as_i64()).unwrap_or_default();
        if post_id.is_empty() || channel_id.is_empty() {
            return;
        }
        self.remember(&channel_id, data, create_at, &user_id);
        if user_id == self.state.bot_id {
            return;
        }
        if !(kind.is_empty() || kind == "me") {
            self.log(LogLevel::Debug, format!("post {post_id} is of type {kind}; not answered"));
            return;
        }
        if delete_at.and_then(|n| n.as_i64()).unwrap_or_default() != 0 {
            return;
        }
        if self.recent_index.contains(&post_id) {
            self.log(LogLevel::Debug, format!("post {post_id} seen before; not answered again"));
            return;
        }
        self.remember_post(&post_id);
        let props = props.unwrap_or_default();
        if props.by_bot_or_webhook() && !self.settings.allow_bots {
            self.log(
                LogLevel::Debug,
                format!("post {post_id} is by a bot or a webhook; not answered (allow_bots is off)"),
            );
            return;
        }
        let sender_name = props
            .override_username()
            .unwrap_or_else(|| data["sender_name"].as_str().unwrap_or_default())
            .trim_start_matches('@')
            .to_string();
        let channel_type = data["channel_type"].as_str().unwrap_or("O");
        let mentioned = text::mentions(&message, &self.state.bot_username)
            || self.settings.mention_words.iter().any(|word| text::contains_word(&message, word));
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

    pub(super) fn remember(&mut self, channel_id: &str, data: &Value, create_at: i64, user_id: &str) {
        self.state.server_clock_ms = self.state.server_clock_ms.max(create_at);
        let seen = self.state.seen.entry(channel_id.to_string()).or_default();
        if let Some(kind) = data["channel_type"].as_str().filter(|k| !k.is_empty()) {
            seen.channel_type = kind.to_string();
        }
        if let Some(name) = data["channel_name"].as_str().filter(|n| !n.is_empty()) {
            seen.channel_name = name.to_string();
        }
        seen.last_post_at = seen.last_post_at.max(create_at);
        if let Some(name) = data["sender_name"].as_str().filter(|n| !n.is_empty()) {
            if self.state.usernames.get(user_id).is_none_or(|known| known != name.trim_start_matches('@')) {
                self.learn_username(user_id, name);
            }
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
}
