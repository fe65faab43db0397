//! The session registry: key → session (agent, delivery target, times). Host-owned: adapters
//! reach it only through the host handle, so a reload never loses or re-keys a session.
//!
//! Keys follow `agent:<agent>:<channel instance>:<channel|group|dm>:<peer>[:thread:<root>]`
//! (ARCHITECTURE.md §5). [`DurableSessions`] is the gateway's registry: a cache over the
//! [`Store`], so a restart keeps every session; adapters see the same handle either way.
//! The key grammar (escaping, parsing, safe prefixes) is `switchboard_plugin_api::key`'s,
//! shared with adapters; it is re-exported here.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

pub use switchboard_plugin_api::key::{escape_key_part, session_key, session_key_prefix, KeyError, SessionKey};

use crate::store::{Store, StoreError, StoreWriter};

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
    /// The session under `key` if it is in memory; never reads the store. `None` says
    /// nothing about the store: [`Self::open`] may still find it there.
    fn in_memory(&self, key: &str) -> Option<Session> {
        self.get(key)
    }
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

/// The registry backed by the store, which is the truth: a bounded cache (least recently used
/// sessions leave it) over the [`Store`]. A miss reads the store on the registry's own read
/// connection (under WAL it waits neither for the writer nor for its lock). A new session
/// goes to the [`StoreWriter`] without waiting, ahead of the turns that refer to it, and
/// stays pinned in the cache until it is stored, so no miss can lose it meanwhile.
/// `last_active` reaches the store with each finished turn.
pub struct DurableSessions {
    writer: Arc<StoreWriter>,
    /// Shared with the writer thread, which unpins a session once it is stored.
    cache: Arc<Mutex<Cache>>,
}

/// What the registry keeps unless told otherwise (`gateway.session_cache_capacity`).
pub const DEFAULT_SESSION_CACHE_CAPACITY: usize = 50_000;

struct Cache {
    entries: HashMap<String, Entry>,
    /// The stored entries by last use, least recent first: what eviction takes. Unstored
    /// (pinned) entries are not in it.
    by_use: BTreeMap<u64, String>,
    /// The last use handed out.
    clock: u64,
    capacity: usize,
    /// Sessions stored or on their way: what `len` reports without reading the store.
    total: usize,
    /// Entries evicted so far: a miss that found nothing in the store checks that nothing
    /// left the cache while it read.
    evictions: u64,
}

struct Entry {
    session: Session,
    used: u64,
    /// In the store (evictable); `false` while its insert is queued, or when it failed.
    stored: bool,
}

impl Cache {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The cached session under `key`, now the most recently used.
    fn hit(&mut self, key: &str) -> Option<Session> {
        let now = self.tick();
        let entry = self.entries.get_mut(key)?;
        if entry.stored {
            if let Some(key) = self.by_use.remove(&entry.used) {
                self.by_use.insert(now, key);
            }
        }
        entry.used = now;
        Some(entry.session.clone())
    }

    /// Cache `session`, read from the store (a hit on an entry that came meanwhile wins).
    fn insert_stored(&mut self, session: Session) -> Session {
        if let Some(cached) = self.hit(&session.key) {
            return cached;
        }
        let used = self.tick();
        self.by_use.insert(used, session.key.clone());
        self.entries.insert(session.key.clone(), Entry { session: session.clone(), used, stored: true });
        self.evict();
        session
    }

    /// The session under `key` is stored: from now on it may leave the cache.
    fn stored(&mut self, key: &str) {
        if let Some(entry) = self.entries.get_mut(key).filter(|e| !e.stored) {
            entry.stored = true;
            self.by_use.insert(entry.used, key.to_string());
            self.evict();
        }
    }

    /// Drop the least recently used stored entries beyond the capacity. Pinned entries stay:
    /// they can make the cache exceed its capacity for as long as the writer is behind.
    fn evict(&mut self) {
        while self.entries.len() > self.capacity {
            let Some((_, key)) = self.by_use.pop_first() else { break };
            self.entries.remove(&key);
            self.evictions += 1;
        }
    }
}

impl DurableSessions {
    /// The registry over `store` with a writer of its own and the default capacity (tools and
    /// benchmarks; the gateway shares its writer through [`Self::with_writer`]).
    pub fn load(store: Arc<Store>) -> Result<Self, StoreError> {
        let writer = StoreWriter::start(store, prometheus_client::metrics::histogram::Histogram::new([0.001]));
        Self::with_writer(Arc::new(writer), DEFAULT_SESSION_CACHE_CAPACITY)
    }

