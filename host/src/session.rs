//! The session registry: key → session (agent, delivery target, times). Host-owned: adapters
//! reach it only through the host handle, so a reload never loses or re-keys a session.
//!
//! Keys follow `agent:<agent>:<channel instance>:<channel|group|dm>:<peer>[:thread:<root>]`
//! (ARCHITECTURE.md §5). [`DurableSessions`] is the gateway's registry: a cache over the
//! [`Store`], so a restart keeps every session; adapters see the same handle either way.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use switchboard_plugin_api::PeerKind;

use crate::store::{Store, StoreError};

/// Where a session's replies go: a channel instance and a conversation on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeliveryTarget {
    pub channel_instance: String,
    pub conversation_id: String,
    pub thread_root_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub key: String,
    pub agent_id: String,
    pub target: DeliveryTarget,
    pub created_at_ms: i64,
    pub last_active_ms: i64,
}

pub trait SessionStore: Send + Sync + 'static {
    fn get(&self, key: &str) -> Option<Session>;
    /// The session under `key`, created for `agent_id` and `target` when it does not exist.
    fn open(&self, key: &str, agent_id: &str, target: &DeliveryTarget) -> Session;
    fn touch(&self, key: &str, now_ms: i64);
    /// Sessions of one channel instance whose key starts with `prefix`.
    fn list(&self, channel_instance: &str, prefix: &str) -> Vec<Session>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The in-memory registry.
#[derive(Default)]
pub struct MemorySessions {
    sessions: RwLock<HashMap<String, Session>>,
}

impl SessionStore for MemorySessions {
    fn get(&self, key: &str) -> Option<Session> {
        self.sessions.read().unwrap().get(key).cloned()
    }

    fn open(&self, key: &str, agent_id: &str, target: &DeliveryTarget) -> Session {
        if let Some(session) = self.get(key) {
            return session;
        }
        let now = now_ms();
        self.sessions
            .write()
            .unwrap()
            .entry(key.to_string())
            .or_insert_with(|| Session {
                key: key.to_string(),
                agent_id: agent_id.to_string(),
                target: target.clone(),
                created_at_ms: now,
                last_active_ms: now,
            })
            .clone()
    }

    fn touch(&self, key: &str, now_ms: i64) {
        if let Some(session) = self.sessions.write().unwrap().get_mut(key) {
            session.last_active_ms = now_ms;
        }
    }

    fn list(&self, channel_instance: &str, prefix: &str) -> Vec<Session> {
        let sessions = self.sessions.read().unwrap();
        let mut found: Vec<Session> = sessions
            .values()
            .filter(|s| s.target.channel_instance == channel_instance && s.key.starts_with(prefix))
            .cloned()
            .collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        found
    }

    fn len(&self) -> usize {
        self.sessions.read().unwrap().len()
    }
}

/// The registry backed by the store: reads come from memory, a new session is written
/// through before it is handed out. `last_active` reaches the store with each finished turn.
pub struct DurableSessions {
    cache: MemorySessions,
    store: Arc<Store>,
}

impl DurableSessions {
    pub fn load(store: Arc<Store>) -> Result<Self, StoreError> {
        let cache = MemorySessions::default();
        {
            let mut sessions = cache.sessions.write().unwrap();
            for session in store.sessions()? {
                sessions.insert(session.key.clone(), session);
            }
        }
        Ok(Self { cache, store })
    }
}

impl SessionStore for DurableSessions {
    fn get(&self, key: &str) -> Option<Session> {
        self.cache.get(key)
    }

    fn open(&self, key: &str, agent_id: &str, target: &DeliveryTarget) -> Session {
        if let Some(session) = self.cache.get(key) {
            return session;
        }
        let session = self.cache.open(key, agent_id, target);
        if let Err(e) = self.store.insert_session(&session) {
            // The session still works for this process; the next turn's commit retries nothing,
            // so say so loudly.
            tracing::error!(session = %key, "cannot store the new session: {e}");
        }
        session
    }

    fn touch(&self, key: &str, now_ms: i64) {
        self.cache.touch(key, now_ms);
    }

    fn list(&self, channel_instance: &str, prefix: &str) -> Vec<Session> {
        self.cache.list(channel_instance, prefix)
    }

    fn len(&self) -> usize {
        self.cache.len()
    }
}

/// The session key for a conversation. In DMs the peer is the person, so a DM session follows
/// them; elsewhere it is the conversation.
pub fn session_key(
    agent: &str,
    channel_instance: &str,
    kind: PeerKind,
    peer: &str,
    thread_root: Option<&str>,
) -> String {
    let mut key = format!("agent:{agent}:{channel_instance}:{}:{peer}", kind.as_str());
    if let Some(root) = thread_root.filter(|r| !r.is_empty()) {
        key.push_str(":thread:");
        key.push_str(root);
    }
    key
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_grammar() {
        assert_eq!(
            session_key("main", "mattermost", PeerKind::Channel, "c1", None),
            "agent:main:mattermost:channel:c1"
        );
        assert_eq!(session_key("main", "mm", PeerKind::Group, "g1", Some("")), "agent:main:mm:group:g1");
        assert_eq!(session_key("ops", "mm", PeerKind::Dm, "u1", Some("r1")), "agent:ops:mm:dm:u1:thread:r1");
    }

    #[test]
    fn open_is_get_or_create_and_keeps_the_first_target() {
        let store = MemorySessions::default();
        let target = DeliveryTarget {
            channel_instance: "mm".into(),
            conversation_id: "c1".into(),
            thread_root_id: String::new(),
        };
        let first = store.open("k", "main", &target);
        let other = DeliveryTarget { conversation_id: "c2".into(), ..target.clone() };
        let again = store.open("k", "other", &other);
        assert_eq!(first, again);
        assert_eq!(store.len(), 1);
        assert_eq!(store.list("mm", "k").len(), 1);
        assert!(store.list("other", "k").is_empty());
    }
}
