//! The writes: the rows each kind of write puts into a transaction (shared by the direct
//! writes here and the [`super::StoreWriter`]'s group commits).

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{BatchRecord, DeadLetter, Durability, FinishedTurn, Pruned, Store, StoreError};
use crate::session::Session;

impl Store {
    pub fn insert_session(&self, session: &Session) -> Result<(), StoreError> {
        self.insert_sessions(std::slice::from_ref(session))
    }

    /// Insert many sessions in one transaction (imports, benchmarks).
    pub fn insert_sessions(&self, sessions: &[Session]) -> Result<(), StoreError> {
        let mut connection = self.connection.lock().unwrap();
        let transaction = connection.transaction()?;
        for session in sessions {
            write_session(&transaction, session)?;
        }
        transaction.commit()?;
        Ok(())
    }

    /// Store one batch. Returns, for each inbound message in order, its new row id, or `None`
    /// when the message was recorded before (a redelivery: resume replay, catch-up).
    pub fn commit_batch(
        &self,
        channel: &str,
        batch: &BatchRecord,
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        let mut connection = self.connection.lock().unwrap();
        let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids = write_batch(&transaction, channel, batch, now_ms)?;
        transaction.commit()?;
        Ok(ids)
    }

    /// Store a finished turn; returns the queued reply's id (its `reply_id`) when there is one.
    pub fn finish_turn(&self, turn: &FinishedTurn) -> Result<Option<i64>, StoreError> {
        self.finish_turns(std::slice::from_ref(turn)).pop().expect("one result per turn")
    }

    /// Store finished turns, each atomically, in one transaction when they all can be (a group
    /// commit: one commit and at most one sync for all); each turn's queued reply id.
    ///
    /// With `Durability::Full` and a reply among them, the commit waits for the disk: the
    /// replies are sent right after, and must not be sent again after a power loss.
    pub fn finish_turns(&self, turns: &[FinishedTurn]) -> Vec<Result<Option<i64>, StoreError>> {
        let mut connection = self.connection.lock().unwrap();
        let must_sync = self.durability == Durability::Full && turns.iter().any(|t| t.reply.is_some());
        if must_sync {
            if let Err(e) = connection.pragma_update(None, "synchronous", "FULL") {
                return turns.iter().map(|_| Err(StoreError::CannotSync(e.to_string()))).collect();
            }
        }
        let results = match write_turns(&mut connection, turns) {
            Ok(ids) => ids.into_iter().map(Ok).collect(),
            // One bad turn must not fail the others: each on its own, to find it.
            Err(_) if turns.len() > 1 => turns
                .iter()
                .map(|turn| write_turns(&mut connection, std::slice::from_ref(turn)).map(|mut ids| ids.remove(0)))
                .collect(),
            Err(e) => vec![Err(e)],
        };
        if must_sync {
            if let Err(e) = connection.pragma_update(None, "synchronous", "NORMAL") {
                tracing::warn!("cannot set the state database back to synchronous=NORMAL: {e}");
            }
        }
        results
    }

    /// Mark an inbound message as not going to be answered (e.g. its lane overflowed).
    pub fn set_inbound_status(&self, inbound_id: i64, status: &str) -> Result<(), StoreError> {
        write_inbound_status(&self.connection.lock().unwrap(), inbound_id, status)
    }

    /// Delete finished rows older than their cut-off (ms since the epoch; `None` keeps them):
    /// turns, dead letters, answered inbound messages and replies no longer queued. Rows are
    /// taken oldest first in batches (ids grow with time), so a table with nothing to prune
    /// costs one row read.
    pub fn prune(
        &self,
        turns_before: Option<i64>,
        dead_letters_before: Option<i64>,
        delivered_before: Option<i64>,
    ) -> Result<Pruned, StoreError> {
        let mut pruned = Pruned::default();
        let jobs: [(&str, &str, &str, Option<i64>, &mut u64); 4] = [
            ("turns", "at_ms", "1", turns_before, &mut pruned.turns),
            ("dead_letters", "at_ms", "1", dead_letters_before, &mut pruned.dead_letters),
            ("inbound", "received_at_ms", "status != 'received'", delivered_before, &mut pruned.inbound),
            ("outbound", "updated_at_ms", "status != 'queued'", delivered_before, &mut pruned.outbound),
        ];
        for (table, time, finished, before, count) in jobs {
            let Some(before) = before else { continue };
            loop {
                let connection = self.connection.lock().unwrap();
                let oldest: Option<i64> = connection
                    .query_row(&format!("SELECT {time} FROM {table} ORDER BY id LIMIT 1"), [], |row| row.get(0))
                    .optional()?;
                if oldest.is_none_or(|at| at >= before) {
                    break;
                }
                let deleted = connection.execute(
                    &format!(
                        "DELETE FROM {table} WHERE id IN
                         (SELECT id FROM {table} WHERE {time} < ?1 AND {finished} ORDER BY id LIMIT {PRUNE_BATCH})"
                    ),
                    [before],
                )?;
                *count += deleted as u64;
                if deleted < PRUNE_BATCH as usize {
                    break;
                }
            }
        }
        Ok(pruned)
    }

    pub fn add_dead_letter(&self, letter: &DeadLetter, now_ms: i64) -> Result<i64, StoreError> {
        write_dead_letter(&self.connection.lock().unwrap(), letter, now_ms)
    }
}

/// Rows deleted per statement: the writer waits for the connection meanwhile.
const PRUNE_BATCH: u32 = 5_000;