    /// The registry over `writer`'s store, keeping at most `capacity` stored sessions in
    /// memory; warmed with the most recently active ones.
    pub fn with_writer(writer: Arc<StoreWriter>, capacity: usize) -> Result<Self, StoreError> {
        let capacity = capacity.max(1);
        let store = writer.store();
        let total = store.session_count()?;
        let mut cache =
            Cache { entries: HashMap::new(), by_use: BTreeMap::new(), clock: 0, capacity, total, evictions: 0 };
        // Least recent first, so that the most recent are the last to leave.
        for session in store.recent_sessions(capacity)?.into_iter().rev() {
            cache.insert_stored(session);
        }
        Ok(Self { writer, cache: Arc::new(Mutex::new(cache)) })
    }

    /// Sessions in memory now (stored ones up to the capacity, plus those not yet stored).
    pub fn cached(&self) -> usize {
        self.cache.lock().unwrap().entries.len()
    }

    fn store(&self) -> &Store {
        self.writer.store()
    }

    /// Create the session under `key` and queue its insert, under the cache's lock: whoever
    /// finds it in the cache finds it after its insert was submitted, so their turns and
    /// batches are stored after it.
    fn create(&self, cache: &mut Cache, key: &str, agent_id: &str, target: &DeliveryTarget) -> Session {
        let now = now_ms();
        let session = Session {
            key: key.to_string(),
            agent_id: agent_id.to_string(),
            target: target.clone(),
            created_at_ms: now,
            last_active_ms: now,
        };
        let used = cache.tick();
        cache.entries.insert(key.to_string(), Entry { session: session.clone(), used, stored: false });
        cache.total += 1;
        let pinned = self.cache.clone();
        let stored_key = key.to_string();
        self.writer.insert_session(session.clone(), move |stored| match stored {
            Ok(()) => pinned.lock().unwrap().stored(&stored_key),
            // It stays pinned: this process keeps it, and it is lost only to a restart.
            Err(e) => tracing::error!(session = %stored_key, "cannot store the new session: {e}"),
        });
        session
    }
}

/// Reads of the store for a miss this many times before the last one is made under the
/// cache's lock (see `DurableSessions::open`).
const MISS_READS: usize = 3;

impl SessionStore for DurableSessions {
    fn in_memory(&self, key: &str) -> Option<Session> {
        self.cache.lock().unwrap().hit(key)
    }

    fn get(&self, key: &str) -> Option<Session> {
        if let Some(session) = self.cache.lock().unwrap().hit(key) {
            return Some(session);
        }
        match self.store().session(key) {
            Ok(found) => found.map(|session| self.cache.lock().unwrap().insert_stored(session)),
            Err(e) => {
                tracing::error!(session = %key, "cannot read the session from the store: {e}");
                None
            }
        }
    }

