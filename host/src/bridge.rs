//! The host handle an adapter generation holds: the session registry, secrets, the clock and
//! the log bridge (a plugin's own `tracing` goes nowhere, ARCHITECTURE.md §3.8).
//! Its methods run host code on the apartment thread; none waits for the store's writer or the
//! disk's sync: a new session is queued to the writer thread and served from memory meanwhile.
//! A session the registry's cache does not hold (and a listing) is read on the registry's own
//! read connection, which under WAL waits for no writer.

use std::sync::Arc;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, ROption, RStr, RString, RVec},
};
use switchboard_plugin_api::{HostApi, HostApi_TO, HostHandle, LogLevel, OpenResource, ReplyTarget, SessionInfo};

use crate::session::{now_ms, DeliveryTarget, Session, SessionStore};

pub struct HostBridge {
    pub channel_instance: String,
    pub generation: u64,
    pub sessions: Arc<dyn SessionStore>,
    /// What the generation inherits (listed at its handover; empty when cold).
    pub handed_over: Vec<OpenResource>,
}

impl HostBridge {
    pub fn into_handle(self) -> HostHandle {
        HostApi_TO::from_ptr(RArc::new(self), TD_Opaque)
    }
}

/// Re-emit an adapter's log record under its channel instance and generation.
pub fn emit_adapter_log(channel: &str, generation: u64, level: LogLevel, message: &str) {
    match level {
        LogLevel::Error => tracing::error!(target: "adapter", channel, generation, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "adapter", channel, generation, "{message}"),
        LogLevel::Info => tracing::info!(target: "adapter", channel, generation, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "adapter", channel, generation, "{message}"),
        LogLevel::Trace => tracing::trace!(target: "adapter", channel, generation, "{message}"),
    }
}

fn info(session: Session) -> SessionInfo {
    SessionInfo {
        key: session.key.into(),
        agent_id: session.agent_id.into(),
        channel_instance: session.target.channel_instance.into(),
        target: ReplyTarget::new(&session.target.conversation_id, &session.target.thread_root_id),
        created_at_ms: session.created_at_ms,
        last_active_ms: session.last_active_ms,
    }
}

impl HostApi for HostBridge {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        emit_adapter_log(&self.channel_instance, self.generation, level, message.as_str());
    }

    fn secret(&self, name: RStr<'_>) -> ROption<RString> {
        std::env::var(name.as_str()).ok().filter(|v| !v.is_empty()).map(RString::from).into()
    }

    fn now_ms(&self) -> i64 {
        now_ms()
    }

    fn session(&self, key: RStr<'_>) -> ROption<SessionInfo> {
        self.sessions.get(key.as_str()).filter(|s| s.target.channel_instance == self.channel_instance).map(info).into()
    }

    fn sessions(&self, key_prefix: RStr<'_>) -> RVec<SessionInfo> {
        self.sessions.list(&self.channel_instance, key_prefix.as_str()).into_iter().map(info).collect()
    }

    fn open_session(&self, key: RStr<'_>, agent_id: RStr<'_>, target: ReplyTarget) -> SessionInfo {
        let target = DeliveryTarget {
            channel_instance: self.channel_instance.clone(),
            conversation_id: target.conversation_id.to_string(),
            thread_root_id: target.thread_root_id.to_string(),
        };
        info(self.sessions.open(key.as_str(), agent_id.as_str(), &target))
    }

    fn handed_over(&self) -> ROption<RVec<OpenResource>> {
        ROption::RSome(self.handed_over.iter().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchboard_plugin_api::{HostApi, ReplyTarget};

    use super::*;
    use crate::{
        session::DurableSessions,
        store::{Durability, Store, StoreWriter},
    };

    #[test]
    fn open_session_on_the_apartment_does_not_wait_for_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Durability::Full).unwrap());
        let writer =
            Arc::new(StoreWriter::start(store.clone(), prometheus_client::metrics::histogram::Histogram::new([0.001])));
        let sessions: Arc<dyn SessionStore> = Arc::new(DurableSessions::with_writer(writer, 100).unwrap());
        let bridge = HostBridge { channel_instance: "mm".into(), generation: 1, sessions, handed_over: Vec::new() };
        // The writer's connection held, as by a commit stuck on the disk.
        let held = store.hold_writer();
        let (opened, done) = std::sync::mpsc::channel();
        let apartment = std::thread::spawn(move || {
            let key = "agent:main:mm:channel:c1";
            let info = bridge.open_session(key.into(), "main".into(), ReplyTarget::new("c1", ""));
            let found = bridge.session(key.into()).into_option().map(|s| s.key.to_string());
            let listed = bridge.sessions("agent:main:".into()).len();
            let _ = opened.send((info.key.to_string(), found, listed));
        });
        let (key, found, listed) =
            done.recv_timeout(Duration::from_secs(5)).expect("the host calls return while the writer is held");
        assert_eq!(found.as_deref(), Some(key.as_str()));
        assert_eq!(listed, 1, "listed before it is stored");
        assert_eq!(store.session(&key).unwrap(), None);
        drop(held);
        apartment.join().unwrap();
    }
}
