//! The reads: sessions, transcripts, pending work, the delivery queue, dead letters, counts.

use rusqlite::{params, OptionalExtension};
use switchboard_plugin_api::PeerKind;

use super::{DeadLetter, QueuedReply, Store, StoreCounts, StoreError, Turn};
use crate::{
    apartment::Inbound,
    session::{DeliveryTarget, Session},
};

impl Store {
    pub fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        let connection = self.connection.lock().unwrap();
        let mut statement = connection.prepare_cached(
            "SELECT key, agent_id, channel_instance, conversation_id, thread_root_id, created_at_ms, last_active_ms
             FROM sessions",
        )?;
        let rows = statement.query_map([], |row| {
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
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The adapter state saved for `channel`: (format version, data).
    pub fn adapter_state(&self, channel: &str) -> Result<Option<(u32, String)>, StoreError> {
        let connection = self.connection.lock().unwrap();
        Ok(connection
            .query_row("SELECT format_version, data FROM adapter_state WHERE channel_instance = ?1", [channel], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .optional()?)
    }

    /// The last `limit` transcript turns of a session, oldest first.
    pub fn history(&self, session_key: &str, limit: usize) -> Result<Vec<Turn>, StoreError> {
        let connection = self.reader.as_ref().unwrap_or(&self.connection).lock().unwrap();
        let mut statement = connection.prepare_cached(
            "SELECT role, content FROM (SELECT id, role, content FROM turns WHERE session_key = ?1
             ORDER BY id DESC LIMIT ?2) ORDER BY id",
        )?;
        let rows = statement.query_map(params![session_key, limit as i64], |row| {
            Ok(Turn { role: row.get(0)?, content: row.get(1)? })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Inbound messages of `channel` recorded but not answered yet, oldest first.
    pub fn pending_inbound(&self, channel: &str) -> Result<Vec<(i64, Inbound)>, StoreError> {
        let connection = self.connection.lock().unwrap();
        let mut statement = connection.prepare_cached(
            "SELECT id, message_id, peer_kind, peer_id, thread_root_id, sender_id, sender_name, text, created_at_ms
             FROM inbound WHERE channel_instance = ?1 AND status = 'received' ORDER BY id",
        )?;
        let rows = statement.query_map([channel], |row| Ok((row.get(0)?, inbound_from_row(row)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// An inbound message still waiting to be answered, with its channel instance.
    pub fn waiting_inbound(&self, id: i64) -> Result<Option<(String, Inbound)>, StoreError> {
        let connection = self.connection.lock().unwrap();
        let mut statement = connection.prepare_cached(
            "SELECT id, message_id, peer_kind, peer_id, thread_root_id, sender_id, sender_name, text, created_at_ms,
                    channel_instance
             FROM inbound WHERE id = ?1 AND status = 'received'",
        )?;
        let mut rows = statement.query_map([id], |row| Ok((row.get(9)?, inbound_from_row(row)?)))?;
        Ok(rows.next().transpose()?)
    }

    /// Replies of `channel` queued and not yet confirmed, oldest first.
    pub fn queued_replies(&self, channel: &str) -> Result<Vec<QueuedReply>, StoreError> {
        let connection = self.connection.lock().unwrap();
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

    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let connection = self.connection.lock().unwrap();
        let mut statement = connection.prepare(
            "SELECT channel_instance, generation, event_kind, conversation_id, session_key, payload, error \
             FROM dead_letters ORDER BY id",
        )?;
        let rows = statement.query_map([], |row| {
            Ok(DeadLetter {
                channel_instance: row.get(0)?,
                generation: row.get::<_, i64>(1)? as u64,
                event_kind: row.get(2)?,
                conversation_id: row.get(3)?,
                session_key: row.get(4)?,
                payload: row.get(5)?,
                error: row.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn counts(&self) -> Result<StoreCounts, StoreError> {
        // Some of these scan a table: on the reader connection, so the writer is not held up
        // (WAL readers and the writer do not block each other).
        let connection = self.reader.as_ref().unwrap_or(&self.connection).lock().unwrap();
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
}

/// An inbound row's message (columns 1–8: message_id … created_at_ms).
fn inbound_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Inbound> {
    let kind: String = row.get(2)?;
    Ok(Inbound {
        message_id: row.get(1)?,
        peer_kind: match kind.as_str() {
            "dm" => PeerKind::Dm,
            "group" => PeerKind::Group,
            _ => PeerKind::Channel,
        },
        peer_id: row.get(3)?,
        thread_root_id: row.get(4)?,
        sender_id: row.get(5)?,
        sender_name: row.get(6)?,
        text: row.get(7)?,
        created_at_ms: row.get(8)?,
    })
}