    fn open(&self, key: &str, agent_id: &str, target: &DeliveryTarget) -> Session {
        for attempt in 1..=MISS_READS {
            let evictions = {
                let mut cache = self.cache.lock().unwrap();
                if let Some(session) = cache.hit(key) {
                    return session;
                }
                if attempt == MISS_READS {
                    // Evictions kept racing the reads: read under the lock, where none can.
                    let found = self.store().session(key);
                    return match found {
                        Ok(Some(session)) => cache.insert_stored(session),
                        Ok(None) => self.create(&mut cache, key, agent_id, target),
                        Err(e) => {
                            tracing::error!(session = %key, "cannot read the session from the store: {e}");
                            self.create(&mut cache, key, agent_id, target)
                        }
                    };
                }
                cache.evictions
            };
            // Not under the lock: other threads' hits go on while this one reads.
            match self.store().session(key) {
                Ok(Some(session)) => return self.cache.lock().unwrap().insert_stored(session),
                Ok(None) => {
                    let mut cache = self.cache.lock().unwrap();
                    if let Some(session) = cache.hit(key) {
                        return session;
                    }
                    // An eviction meanwhile may have been this very session, created and
                    // stored by another thread after this one looked: read again.
                    if cache.evictions == evictions {
                        return self.create(&mut cache, key, agent_id, target);
                    }
                }
                Err(e) => {
                    // Without the store there is no telling; the insert, if it is there
                    // after all, leaves the stored one as it is.
                    tracing::error!(session = %key, "cannot read the session from the store: {e}");
                    let mut cache = self.cache.lock().unwrap();
                    if let Some(session) = cache.hit(key) {
                        return session;
                    }
                    return self.create(&mut cache, key, agent_id, target);
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    fn touch(&self, key: &str, now_ms: i64) {
        let mut cache = self.cache.lock().unwrap();
        if let Some(entry) = cache.entries.get_mut(key) {
            entry.session.last_active_ms = now_ms;
        }
    }

    fn list(&self, channel_instance: &str, prefix: &str) -> Vec<Session> {
        let matches = |s: &Session| s.target.channel_instance == channel_instance && s.key.starts_with(prefix);
        // The unstored ones first: one stored after this look is in the store's answer.
        let unstored: Vec<Session> = {
            let cache = self.cache.lock().unwrap();
            cache.entries.values().filter(|e| !e.stored && matches(&e.session)).map(|e| e.session.clone()).collect()
        };
        let stored = self.store().sessions_of(channel_instance, prefix).unwrap_or_else(|e| {
            tracing::error!(
                channel = channel_instance,
                "cannot list the sessions in the store; listing those in memory: {e}"
            );
            let cache = self.cache.lock().unwrap();
            cache.entries.values().filter(|e| matches(&e.session)).map(|e| e.session.clone()).collect()
        });
        let mut found: BTreeMap<String, Session> =
            stored.into_iter().chain(unstored).map(|s| (s.key.clone(), s)).collect();
        // The cache's copies are the newer (`last_active` is touched in memory first).
        let cache = self.cache.lock().unwrap();
        for (key, session) in found.iter_mut() {
            if let Some(entry) = cache.entries.get(key) {
                *session = entry.session.clone();
            }
        }
        found.into_values().collect()
    }

    fn len(&self) -> usize {
        self.cache.lock().unwrap().total
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use switchboard_plugin_api::PeerKind;

    use super::*;

    #[test]
    fn a_prefix_at_a_part_boundary_lists_one_peer_only() {
        let store = MemorySessions::default();
        let target = DeliveryTarget {
            channel_instance: "matrix".into(),
            conversation_id: "!dm:example.org".into(),
            thread_root_id: String::new(),
        };
        let mut keys = Vec::new();
        for peer in ["@alice:example.org", "@alice:example.org.evil"] {
            for root in [None, Some("$r1:example.org")] {
                let key = session_key("main", "matrix", PeerKind::Dm, peer, root);
                store.open(&key, "main", &target);
                keys.push(key);
            }
        }
        let listed = |prefix: &str| store.list("matrix", prefix).into_iter().map(|s| s.key).collect::<Vec<_>>();

        // The bare key of a peer is no safe prefix: it is a prefix of the longer id's keys too.
        let alice = session_key("main", "matrix", PeerKind::Dm, "@alice:example.org", None);
        assert_eq!(listed(&alice).len(), 4);
        // Ended at a part boundary, it lists Alice's threads and nobody else's.
        let prefix = session_key_prefix("main", "matrix", PeerKind::Dm, Some("@alice:example.org"));
        assert_eq!(prefix, "agent:main:matrix:dm:@alice%3Aexample.org:");
        assert_eq!(listed(&prefix), vec![keys[1].clone()]);
        // Her session without a thread is its exact key.
        assert_eq!(store.get(&alice).map(|s| s.key), Some(keys[0].clone()));
        // One level up: every DM session of the agent on the instance.
        let prefix = session_key_prefix("main", "matrix", PeerKind::Dm, None);
        assert_eq!(prefix, "agent:main:matrix:dm:");
        assert_eq!(listed(&prefix).len(), 4);
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

#[cfg(test)]
mod durable_tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{BatchRecord, Durability, FinishedTurn, Turn};

    fn target(conversation: &str) -> DeliveryTarget {
        DeliveryTarget {
            channel_instance: "mm".into(),
            conversation_id: conversation.into(),
            thread_root_id: "".into(),
        }
    }

    fn stored_session(key: &str, at: i64) -> Session {
        Session { key: key.into(), agent_id: "main".into(), target: target(key), created_at_ms: at, last_active_ms: at }
    }

    /// A registry over a fresh database (a file: the registry reads on its own connection).
    fn registry(capacity: usize, stored: &[Session]) -> (tempfile::TempDir, Arc<StoreWriter>, DurableSessions) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), Durability::Normal).unwrap());
        store.insert_sessions(stored).unwrap();
        let writer =
            Arc::new(StoreWriter::start(store, prometheus_client::metrics::histogram::Histogram::new([0.001])));
        let sessions = DurableSessions::with_writer(writer.clone(), capacity).unwrap();
        (dir, writer, sessions)
    }

    /// Wait until every write submitted so far is stored and answered.
    async fn writes_done(writer: &StoreWriter) {
        writer.adapter_state("none").await.unwrap();
    }

    #[tokio::test]
    async fn the_cache_keeps_at_most_its_capacity() {
        let stored: Vec<Session> = (0..10).map(|i| stored_session(&format!("k{i}"), i)).collect();
        let (_dir, writer, sessions) = registry(3, &stored);
        assert_eq!((sessions.cached(), sessions.len()), (3, 10), "warmed with the most recent");
        for i in 0..10 {
            sessions.open(&format!("n{i}"), "main", &target("c"));
            sessions.get(&format!("k{i}")).unwrap();
        }
        writes_done(&writer).await;
        assert_eq!(sessions.len(), 20);
        assert!(sessions.cached() <= 3, "{} cached", sessions.cached());
    }

    #[tokio::test]
    async fn evicted_sessions_come_back_unchanged_from_the_store() {
        let (_dir, writer, sessions) = registry(2, &[]);
        let first: Vec<Session> = (0..6)
            .map(|i| sessions.open(&format!("agent:main:mm:channel:c{i}"), "main", &target(&format!("c{i}"))))
            .collect();
        writes_done(&writer).await;
        for session in &first {
            assert_eq!(sessions.get(&session.key).as_ref(), Some(session));
            let other = DeliveryTarget { conversation_id: "elsewhere".into(), ..session.target.clone() };
            assert_eq!(&sessions.open(&session.key, "ops", &other), session, "the first target stays");
        }
        assert_eq!(sessions.len(), 6);
        assert!(sessions.cached() <= 2);
        assert_eq!(sessions.list("mm", "agent:main:mm:"), first);
        // What routing asks first, on an async worker: memory only, no store read.
        let evicted = first.iter().filter(|s| sessions.in_memory(&s.key).is_none()).count();
        assert!(evicted >= 4, "only what fits is in memory ({evicted} of 6 are not)");
    }

    #[tokio::test]
    async fn a_fresh_session_survives_eviction_pressure_until_stored() {
        let stored: Vec<Session> =
            (0..20).map(|i| stored_session(&format!("agent:main:mm:channel:s{i:02}"), i)).collect();
        let (_dir, writer, sessions) = registry(3, &stored);
        let held = writer.store().hold_writer();
        let fresh = sessions.open("agent:main:mm:dm:u1", "main", &target("dm1"));
        // Stored sessions read back one after another push everything else out.
        for session in &stored {
            assert_eq!(sessions.get(&session.key).as_ref(), Some(session));
        }
        assert_eq!(sessions.get(&fresh.key), Some(fresh.clone()), "not stored yet, and still there");
        let listed = sessions.list("mm", "agent:main:mm:");
        assert_eq!(listed.len(), 21);
        assert!(listed.contains(&fresh));
        assert_eq!(sessions.list("mm", "agent:main:mm:dm:"), vec![fresh.clone()]);
        drop(held);
        writes_done(&writer).await;
        assert_eq!(writer.store().session(&fresh.key).unwrap(), Some(fresh.clone()));
        for session in &stored {
            sessions.get(&session.key);
        }
        assert!(sessions.cached() <= 3, "stored now, it may leave: {} cached", sessions.cached());
        assert_eq!(sessions.get(&fresh.key), Some(fresh));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_session_is_stored_before_the_turn_submitted_after_it() {
        let (_dir, writer, sessions) = registry(10, &[]);
        let ids = writer.commit_batch("mm", BatchRecord::default(), 1).await.unwrap();
        assert!(ids.is_empty());
        // Held: the session and the turn wait in the writer's queue and go in one group.
        let held = writer.store().hold_writer();
        let session = sessions.open("agent:main:mm:channel:c1", "main", &target("c1"));
        let turn = writer.finish(FinishedTurn {
            inbound_id: 0,
            session_key: session.key.clone(),
            transcript: vec![Turn { role: "user".into(), content: "hi".into() }],
            message_id: "p1".into(),
            reply: None,
            finished_at_ms: session.created_at_ms + 60_000,
        });
        drop(held);
        turn.await.unwrap();
        // Had the turn gone first, its update would have found no row to touch.
        let stored = writer.store().session(&session.key).unwrap().unwrap();
        assert_eq!(stored.last_active_ms, session.created_at_ms + 60_000);
    }

    #[test]
    fn opening_a_session_does_not_wait_for_the_writer() {
        let (_dir, writer, sessions) = registry(10, &[]);
        let sessions = Arc::new(sessions);
        let _held = writer.store().hold_writer();
        let (opened, done) = std::sync::mpsc::channel();
        let opening = sessions.clone();
        std::thread::spawn(move || {
            let _ = opened.send(opening.open("agent:main:mm:channel:c1", "main", &target("c1")));
        });
        let session = done.recv_timeout(Duration::from_secs(5)).expect("open returns while the writer is held");
        assert_eq!(sessions.get(&session.key), Some(session.clone()));
        assert_eq!(writer.store().session(&session.key).unwrap(), None, "queued, not stored");
        assert_eq!(sessions.len(), 1);
    }
}
