//! What the adapter knows of each room, from the sync's state events, member counts and the
//! `m.direct` account data; invites and auto-join.
//!
//! A room is a DM (`PeerKind::Dm`, its peer id the room id, so replies go to the room) when
//! `m.direct` lists it, when the bot joined it from an invite marked `is_direct`, or when it
//! is not public and has exactly two joined members. Otherwise it is a `Channel` when its join
//! rule is `public`, else a `Group`. Synapse does not write `m.direct` for the invitee, so the
//! member count is what tells most DMs.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_plugin_api::{Header, LogLevel, PeerKind};

use super::{
    requests::{MatrixError, Pending},
    sync::events,
    Adapter, TimerPurpose,
};
use crate::settings::Policy;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Room {
    /// Join rule `public`.
    #[serde(default)]
    public: bool,
    /// Joined from an invite marked `is_direct`.
    #[serde(default)]
    direct_invite: bool,
    /// Listed in the bot's `m.direct` account data.
    #[serde(default)]
    in_m_direct: bool,
    /// `m.joined_member_count` (0: not known).
    #[serde(default)]
    joined_members: u64,
    /// The canonical alias ("" when none).
    #[serde(default)]
    alias: String,
}

impl Room {
    pub(super) fn kind(&self) -> PeerKind {
        if self.direct_invite || self.in_m_direct || (!self.public && self.joined_members == 2) {
            PeerKind::Dm
        } else if self.public {
            PeerKind::Channel
        } else {
            PeerKind::Group
        }
    }
}

impl Adapter {
    /// A joined room's state section and member summary.
    pub(super) fn learn_room(&mut self, room_id: &str, room: &Value) {
        self.state.joining.remove(room_id);
        let direct_invite = self.state.direct_invites.remove(room_id);
        let known = self.state.rooms.entry(room_id.to_string()).or_default();
        known.direct_invite |= direct_invite;
        if let Some(count) = room["summary"]["m.joined_member_count"].as_u64() {
            known.joined_members = count;
        }
        for event in events(&room["state"]) {
            self.learn_state_event(room_id, event);
        }
    }

    /// A state event (from a state section or a timeline).
    pub(super) fn learn_state_event(&mut self, room_id: &str, event: &Value) {
        let Some(room) = self.state.rooms.get_mut(room_id) else { return };
        match event["type"].as_str() {
            Some("m.room.join_rules") => room.public = event["content"]["join_rule"] == "public",
            Some("m.room.canonical_alias") => {
                room.alias = event["content"]["alias"].as_str().unwrap_or_default().to_string();
            }
            _ => {}
        }
    }

    /// `m.direct` lists the DM rooms by the other user; it is sent whole when it changes.
    pub(super) fn learn_direct_rooms(&mut self, answer: &Value) {
        let Some(direct) = events(&answer["account_data"]).find(|e| e["type"] == "m.direct") else { return };
        let listed: Vec<&str> = direct["content"]
            .as_object()
            .into_iter()
            .flat_map(|users| users.values())
            .filter_map(Value::as_array)
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for (room_id, room) in self.state.rooms.iter_mut() {
            room.in_m_direct = listed.contains(&room_id.as_str());
        }
    }

    pub(super) fn room_kind(&self, room_id: &str) -> PeerKind {
        self.state.rooms.get(room_id).map_or(PeerKind::Group, Room::kind)
    }

    /// Whether the `rooms` allowlist lets `room_id` in (by id, by a resolved alias, or by the
    /// room's canonical alias).
    pub(super) fn room_listed(&self, room_id: &str, alias: Option<&str>) -> bool {
        let alias = alias
            .filter(|a| !a.is_empty())
            .or_else(|| self.state.rooms.get(room_id).map(|r| r.alias.as_str()).filter(|a| !a.is_empty()));
        self.settings.rooms.is_empty()
            || self.settings.rooms.iter().any(|listed| {
                listed == room_id
                    || Some(listed.as_str()) == alias
                    || self.state.aliases.get(listed).is_some_and(|id| id == room_id)
            })
    }

