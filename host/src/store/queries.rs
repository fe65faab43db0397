//! The reads: sessions, transcripts, pending work, the delivery queue, dead letters, counts.
//!
//! Each query is a function of a connection, so that it can run wherever its caller's
//! ordering needs: on the writer's connection in order with the writes
//! ([`super::StoreWriter`]'s ordered reads), on a pooled read connection from a blocking
//! thread (the `*_async` methods here), or on the sessions' own read connection (the session
//! registry's cache misses). Under WAL a read connection sees the last commit and neither
//! waits for the writer nor holds it up.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex},
};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{DeadLetter, QueuedReply, Store, StoreCounts, StoreError, StoredDeadLetter, Turn};
use crate::{
    apartment::Inbound,
    session::{DeliveryTarget, Session},
};

/// Read connections the async reads share at most: more would only queue inside SQLite's
/// page cache on the same two cores, and each open connection keeps its own cache.
const POOLED_READERS: usize = 4;

/// Read connections on the database file, opened when first needed and kept for reuse.
pub(super) struct ReadPool {
    path: PathBuf,
    idle: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    connections: Vec<Connection>,
    /// Connections open, idle or lent out.
    open: usize,
}

impl ReadPool {
    pub(super) fn new(path: &Path) -> ReadPool {
        ReadPool {
            path: path.to_path_buf(),
            idle: Mutex::new(PoolState { connections: Vec::new(), open: 0 }),
            returned: Condvar::new(),
        }
    }

    /// Run `read` on a pooled connection, waiting for one when all are lent out.
    fn with<T>(&self, read: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let connection = {
            let mut state = self.idle.lock().unwrap();
            loop {
                if let Some(connection) = state.connections.pop() {
                    break connection;
                }
                if state.open < POOLED_READERS {
                    state.open += 1;
                    drop(state);
                    match open_reader(&self.path) {
                        Ok(connection) => break connection,
                        Err(e) => {
                            self.idle.lock().unwrap().open -= 1;
                            self.returned.notify_one();
                            return Err(e);
                        }
                    }
                }
                state = self.returned.wait(state).unwrap();
            }
        };
        let outcome = read(&connection);
        self.idle.lock().unwrap().connections.push(connection);
        self.returned.notify_one();
        outcome
    }
}

/// A connection that only reads (`query_only`: a bug cannot make it write behind the
/// writer's back, and it never takes the write lock).
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)
        .map_err(|e| StoreError::Open { path: path.to_path_buf(), reason: e.to_string() })?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    connection.pragma_update(None, "query_only", true)?;
    Ok(connection)
}

impl Store {
    /// Run `read` on a read connection (the writer's own for a store in memory, which has no
    /// other), on the calling thread.
    fn read<T>(&self, read: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.readers {
            Some(pool) => pool.with(read),
            None => read(&self.connection.lock().unwrap()),
        }
    }