/// One batch's rows (see [`Store::commit_batch`]) inside `transaction`.
pub(super) fn write_batch(
    transaction: &Connection,
    channel: &str,
    batch: &BatchRecord,
    now_ms: i64,
) -> Result<Vec<Option<i64>>, StoreError> {
    let mut ids = Vec::with_capacity(batch.inbound.len());
    {
        let mut insert = transaction.prepare_cached(
            "INSERT OR IGNORE INTO inbound
         (channel_instance, message_id, peer_kind, peer_id, thread_root_id, sender_id, sender_name, text,
          created_at_ms, received_at_ms, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'received')",
        )?;
        for message in &batch.inbound {
            let inserted = insert.execute(params![
                channel,
                message.message_id,
                message.peer_kind.as_str(),
                message.peer_id,
                message.thread_root_id,
                message.sender_id,
                message.sender_name,
                message.text,
                message.created_at_ms,
                now_ms
            ])?;
            ids.push((inserted == 1).then(|| transaction.last_insert_rowid()));
        }
        let mut delivered = transaction.prepare_cached(
            "UPDATE outbound SET status = 'delivered', platform_message_id = ?2, updated_at_ms = ?3 WHERE id = ?1",
        )?;
        for (reply_id, post_id) in &batch.delivered {
            delivered.execute(params![*reply_id as i64, post_id, now_ms])?;
        }
        let mut failed = transaction
            .prepare_cached("UPDATE outbound SET status = 'failed', error = ?2, updated_at_ms = ?3 WHERE id = ?1")?;
        for (reply_id, error) in &batch.failed {
            failed.execute(params![*reply_id as i64, error, now_ms])?;
        }
        if let Some((format_version, data)) = &batch.adapter_state {
            transaction
                .prepare_cached(
                    "INSERT INTO adapter_state (channel_instance, format_version, data, saved_at_ms)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (channel_instance) DO UPDATE
             SET format_version = excluded.format_version, data = excluded.data,
                 saved_at_ms = excluded.saved_at_ms",
                )?
                .execute(params![channel, format_version, data, now_ms])?;
        }
    }
    Ok(ids)
}

/// All of `turns` in one transaction, or none of them.
pub(super) fn write_turns(connection: &mut Connection, turns: &[FinishedTurn]) -> Result<Vec<Option<i64>>, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let reply_ids = turns.iter().map(|turn| write_turn(&transaction, turn)).collect::<Result<Vec<_>, _>>()?;
    transaction.commit()?;
    Ok(reply_ids)
}

/// One finished turn's rows (see [`Store::finish_turns`]) inside `transaction`; its queued
/// reply's id.
pub(super) fn write_turn(transaction: &Connection, turn: &FinishedTurn) -> Result<Option<i64>, StoreError> {
    let at_ms = turn.finished_at_ms;
    let mut append = transaction.prepare_cached(
        "INSERT INTO turns (session_key, role, content, message_id, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for entry in &turn.transcript {
        append.execute(params![turn.session_key, entry.role, entry.content, turn.message_id, at_ms])?;
    }
    let reply_id = match &turn.reply {
        Some((target, text)) => {
            transaction
                .prepare_cached(
                    "INSERT INTO outbound (session_key, channel_instance, conversation_id, thread_root_id, text,
                         inbound_id, status, created_at_ms, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'queued', ?7, ?7)",
                )?
                .execute(params![
                    turn.session_key,
                    target.channel_instance,
                    target.conversation_id,
                    target.thread_root_id,
                    text,
                    turn.inbound_id,
                    at_ms
                ])?;
            Some(transaction.last_insert_rowid())
        }
        None => None,
    };
    transaction.prepare_cached("UPDATE inbound SET status = 'answered' WHERE id = ?1")?.execute([turn.inbound_id])?;
    transaction
        .prepare_cached("UPDATE sessions SET last_active_ms = ?2 WHERE key = ?1")?
        .execute(params![turn.session_key, at_ms])?;
    Ok(reply_id)
}

/// A new session's row; a session stored before stays as it is (the first one wins, as in
/// the registry).
pub(super) fn write_session(transaction: &Connection, session: &Session) -> Result<(), StoreError> {
    transaction
        .prepare_cached(
            "INSERT OR IGNORE INTO sessions
             (key, agent_id, channel_instance, conversation_id, thread_root_id, created_at_ms, last_active_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            session.key,
            session.agent_id,
            session.target.channel_instance,
            session.target.conversation_id,
            session.target.thread_root_id,
            session.created_at_ms,
            session.last_active_ms
        ])?;
    Ok(())
}

pub(super) fn write_inbound_status(transaction: &Connection, inbound_id: i64, status: &str) -> Result<(), StoreError> {
    transaction.prepare_cached("UPDATE inbound SET status = ?2 WHERE id = ?1")?.execute(params![inbound_id, status])?;
    Ok(())
}

/// A dead letter's row; its id.
pub(super) fn write_dead_letter(transaction: &Connection, letter: &DeadLetter, now_ms: i64) -> Result<i64, StoreError> {
    transaction
        .prepare_cached(
            "INSERT INTO dead_letters (channel_instance, generation, event_kind, conversation_id, session_key, \
             payload, error, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            letter.channel_instance,
            letter.generation as i64,
            letter.event_kind,
            letter.conversation_id,
            letter.session_key,
            letter.payload,
            letter.error,
            now_ms
        ])?;
    Ok(transaction.last_insert_rowid())
}