    /// Invites in a sync answer: joined when `auto_join` and the policies allow the inviter
    /// (and, for a room that is not a DM, the `rooms` allowlist allows the room).
    pub(super) fn invited(&mut self, answer: &Value) {
        let Some(invites) = answer["rooms"]["invite"].as_object() else { return };
        let user_id = self.settings.user_id.clone();
        for (room_id, invite) in invites {
            let state: Vec<&Value> = events(&invite["invite_state"]).collect();
            let own = state.iter().find(|e| e["type"] == "m.room.member" && e["state_key"] == user_id.as_str());
            let Some(own) = own.filter(|e| e["content"]["membership"] == "invite") else { continue };
            let inviter = own["sender"].as_str().unwrap_or_default();
            let direct = own["content"]["is_direct"] == true;
            let alias = state
                .iter()
                .find(|e| e["type"] == "m.room.canonical_alias")
                .and_then(|e| e["content"]["alias"].as_str());
            let refusal = if !self.settings.auto_join {
                Some("auto_join is off")
            } else if direct {
                self.policy_refusal(self.settings.dm_policy, inviter)
            } else if !self.room_listed(room_id, alias) {
                Some("the room is not in the rooms allowlist")
            } else {
                self.policy_refusal(self.settings.group_policy, inviter)
            };
            let what = if direct { "a direct chat" } else { "a room" };
            match refusal {
                Some(reason) => self
                    .log(LogLevel::Info, format!("invite from {inviter} to {what} {room_id} not accepted: {reason}")),
                None => {
                    self.log(LogLevel::Info, format!("accepting the invite from {inviter} to {what} {room_id}"));
                    self.state.joining.insert(room_id.clone());
                    if direct {
                        self.state.direct_invites.insert(room_id.clone());
                    }
                    self.request(Pending::Join(room_id.clone()));
                }
            }
        }
    }

    /// Rooms the bot left or was removed from.
    pub(super) fn left(&mut self, answer: &Value) {
        let Some(left) = answer["rooms"]["leave"].as_object() else { return };
        for room_id in left.keys() {
            if self.state.rooms.remove(room_id).is_some() {
                self.log(LogLevel::Info, format!("no longer in room {room_id}"));
            }
            self.state.typing.remove(room_id);
        }
    }

    /// Why `policy` does not let `sender` in, if it does not.
    pub(super) fn policy_refusal(&self, policy: Policy, sender: &str) -> Option<&'static str> {
        match policy {
            Policy::Open => None,
            Policy::Allowlist if self.settings.allowed(sender) => None,
            Policy::Allowlist => Some("the sender is not in allow_from"),
            Policy::Disabled => Some("the policy is disabled"),
        }
    }

    pub(super) fn join_answered(&mut self, room: String, status: u16, headers: &[Header], body: &str) {
        if (200..300).contains(&status) {
            self.log(LogLevel::Info, format!("joined {room}"));
            return;
        }
        let error = MatrixError::parse(headers, body);
        if matches!(status, 403 | 404) {
            self.state.joining.remove(&room);
            self.state.direct_invites.remove(&room);
            let message = format!("joining {room} refused ({status} {}); the invite may be withdrawn", error.errcode);
            return self.log(LogLevel::Warn, message);
        }
        if error.token_refused(status) {
            self.token_refused("join answered 401");
        }
        let what = if status == 0 {
            format!("joining {room} failed ({body})")
        } else {
            format!("joining {room} answered {status} {}", error.errcode)
        };
        let pending = Pending::Join(room.clone());
        let retrying = match error.retry_after_ms {
            Some(wait) if status == 429 => {
                self.set_timer(TimerPurpose::Join(room.clone()), wait);
                true
            }
            _ => self.retry_later(&pending, TimerPurpose::Join(room.clone()), what),
        };
        if !retrying {
            self.state.joining.remove(&room);
            self.state.direct_invites.remove(&room);
        }
    }
}