    /// Run `read` on a read connection from a blocking thread: an async caller's worker does
    /// not wait for SQLite or the disk.
    async fn read_off_thread<T: Send + 'static>(
        self: &Arc<Self>,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read(read)).await.map_err(|_| StoreError::ReadCancelled)?
    }

    /// The session registry's reads (a cache miss, a listing): on a connection of their own,
    /// neither the writer's nor the pool's, so an adapter thread's lookup waits neither for a
    /// commit nor behind a table scan for `/status`.
    fn read_sessions<T>(&self, read: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        match &self.sessions_reader {
            Some(connection) => read(&connection.lock().unwrap()),
            None => read(&self.connection.lock().unwrap()),
        }
    }

    pub fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.read_sessions(|connection| {
            let mut statement = connection.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions"))?;
            let rows = statement.query_map([], session_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The stored session under `key`.
    pub fn session(&self, key: &str) -> Result<Option<Session>, StoreError> {
        self.read_sessions(|connection| {
            let mut statement =
                connection.prepare_cached(&format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE key = ?1"))?;
            Ok(statement.query_row([key], session_from_row).optional()?)
        })
    }

    /// The stored sessions of `channel` whose key starts with `prefix`, by key.
    pub fn sessions_of(&self, channel: &str, prefix: &str) -> Result<Vec<Session>, StoreError> {
        self.read_sessions(|connection| {
            let rows = match prefix_end(prefix) {
                Some(end) => {
                    let mut statement = connection.prepare_cached(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions
                         WHERE channel_instance = ?1 AND key >= ?2 AND key < ?3 ORDER BY key"
                    ))?;
                    let rows = statement.query_map(params![channel, prefix, end], session_from_row)?;
                    rows.collect::<Result<Vec<_>, _>>()?
                }
                None => {
                    let mut statement = connection.prepare_cached(&format!(
                        "SELECT {SESSION_COLUMNS} FROM sessions WHERE channel_instance = ?1 AND key >= ?2 ORDER BY key"
                    ))?;
                    let rows = statement.query_map(params![channel, prefix], session_from_row)?;
                    rows.collect::<Result<Vec<_>, _>>()?
                }
            };
            Ok(rows.into_iter().filter(|s| s.key.starts_with(prefix)).collect())
        })
    }

    /// The `limit` most recently active stored sessions (to warm the registry's cache).
    pub fn recent_sessions(&self, limit: usize) -> Result<Vec<Session>, StoreError> {
        self.read_sessions(|connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY last_active_ms DESC LIMIT ?1"
            ))?;
            let rows = statement.query_map([limit.min(i64::MAX as usize) as i64], session_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// How many sessions are stored.
    pub fn session_count(&self) -> Result<usize, StoreError> {
        self.read_sessions(|connection| {
            Ok(connection.query_row("SELECT count(*) FROM sessions", [], |row| row.get::<_, i64>(0))? as usize)
        })
    }

    /// The adapter state saved for `channel`: (format version, data).
    pub fn adapter_state(&self, channel: &str) -> Result<Option<(u32, String)>, StoreError> {
        adapter_state(&self.connection.lock().unwrap(), channel)
    }

    /// The last `limit` transcript turns of a session, oldest first.
    pub fn history(&self, session_key: &str, limit: usize) -> Result<Vec<Turn>, StoreError> {
        self.read(|connection| history(connection, session_key, limit))
    }

    /// [`Self::history`] from a blocking thread. The turns a session's lane finished before
    /// are committed by then (a turn waits for its commit), so a read connection sees them.
    pub async fn history_async(self: &Arc<Self>, session_key: &str, limit: usize) -> Result<Vec<Turn>, StoreError> {
        let session_key = session_key.to_string();
        self.read_off_thread(move |connection| history(connection, &session_key, limit)).await
    }

    /// Inbound messages of `channel` recorded but not answered yet, oldest first.
    pub fn pending_inbound(&self, channel: &str) -> Result<Vec<(i64, Inbound)>, StoreError> {
        pending_inbound(&self.connection.lock().unwrap(), channel)
    }

    /// An inbound message still waiting to be answered, with its channel instance.
    pub fn waiting_inbound(&self, id: i64) -> Result<Option<(String, Inbound)>, StoreError> {
        waiting_inbound(&self.connection.lock().unwrap(), id)
    }

    /// [`Self::waiting_inbound`] from a blocking thread. The message was committed before it
    /// was routed, and only its own turn (not started: it waits) answers it.
    pub async fn waiting_inbound_async(self: &Arc<Self>, id: i64) -> Result<Option<(String, Inbound)>, StoreError> {
        self.read_off_thread(move |connection| waiting_inbound(connection, id)).await
    }

    /// Replies of `channel` queued and not yet confirmed, oldest first.
    pub fn queued_replies(&self, channel: &str) -> Result<Vec<QueuedReply>, StoreError> {
        queued_replies(&self.connection.lock().unwrap(), channel)
    }

    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let stored = stored_dead_letters(&self.connection.lock().unwrap(), None)?;
        Ok(stored.into_iter().map(|stored| stored.letter).collect())
    }

    /// Every stored dead letter, oldest first, from a blocking thread.
    pub async fn dead_letters_async(self: &Arc<Self>) -> Result<Vec<StoredDeadLetter>, StoreError> {
        self.read_off_thread(|connection| stored_dead_letters(connection, None)).await
    }

    /// The dead letter `id`, from a blocking thread.
    pub async fn dead_letter_async(self: &Arc<Self>, id: i64) -> Result<Option<StoredDeadLetter>, StoreError> {
        self.read_off_thread(move |connection| Ok(stored_dead_letters(connection, Some(id))?.pop())).await
    }

    /// The `limit` most recently active sessions, of `channel` only when given, from a
    /// blocking thread on a pooled connection (not the session registry's: a listing for an
    /// operator must not hold up an adapter's lookups).
    pub async fn sessions_page_async(
        self: &Arc<Self>,
        channel: Option<String>,
        limit: usize,
    ) -> Result<Vec<Session>, StoreError> {
        let limit = limit.min(i64::MAX as usize) as i64;
        self.read_off_thread(move |connection| {
            let (filter, channel) = match &channel {
                Some(channel) => ("WHERE channel_instance = ?2", channel.as_str()),
                None => ("WHERE ?2 = ?2", ""),
            };
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions {filter} ORDER BY last_active_ms DESC, key LIMIT ?1"
            ))?;
            let rows = statement.query_map(params![limit, channel], session_from_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        // Some of these scan a table: on a read connection, so the writer is not held up
        // (WAL readers and the writer do not block each other).
        self.read(counts)
    }

    /// [`Self::counts`] from a blocking thread.
    pub async fn counts_async(self: &Arc<Self>) -> Result<StoreCounts, StoreError> {
        self.read_off_thread(counts).await
    }
}

/// The columns [`session_from_row`] reads, in its order.
const SESSION_COLUMNS: &str =
    "key, agent_id, channel_instance, conversation_id, thread_root_id, created_at_ms, last_active_ms";

fn session_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Session> {
    Ok(Session {
        key: row.get(0)?,
        agent_id: row.get(1)?,
        target: DeliveryTarget {
            channel_instance: row.get(2)?,
            conversation_id: row.get(3)?,
            thread_root_id: row.get(4)?,
        },
        created_at_ms: row.get(5)?,
        last_active_ms: row.get(6)?,
    })
}

/// The least string above every string that starts with `prefix` (`None`: no such bound),
/// so that a prefix is an index range. SQLite compares text as UTF-8 bytes, which orders
/// like code points: the prefix with its last character raised by one bounds it.
fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        // The next code point that is a `char` (past the surrogates).
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The dead letters with their ids, oldest first; only `id` when given.
fn stored_dead_letters(connection: &Connection, id: Option<i64>) -> Result<Vec<StoredDeadLetter>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, at_ms, replayed_at_ms, channel_instance, generation, event_kind, conversation_id, session_key, \
         payload, error FROM dead_letters WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    let rows = statement.query_map([id], |row| {
        Ok(StoredDeadLetter {
            id: row.get(0)?,
            at_ms: row.get(1)?,
            replayed_at_ms: row.get(2)?,
            letter: DeadLetter {
                channel_instance: row.get(3)?,
                generation: row.get::<_, i64>(4)? as u64,
                event_kind: row.get(5)?,
                conversation_id: row.get(6)?,
                session_key: row.get(7)?,
                payload: row.get(8)?,
                error: row.get(9)?,
            },
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn adapter_state(connection: &Connection, channel: &str) -> Result<Option<(u32, String)>, StoreError> {
    Ok(connection
        .prepare_cached("SELECT format_version, data FROM adapter_state WHERE channel_instance = ?1")?
        .query_row([channel], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?)
}

fn history(connection: &Connection, session_key: &str, limit: usize) -> Result<Vec<Turn>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT role, content FROM (SELECT id, role, content FROM turns WHERE session_key = ?1
         ORDER BY id DESC LIMIT ?2) ORDER BY id",
    )?;
    let rows = statement
        .query_map(params![session_key, limit as i64], |row| Ok(Turn { role: row.get(0)?, content: row.get(1)? }))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(super) fn pending_inbound(connection: &Connection, channel: &str) -> Result<Vec<(i64, Inbound)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, message_id, peer_kind, peer_id, thread_root_id, sender_id, sender_name, text, created_at_ms
         FROM inbound WHERE channel_instance = ?1 AND status = 'received' ORDER BY id",
    )?;
    let rows = statement.query_map([channel], |row| Ok((row.get(0)?, inbound_from_row(row)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn waiting_inbound(connection: &Connection, id: i64) -> Result<Option<(String, Inbound)>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, message_id, peer_kind, peer_id, thread_root_id, sender_id, sender_name, text, created_at_ms,
                channel_instance
         FROM inbound WHERE id = ?1 AND status = 'received'",
    )?;
    let mut rows = statement.query_map([id], |row| Ok((row.get(9)?, inbound_from_row(row)?)))?;
    Ok(rows.next().transpose()?)
}

pub(super) fn queued_replies(connection: &Connection, channel: &str) -> Result<Vec<QueuedReply>, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT id, session_key, channel_instance, conversation_id, thread_root_id, text
         FROM outbound WHERE channel_instance = ?1 AND status = 'queued' ORDER BY id",
    )?;
    let rows = statement.query_map([channel], |row| {
        Ok(QueuedReply {
            id: row.get(0)?,
            session_key: row.get(1)?,
            target: DeliveryTarget {
                channel_instance: row.get(2)?,
                conversation_id: row.get(3)?,
                thread_root_id: row.get(4)?,
            },
            text: row.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn counts(connection: &Connection) -> Result<StoreCounts, StoreError> {
    let count = |sql: &str| connection.query_row(sql, [], |row| row.get::<_, i64>(0));
    Ok(StoreCounts {
        sessions: count("SELECT count(*) FROM sessions")?,
        turns: count("SELECT count(*) FROM turns")?,
        inbound_pending: count("SELECT count(*) FROM inbound WHERE status = 'received'")?,
        outbound_queued: count("SELECT count(*) FROM outbound WHERE status = 'queued'")?,
        outbound_delivered: count("SELECT count(*) FROM outbound WHERE status = 'delivered'")?,
        outbound_failed: count("SELECT count(*) FROM outbound WHERE status = 'failed'")?,
        dead_letters: count("SELECT count(*) FROM dead_letters")?,
    })
}

/// An inbound row's message (columns 1–8: message_id … created_at_ms).
fn inbound_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Inbound> {
    let kind: String = row.get(2)?;
    Ok(Inbound {
        message_id: row.get(1)?,
        peer_kind: kind,
        peer_id: row.get(3)?,
        thread_root_id: row.get(4)?,
        sender_id: row.get(5)?,
        sender_name: row.get(6)?,
        text: row.get(7)?,
        created_at_ms: row.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_is_bounded_by_its_last_character_raised() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("agent:main:"), Some("agent:main;".into()));
        assert_eq!(prefix_end("a\u{D7FF}"), Some("a\u{E000}".into()), "past the surrogates");
        assert_eq!(prefix_end("a\u{10FFFF}"), Some("b".into()));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
    }
}
