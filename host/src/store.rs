//! The durable store: one SQLite database (WAL mode) in the state directory.
//!
//! It holds what must outlive the process: sessions, their transcripts, every inbound message
//! the gateway accepted (by platform message id, to recognise redelivery), the outbound
//! delivery queue, and each channel instance's adapter state (resume cursor, private state).
//!
//! The ordering rules (ARCHITECTURE.md §5) are kept by *what goes into one transaction*:
//! - [`Store::commit_batch`]: the inbound messages of one batch of adapter events, the reply
//!   outcomes it reported and the adapter state after it. The adapter's resume cursor is
//!   therefore never stored ahead of a message it has passed.
//! - [`Store::finish_turns`]: per turn, the transcript turns, the queued reply and "inbound
//!   answered". A crash before it re-runs the turn; a crash after it re-sends the queued reply.
//!
//! Both usually go through the [`StoreWriter`] thread, whose group commits put the writes of
//! many tasks into one transaction, each inside a savepoint of its own.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use prometheus_client::metrics::histogram::Histogram;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use switchboard_plugin_api::PeerKind;

use crate::{
    apartment::Inbound,
    session::{DeliveryTarget, Session},
};

/// How often the WAL is copied into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// Checkpoints in a row, each copying what was appended during the one before, before a
/// checkpoint that has not caught up with the writer waits for the next round.
const CHECKPOINT_CATCH_UP_ROUNDS: usize = 4;

/// WAL frames (pages) past which a checkpoint holds the writer back while it copies the last
/// frames, so that the next commit starts the WAL over (16 MiB of 4 KiB pages).
const WAL_FRAMES_BOUND: i64 = 4096;

/// How long commits stay in the WAL unsynced when nothing waits for them. Not for their
/// durability: a checkpoint syncs the WAL before it copies it, and holds the writer back
/// while it does so for the last frames; a WAL that is synced already makes that short (at
/// 500 msg/s under durability=normal, added latency p99 19–32 ms → 7–8 ms).
const WAL_FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The file name of the database inside the state directory.
pub const DATABASE_FILE: &str = "switchboard.db";

/// Each entry migrates the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 → 1
    "CREATE TABLE sessions (
        key TEXT PRIMARY KEY,
        agent_id TEXT NOT NULL,
        channel_instance TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        thread_root_id TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        last_active_ms INTEGER NOT NULL
    );
    CREATE TABLE turns (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        message_id TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );
    CREATE INDEX turns_by_session ON turns (session_key, id);
    CREATE TABLE inbound (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        channel_instance TEXT NOT NULL,
        message_id TEXT NOT NULL,
        peer_kind TEXT NOT NULL,
        peer_id TEXT NOT NULL,
        thread_root_id TEXT NOT NULL,
        sender_id TEXT NOT NULL,
        sender_name TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        received_at_ms INTEGER NOT NULL,
        status TEXT NOT NULL,
        UNIQUE (channel_instance, message_id)
    );
    CREATE INDEX inbound_by_status ON inbound (channel_instance, status, id);
    CREATE TABLE outbound (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_key TEXT NOT NULL,
        channel_instance TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        thread_root_id TEXT NOT NULL,
        text TEXT NOT NULL,
        inbound_id INTEGER,
        status TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        platform_message_id TEXT NOT NULL DEFAULT '',
        error TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX outbound_by_status ON outbound (channel_instance, status, id);
    CREATE TABLE adapter_state (
        channel_instance TEXT PRIMARY KEY,
        format_version INTEGER NOT NULL,
        data TEXT NOT NULL,
        saved_at_ms INTEGER NOT NULL
    );",
    // 1 → 2: events an adapter could not handle even after a restart, kept for the operator.
    "CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        channel_instance TEXT NOT NULL,
        generation INTEGER NOT NULL,
        event_kind TEXT NOT NULL,
        conversation_id TEXT NOT NULL,
        session_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        error TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );",
    // 2 → 3: the status indexes hold only what is still to do (a message not yet answered,
    // a reply not yet sent): what start-up recovery and the delivery queue look up. Indexing
    // every row by status cost each message several index-page writes as its status moved.
    "DROP INDEX inbound_by_status;
    CREATE INDEX inbound_unanswered ON inbound (channel_instance, id) WHERE status = 'received';
    DROP INDEX outbound_by_status;
    CREATE INDEX outbound_queued ON outbound (channel_instance, id) WHERE status = 'queued';
    CREATE INDEX outbound_failed ON outbound (channel_instance, id) WHERE status = 'failed';",
];

/// An event an adapter could not handle, twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub channel_instance: String,
    pub generation: u64,
    pub event_kind: String,
    pub conversation_id: String,
    pub session_key: String,
    pub payload: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error(
        "the state database {path} is damaged or not a switchboard database ({reason}); move it aside to start \
         with an empty state, or restore it from a backup"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "the state database {path} has schema version {found}, newer than this build understands ({supported}); \
         run a newer switchboard"
    )]
    TooNew { path: PathBuf, found: i64, supported: i64 },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot make the state database wait for the disk: {0}")]
    CannotSync(String),
    #[error("the state database writer has stopped")]
    WriterStopped,
    #[error("state database: the group commit this write was part of failed: {0}")]
    GroupFailed(String),
}

/// How hard a commit waits for the disk. `Normal` survives a crash of the process, `Full` also
/// a power loss (SQLite's `synchronous` pragma in WAL mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Normal,
    Full,
}

/// What one batch of adapter events produced that must be stored together.
#[derive(Debug, Default)]
pub struct BatchRecord {
    pub inbound: Vec<Inbound>,
    pub delivered: Vec<(u64, String)>,
    pub failed: Vec<(u64, String)>,
    pub adapter_state: Option<(u32, String)>,
}

/// One stored transcript turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

/// A finished agent turn, stored atomically (alone, or with other turns in one group commit).
#[derive(Debug)]
pub struct FinishedTurn {
    pub inbound_id: i64,
    pub session_key: String,
    /// The turns to append to the transcript (the user's message, the agent's answer).
    pub transcript: Vec<Turn>,
    pub message_id: String,
    /// The reply to queue, with where it goes.
    pub reply: Option<(DeliveryTarget, String)>,
    pub finished_at_ms: i64,
}

/// A reply in the delivery queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedReply {
    pub id: i64,
    pub session_key: String,
    pub target: DeliveryTarget,
    pub text: String,
}

/// Counts for `/status` and the logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounts {
    pub sessions: i64,
    pub turns: i64,
    pub inbound_pending: i64,
    pub outbound_queued: i64,
    pub outbound_delivered: i64,
    pub outbound_failed: i64,
    pub dead_letters: i64,
}

pub struct Store {
    durability: Durability,
    path: PathBuf,
    connection: std::sync::Arc<Mutex<Connection>>,
    /// A second connection for the reads on the answering path (history): under WAL it reads
    /// the last commit while the writer commits or waits for the disk. `None` in memory.
    reader: Option<Mutex<Connection>>,
}

impl Store {
    /// Open (or create) the database in `state_dir` and bring its schema up to date.
    pub fn open(state_dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        let path = state_dir.join(DATABASE_FILE);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&path, flags)
            .map_err(|e| StoreError::Open { path: path.clone(), reason: e.to_string() })?;
        let mut store = Store::init(path, connection, durability)?;
        let reader = Connection::open_with_flags(&store.path, flags)
            .map_err(|e| StoreError::Open { path: store.path.clone(), reason: e.to_string() })?;
        reader.busy_timeout(std::time::Duration::from_secs(5))?;
        store.reader = Some(Mutex::new(reader));
        // Checkpoints copy the WAL into the database and sync it: on a thread of their own, so
        // no commit (and no reply waiting behind it) pays for one.
        let checkpointer = Connection::open_with_flags(&store.path, flags)
            .map_err(|e| StoreError::Open { path: store.path.clone(), reason: e.to_string() })?;
        store.connection.lock().unwrap().pragma_update(None, "wal_autocheckpoint", 0)?;
        let writer = std::sync::Arc::downgrade(&store.connection);
        std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || checkpoint_while_open(&checkpointer, &writer))
            .map_err(|e| StoreError::Open { path: store.path.clone(), reason: format!("checkpoint thread: {e}") })?;
        Ok(store)
    }

    /// A private in-memory database, for tests.
    pub fn in_memory() -> Result<Store, StoreError> {
        Store::init(PathBuf::from(":memory:"), Connection::open_in_memory()?, Durability::Normal)
    }

    fn init(path: PathBuf, connection: Connection, durability: Durability) -> Result<Store, StoreError> {
        let corrupt = |e: rusqlite::Error| classify(&path, e);
        connection.busy_timeout(std::time::Duration::from_secs(5)).map_err(corrupt)?;
        let mode: String = connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(corrupt)?;
        if path.as_os_str() != ":memory:" && !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open { path, reason: format!("journal mode is {mode}, WAL is required") });
        }
        // Commits do not wait for the disk by themselves; with `Durability::Full` the commits
        // that gate something leaving the gateway (a reply about to be sent) do, and since the
        // WAL is written in order, that sync carries every earlier commit to the disk too.
        // Statement journals (each group commit's savepoints) stay in memory: as temp files they
        // cost a write per page touched.
        connection
            .execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;")
            .map_err(corrupt)?;
        let check: String = connection.query_row("PRAGMA quick_check", [], |row| row.get(0)).map_err(corrupt)?;
        if check != "ok" {
            return Err(StoreError::Corrupt { path, reason: check });
        }
        let store = Store { path, connection: std::sync::Arc::new(Mutex::new(connection)), reader: None, durability };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut connection = self.connection.lock().unwrap();
        let supported = MIGRATIONS.len() as i64;
        let found: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if found > supported {
            return Err(StoreError::TooNew { path: self.path.clone(), found, supported });
        }
        if found == 0 {
            // A database with tables but no version is somebody else's.
            let tables: i64 =
                connection
                    .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |row| row.get(0))?;
            if tables > 0 {
                return Err(StoreError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("{tables} unknown table(s) and no schema version"),
                });
            }
        }
        for (version, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            transaction.execute_batch(migration)?;
            transaction.pragma_update(None, "user_version", version as i64 + 1)?;
            transaction.commit()?;
            tracing::info!(database = %self.path.display(), version = version + 1, "state database migrated");
        }
        Ok(())
    }

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

    pub fn insert_session(&self, session: &Session) -> Result<(), StoreError> {
        self.insert_sessions(std::slice::from_ref(session))
    }

    /// Insert many sessions in one transaction (imports, benchmarks).
    pub fn insert_sessions(&self, sessions: &[Session]) -> Result<(), StoreError> {
        let mut connection = self.connection.lock().unwrap();
        let transaction = connection.transaction()?;
        {
            let mut statement = transaction.prepare_cached(
                "INSERT OR IGNORE INTO sessions
                 (key, agent_id, channel_instance, conversation_id, thread_root_id, created_at_ms, last_active_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            for session in sessions {
                statement.execute(params![
                    session.key,
                    session.agent_id,
                    session.target.channel_instance,
                    session.target.conversation_id,
                    session.target.thread_root_id,
                    session.created_at_ms,
                    session.last_active_ms
                ])?;
            }
        }
        transaction.commit()?;
        Ok(())
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
        let connection = self.connection.lock().unwrap();
        connection
            .prepare_cached("UPDATE inbound SET status = ?2 WHERE id = ?1")?
            .execute(params![inbound_id, status])?;
        Ok(())
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

    pub fn add_dead_letter(&self, letter: &DeadLetter, now_ms: i64) -> Result<i64, StoreError> {
        let connection = self.connection.lock().unwrap();
        connection.execute(
            "INSERT INTO dead_letters (channel_instance, generation, event_kind, conversation_id, session_key, \
             payload, error, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            rusqlite::params![
                letter.channel_instance,
                letter.generation as i64,
                letter.event_kind,
                letter.conversation_id,
                letter.session_key,
                letter.payload,
                letter.error,
                now_ms
            ],
        )?;
        Ok(connection.last_insert_rowid())
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

    /// Write the WAL back into the database and empty it (at start-up).
    pub fn truncate_wal(&self) -> Result<(), StoreError> {
        self.connection.lock().unwrap().execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(())
    }
}

/// "Not a database" and friends mean a damaged file, not a bug: say so clearly.
fn classify(path: &Path, error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            StoreError::Corrupt { path: path.to_path_buf(), reason: error.to_string() }
        }
        Some(
            rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly | rusqlite::ErrorCode::PermissionDenied,
        ) => StoreError::Open { path: path.to_path_buf(), reason: error.to_string() },
        _ => StoreError::Sql(error),
    }
}

/// Every `CHECKPOINT_EVERY`, until the store is dropped: copy the WAL into the database
/// without holding up the writer, again while it appended meanwhile (each round copies less).
/// A WAL starts over only at a commit that finds it wholly copied, which under a steady write
/// load (a commit every millisecond) an unlocked checkpoint seldom achieves, so past
/// `WAL_FRAMES_BOUND` the last frames are copied under the writer's lock. That step syncs the
/// database file, and the commit that starts the WAL over syncs its header: every commit
/// queued meanwhile waits (~10 ms on this machine's disk), so it is kept rare, not done on
/// every round.
fn checkpoint_while_open(checkpointer: &Connection, writer: &std::sync::Weak<Mutex<Connection>>) {
    // (frames in the WAL, frames copied into the database); -1, -1 if not in WAL mode.
    let passive = |connection: &Connection| {
        connection
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?)))
    };
    loop {
        std::thread::sleep(CHECKPOINT_EVERY);
        let Some(writer) = writer.upgrade() else { return };
        let mut wal_frames = 0;
        for _ in 0..CHECKPOINT_CATCH_UP_ROUNDS {
            match passive(checkpointer) {
                Ok((frames, copied)) => {
                    wal_frames = frames;
                    if copied >= frames {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!("state database checkpoint failed (retried): {e}");
                    break;
                }
            }
        }
        if wal_frames > WAL_FRAMES_BOUND {
            let locked = writer.lock().unwrap();
            if let Err(e) = passive(&locked) {
                tracing::warn!("state database checkpoint failed (retried): {e}");
            }
        }
    }
}

/// The WAL beside the database at `database`.
fn wal_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Threads that sync the WAL; while one syncs, the next waiting reply starts another sync
/// instead of waiting for that one to end first.
const SYNC_THREADS: usize = 2;

/// What the WAL sync threads share.
struct WalSyncs {
    wal: PathBuf,
    waiting: Mutex<std::sync::mpsc::Receiver<SyncRequest>>,
    /// A sync thread sleeps until something is to be synced: the writer nudges it then.
    idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Group commits made so far (counted by the writer).
    commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Group commits known to be on the disk.
    synced: std::sync::atomic::AtomicU64,
    /// Rounds of waiters, each with the ticket of the sync it waits for.
    rounds: Mutex<Rounds>,
    failing: std::sync::atomic::AtomicBool,
    sync_seconds: Histogram,
}

/// What the sync threads are sent.
enum SyncRequest {
    /// Run this once the commits made so far are on the disk.
    Wait(AfterSync),
    /// A commit was made while the threads slept (sync it within [`WAL_FLUSH_EVERY`]).
    Nudge,
}

#[derive(Default)]
struct Rounds {
    next_ticket: u64,
    waiting: std::collections::BTreeMap<u64, Vec<AfterSync>>,
}

/// Until the writer is dropped: take everything waiting for a sync, sync the WAL once, and
/// tell each in order. What arrives during a sync waits for the next one, which another
/// thread starts at once: only commits made before a sync started are sure to be in it.
/// A sync that ends also answers every earlier round still waiting (its sync started
/// before, so this one covers it), which keeps the answers in order whichever sync ends
/// first. Commits nothing waits for (all of them under `Durability::Normal`) are synced
/// too, within [`WAL_FLUSH_EVERY`].
fn sync_wal_while_open(syncs: &WalSyncs) {
    use std::sync::{atomic::Ordering, mpsc::RecvTimeoutError};
    let mut file: Option<std::fs::File> = None;
    let unsynced = || syncs.commits.load(Ordering::SeqCst) != syncs.synced.load(Ordering::SeqCst);
    loop {
        let (ticket, committed) = {
            let waiting = syncs.waiting.lock().unwrap();
            // `None`: the wait ran out with commits not yet on the disk (a background sync).
            let first = match waiting.recv_timeout(WAL_FLUSH_EVERY) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) if unsynced() => None,
                Err(RecvTimeoutError::Timeout) => {
                    // Nothing to sync: sleep until a reply waits or the writer nudges (idle
                    // means idle; a 10 ms poll was ~200 wake-ups a second). Marked idle
                    // before the last look, so a commit made meanwhile is not missed.
                    syncs.idle.store(true, Ordering::SeqCst);
                    if unsynced() {
                        syncs.idle.store(false, Ordering::SeqCst);
                        None
                    } else {
                        match waiting.recv() {
                            Ok(request) => Some(request),
                            Err(_) => return,
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let background = first.is_none();
            let round: Vec<AfterSync> = first
                .into_iter()
                .chain(waiting.try_iter())
                .filter_map(|request| match request {
                    SyncRequest::Wait(then) => Some(then),
                    SyncRequest::Nudge => None,
                })
                .collect();
            if round.is_empty() && !background {
                // Only nudges: commits to sync within WAL_FLUSH_EVERY, with whatever comes.
                continue;
            }
            let mut rounds = syncs.rounds.lock().unwrap();
            let ticket = rounds.next_ticket;
            rounds.next_ticket += 1;
            rounds.waiting.insert(ticket, round);
            (ticket, syncs.commits.load(Ordering::Acquire))
        };
        let started = std::time::Instant::now();
        let outcome = sync_file(&syncs.wal, &mut file);
        syncs.sync_seconds.observe(started.elapsed().as_secs_f64());
        // Answered under the lock, so that rounds another thread releases cannot overtake.
        let mut rounds = syncs.rounds.lock().unwrap();
        let later = rounds.waiting.split_off(&(ticket + 1));
        let released = std::mem::replace(&mut rounds.waiting, later);
        let replies: usize = released.values().map(Vec::len).sum();
        match &outcome {
            Ok(()) => {
                syncs.synced.fetch_max(committed, Ordering::AcqRel);
                syncs.failing.store(false, Ordering::Relaxed);
            }
            // Earlier rounds whose own sync may still succeed fail with this one: after a
            // failed sync, what the page cache holds is not worth trusting.
            Err(reason) if replies > 0 => tracing::error!(
                replies,
                "cannot sync the state database's WAL: {reason}; the replies waiting for it stay queued and are sent after the next start"
            ),
            // Told once, not every round, while it lasts.
            Err(reason) if !syncs.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!("cannot sync the state database's WAL: {reason}");
            }
            Err(_) => {}
        }
        for then in released.into_values().flatten() {
            then(outcome.clone().map_err(StoreError::CannotSync));
        }
    }
}

/// `fdatasync` the file at `path`, through `file` while it is still that file: SQLite keeps
/// the WAL for as long as a connection is open, but a reopened handle is cheap insurance
/// against syncing a file that is no longer the WAL.
fn sync_file(path: &Path, file: &mut Option<std::fs::File>) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let current = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let still_it = file
        .as_ref()
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.ino() == current.ino() && m.dev() == current.dev());
    if !still_it {
        *file = Some(std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?);
    }
    file.as_ref().expect("opened above").sync_data().map_err(|e| format!("{}: {e}", path.display()))
}

/// One batch's rows (see [`Store::commit_batch`]) inside `transaction`.
fn write_batch(
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
fn write_turns(connection: &mut Connection, turns: &[FinishedTurn]) -> Result<Vec<Option<i64>>, StoreError> {
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let reply_ids = turns.iter().map(|turn| write_turn(&transaction, turn)).collect::<Result<Vec<_>, _>>()?;
    transaction.commit()?;
    Ok(reply_ids)
}

/// One finished turn's rows (see [`Store::finish_turns`]) inside `transaction`; its queued
/// reply's id.
fn write_turn(transaction: &Connection, turn: &FinishedTurn) -> Result<Option<i64>, StoreError> {
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

/// A write for the [`StoreWriter`] thread, with where its outcome goes.
enum WriteRequest {
    Batch {
        channel: String,
        record: BatchRecord,
        now_ms: i64,
        done: tokio::sync::oneshot::Sender<Result<Vec<Option<i64>>, StoreError>>,
    },
    Turn {
        turn: FinishedTurn,
        done: tokio::sync::oneshot::Sender<Result<Option<i64>, StoreError>>,
    },
}

/// What one request's rows came to inside a group, before the group's commit.
enum Written {
    Batch(Result<Vec<Option<i64>>, StoreError>),
    Turn(Result<Option<i64>, StoreError>),
}

impl Written {
    fn failed(&self) -> bool {
        matches!(self, Written::Batch(Err(_)) | Written::Turn(Err(_)))
    }
}

/// One request's rows inside the group's transaction.
fn write_request(transaction: &Connection, request: &WriteRequest) -> Written {
    match request {
        WriteRequest::Batch { channel, record, now_ms, .. } => {
            Written::Batch(write_batch(transaction, channel, record, *now_ms))
        }
        WriteRequest::Turn { turn, .. } => Written::Turn(write_turn(transaction, turn)),
    }
}

/// Carries out the state database's hot writes — channel batches and finished turns from all
/// tasks — on a thread of its own, with group commits: while one commit is written, the
/// writes that arrive meanwhile gather for the next, so a burst costs a few transactions
/// instead of one per message, and no async worker waits for SQLite.
///
/// Each request keeps its own atomicity (a savepoint in the group): one that fails is rolled
/// back alone and reported to its caller; the others commit.
///
/// Commits do not wait for the disk. A second thread syncs the WAL and then runs what waited
/// for it ([`StoreWriter::after_sync`]: under `Durability::Full`, sending the replies just
/// queued): a sync carries every commit made before it started, since the WAL is written in
/// order, and while it runs the writer goes on committing — the next turn of a session, a
/// channel's inbound batch — instead of holding them up behind the disk.
pub struct StoreWriter {
    requests: std::sync::mpsc::Sender<WriteRequest>,
    /// To the WAL sync thread; `None` for a store in memory.
    syncs: Option<std::sync::mpsc::Sender<SyncRequest>>,
    durability: Durability,
}

/// What waits for the commits before it to be on the disk; told whether they are.
pub type AfterSync = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The most requests one group commit takes.
const GROUP_COMMIT_MAX: usize = 1024;

/// Test builds only: `SWITCHBOARD_FAULT_STORE_SLOW_MS=<n>` makes every group commit sleep `n`
/// ms before it is written — a slow disk — so a backlog through a slow store can be shown end
/// to end (e2e `bounds`). Read once, when the writer thread starts; release builds ignore it.
fn fault_slow_commit() -> impl Fn() {
    #[cfg(debug_assertions)]
    let delay = std::env::var("SWITCHBOARD_FAULT_STORE_SLOW_MS")
        .ok()
        .and_then(|ms| ms.parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .map(std::time::Duration::from_millis);
    #[cfg(not(debug_assertions))]
    let delay: Option<std::time::Duration> = None;
    move || {
        if let Some(delay) = delay {
            std::thread::sleep(delay);
        }
    }
}

impl StoreWriter {
    /// Start the writer thread (and the WAL sync thread for a store on disk, which observes
    /// each sync's duration into `sync_seconds`); they end when the writer is dropped.
    pub fn start(store: std::sync::Arc<Store>, sync_seconds: Histogram) -> StoreWriter {
        let commits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let idle = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let syncs = store.reader.is_some().then(|| {
            let (syncs, waiting) = std::sync::mpsc::channel::<SyncRequest>();
            let shared = std::sync::Arc::new(WalSyncs {
                wal: wal_path(&store.path),
                waiting: Mutex::new(waiting),
                idle: idle.clone(),
                commits: commits.clone(),
                synced: std::sync::atomic::AtomicU64::new(0),
                rounds: Mutex::new(Rounds::default()),
                failing: std::sync::atomic::AtomicBool::new(false),
                sync_seconds,
            });
            for _ in 0..SYNC_THREADS {
                let shared = shared.clone();
                let spawned =
                    std::thread::Builder::new().name("store-sync".into()).spawn(move || sync_wal_while_open(&shared));
                if let Err(e) = spawned {
                    // With no thread at all every `after_sync` is told the store stopped:
                    // replies stay queued and are sent after the next start.
                    tracing::error!("cannot start a store sync thread: {e}");
                }
            }
            syncs
        });
        let durability = store.durability;
        let nudge = syncs.clone();
        let (requests, incoming) = std::sync::mpsc::channel::<WriteRequest>();
        let spawned = std::thread::Builder::new().name("store-writer".into()).spawn(move || {
            let slow_commit = fault_slow_commit();
            while let Ok(first) = incoming.recv() {
                let mut group = vec![first];
                while group.len() < GROUP_COMMIT_MAX {
                    match incoming.try_recv() {
                        Ok(request) => group.push(request),
                        Err(_) => break,
                    }
                }
                slow_commit();
                store.write_group(group);
                commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // The sync threads sleep when nothing is to be synced: wake one for this.
                if idle.swap(false, std::sync::atomic::Ordering::SeqCst) {
                    if let Some(nudge) = &nudge {
                        let _ = nudge.send(SyncRequest::Nudge);
                    }
                }
            }
        });
        if let Err(e) = spawned {
            // Without the thread every request fails with `WriterStopped`; nothing is lost
            // (the messages are redelivered and the turns answered after the next start).
            tracing::error!("cannot start the store writer thread: {e}");
        }
        StoreWriter { requests, syncs, durability }
    }

    /// Run `then` once every commit made so far is as durable as `Durability` asks: at once
    /// under `Normal`, after the next sync of the WAL under `Full`. Calls run in the order
    /// they were made, so replies of one session leave in the order they were queued.
    pub fn after_sync(&self, then: AfterSync) {
        match &self.syncs {
            Some(syncs) if self.durability == Durability::Full => {
                if let Err(std::sync::mpsc::SendError(SyncRequest::Wait(then))) = syncs.send(SyncRequest::Wait(then)) {
                    then(Err(StoreError::WriterStopped));
                }
            }
            _ => then(Ok(())),
        }
    }

    /// Store `turn` with the next group commit; its queued reply's id. Committed, not
    /// necessarily on the disk: send the reply from [`Self::after_sync`].
    pub async fn finish(&self, turn: FinishedTurn) -> Result<Option<i64>, StoreError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.requests.send(WriteRequest::Turn { turn, done }).map_err(|_| StoreError::WriterStopped)?;
        result.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// [`Store::commit_batch`] with the next group commit.
    pub async fn commit_batch(
        &self,
        channel: &str,
        record: BatchRecord,
        now_ms: i64,
    ) -> Result<Vec<Option<i64>>, StoreError> {
        self.submit_batch(channel, record, now_ms).await
    }

    /// Queue `record` for the next group commit without waiting for it: the caller can go on
    /// with other work and await the outcome later. Batches submitted one after another
    /// commit in that order (all batches are in a round's first group).
    pub fn submit_batch(&self, channel: &str, record: BatchRecord, now_ms: i64) -> PendingBatch {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let request = WriteRequest::Batch { channel: channel.to_string(), record, now_ms, done };
        if let Err(std::sync::mpsc::SendError(WriteRequest::Batch { done, .. })) = self.requests.send(request) {
            let _ = done.send(Err(StoreError::WriterStopped));
        }
        PendingBatch { outcome }
    }
}

/// A batch on its way to the store ([`StoreWriter::submit_batch`]); awaiting it gives, per
/// inbound message in order, its new id or `None` for a redelivery.
pub struct PendingBatch {
    outcome: tokio::sync::oneshot::Receiver<Result<Vec<Option<i64>>, StoreError>>,
}

impl PendingBatch {
    /// An outcome known without the store (nothing to write).
    pub fn ready(outcome: Result<Vec<Option<i64>>, StoreError>) -> PendingBatch {
        let (done, pending) = tokio::sync::oneshot::channel();
        let _ = done.send(outcome);
        PendingBatch { outcome: pending }
    }
}

impl std::future::Future for PendingBatch {
    type Output = Result<Vec<Option<i64>>, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(StoreError::WriterStopped)))
    }
}

impl Store {
    /// Write `group` in one transaction, each request inside a savepoint of its own, and
    /// answer every request.
    fn write_group(&self, group: Vec<WriteRequest>) {
        let mut connection = self.connection.lock().unwrap();
        let outcome = (|| -> Result<Vec<Written>, StoreError> {
            // Every request straight into one transaction: savepoints cost a statement
            // journal copy of each page a request touches, and requests almost never fail.
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut written = Vec::with_capacity(group.len());
            for request in &group {
                let outcome = write_request(&transaction, request);
                if outcome.failed() {
                    break;
                }
                written.push(outcome);
            }
            if written.len() == group.len() {
                transaction.commit()?;
                return Ok(written);
            }
            // One failed, maybe half-written: start over with each request in a savepoint of
            // its own, so the one that fails is rolled back alone and the others stay.
            drop(transaction);
            let mut transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut written = Vec::with_capacity(group.len());
            for request in &group {
                let savepoint = transaction.savepoint()?;
                let outcome = write_request(&savepoint, request);
                if outcome.failed() {
                    // Dropping the savepoint rolls this request back.
                    drop(savepoint);
                } else {
                    savepoint.commit()?;
                }
                written.push(outcome);
            }
            transaction.commit()?;
            Ok(written)
        })();
        drop(connection);
        match outcome {
            Ok(written) => {
                for (request, outcome) in group.into_iter().zip(written) {
                    match (request, outcome) {
                        (WriteRequest::Batch { done, .. }, Written::Batch(result)) => {
                            let _ = done.send(result);
                        }
                        (WriteRequest::Turn { done, .. }, Written::Turn(result)) => {
                            let _ = done.send(result);
                        }
                        _ => unreachable!("outcomes are in request order"),
                    }
                }
            }
            Err(e) => {
                // The group did not commit: nothing of it is stored.
                let reason = e.to_string();
                for request in group {
                    match request {
                        WriteRequest::Batch { done, .. } => {
                            let _ = done.send(Err(StoreError::GroupFailed(reason.clone())));
                        }
                        WriteRequest::Turn { done, .. } => {
                            let _ = done.send(Err(StoreError::GroupFailed(reason.clone())));
                        }
                    }
                }
            }
        }
    }
}

/// Rows pruned by [`Store::prune`], by table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub turns: u64,
    pub dead_letters: u64,
    pub inbound: u64,
    pub outbound: u64,
}

/// Rows deleted per statement: the writer waits for the connection meanwhile.
const PRUNE_BATCH: u32 = 5_000;

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

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound(id: &str) -> Inbound {
        Inbound {
            message_id: id.into(),
            peer_kind: PeerKind::Channel,
            peer_id: "c1".into(),
            thread_root_id: String::new(),
            sender_id: "u1".into(),
            sender_name: "alice".into(),
            text: format!("hello {id}"),
            created_at_ms: 1,
        }
    }

    #[test]
    fn redelivered_inbound_is_recognised_and_state_saved_with_it() {
        let store = Store::in_memory().unwrap();
        let batch = BatchRecord {
            inbound: vec![inbound("p1"), inbound("p2")],
            adapter_state: Some((1, "{\"seq\":3}".into())),
            ..Default::default()
        };
        let ids = store.commit_batch("mm", &batch, 10).unwrap();
        assert!(ids.iter().all(Option::is_some));
        let again = BatchRecord { inbound: vec![inbound("p2"), inbound("p3")], ..Default::default() };
        let ids = store.commit_batch("mm", &again, 11).unwrap();
        assert_eq!(ids[0], None);
        assert!(ids[1].is_some());
        assert_eq!(store.adapter_state("mm").unwrap(), Some((1, "{\"seq\":3}".into())));
        assert_eq!(store.pending_inbound("mm").unwrap().len(), 3);
        assert!(store.pending_inbound("other").unwrap().is_empty());
    }

    #[test]
    fn a_finished_turn_queues_its_reply_and_keeps_history() {
        let store = Store::in_memory().unwrap();
        let target =
            DeliveryTarget { channel_instance: "mm".into(), conversation_id: "c1".into(), thread_root_id: "".into() };
        let ids =
            store.commit_batch("mm", &BatchRecord { inbound: vec![inbound("p1")], ..Default::default() }, 1).unwrap();
        let turn = FinishedTurn {
            inbound_id: ids[0].unwrap(),
            session_key: "k".into(),
            transcript: vec![
                Turn { role: "user".into(), content: "hi".into() },
                Turn { role: "assistant".into(), content: "hello".into() },
            ],
            message_id: "p1".into(),
            reply: Some((target, "hello".into())),
            finished_at_ms: 2,
        };
        let reply_id = store.finish_turn(&turn).unwrap().unwrap();
        assert!(store.pending_inbound("mm").unwrap().is_empty());
        assert_eq!(store.queued_replies("mm").unwrap()[0].id, reply_id);
        assert_eq!(store.history("k", 1).unwrap(), vec![Turn { role: "assistant".into(), content: "hello".into() }]);
        assert_eq!(store.history("k", 10).unwrap().len(), 2);
        let done = BatchRecord { delivered: vec![(reply_id as u64, "post1".into())], ..Default::default() };
        store.commit_batch("mm", &done, 3).unwrap();
        assert!(store.queued_replies("mm").unwrap().is_empty());
        assert_eq!(store.counts().unwrap().outbound_delivered, 1);
    }

    fn turn_answering(inbound_id: i64, session_key: &str, text: &str) -> FinishedTurn {
        FinishedTurn {
            inbound_id,
            session_key: session_key.into(),
            transcript: vec![Turn { role: "user".into(), content: text.into() }],
            message_id: format!("m{inbound_id}"),
            reply: Some((
                DeliveryTarget {
                    channel_instance: "mm".into(),
                    conversation_id: session_key.into(),
                    thread_root_id: "".into(),
                },
                format!("echo: {text}"),
            )),
            finished_at_ms: 2,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_grouped_together_are_each_stored_or_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path(), Durability::Full).unwrap());
        // One turn in the group fails inside SQLite; only it may be rolled back.
        store
            .connection
            .lock()
            .unwrap()
            .execute_batch(
                "CREATE TRIGGER poison BEFORE INSERT ON turns WHEN NEW.content = 't13'
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .unwrap();
        let writer = std::sync::Arc::new(StoreWriter::start(store.clone(), Histogram::new([0.001])));
        let batch =
            BatchRecord { inbound: (0..200).map(|i| inbound(&format!("p{i}"))).collect(), ..Default::default() };
        let ids: Vec<i64> =
            writer.commit_batch("mm", batch, 1).await.unwrap().into_iter().map(Option::unwrap).collect();
        let turns: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer.finish(turn_answering(id, &format!("s{}", i % 7), &format!("t{i}"))).await
                })
            })
            .collect();
        // Channel batches arrive among the turns (redeliveries of p0..p9 and new messages).
        let batches: Vec<_> = (0..10)
            .map(|i| {
                let writer = writer.clone();
                tokio::spawn(async move {
                    let record = BatchRecord {
                        inbound: vec![inbound(&format!("p{i}")), inbound(&format!("q{i}"))],
                        ..Default::default()
                    };
                    writer.commit_batch("mm", record, 3).await
                })
            })
            .collect();
        let mut reply_ids = Vec::new();
        for (i, task) in turns.into_iter().enumerate() {
            let outcome = task.await.unwrap();
            if i == 13 {
                assert!(outcome.unwrap_err().to_string().contains("poisoned"));
            } else {
                reply_ids.push((i, outcome.unwrap().unwrap()));
            }
        }
        for task in batches {
            let ids = task.await.unwrap().unwrap();
            assert_eq!(ids[0], None, "a redelivery is recognised");
            assert!(ids[1].is_some());
        }
        let queued = store.queued_replies("mm").unwrap();
        assert_eq!(queued.len(), 199);
        for (i, reply_id) in &reply_ids {
            let reply = queued.iter().find(|r| r.id == *reply_id).unwrap();
            assert_eq!(reply.text, format!("echo: t{i}"));
            assert_eq!(reply.target.conversation_id, format!("s{}", i % 7));
        }
        // The refused turn left nothing behind: its message is still to be answered.
        let pending: Vec<String> =
            store.pending_inbound("mm").unwrap().into_iter().map(|(_, m)| m.message_id).collect();
        let mut expected: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
        expected.push("p13".into());
        expected.sort();
        let mut pending = pending;
        pending.sort();
        assert_eq!(pending, expected);
        assert_eq!(store.history("s0", 1000).unwrap().len(), 29);
        assert_eq!(store.history("s6", 1000).unwrap().len(), 27, "t13 (of 28 in s6) was refused");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_reported_as_damaged() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATABASE_FILE), vec![0x5a; 8192]).unwrap();
        match Store::open(dir.path(), Durability::Normal) {
            Err(StoreError::Corrupt { .. }) => {}
            Err(other) => panic!("expected Corrupt, got {other}"),
            Ok(_) => panic!("opened a file full of junk"),
        }
    }

    #[test]
    fn reopening_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), Durability::Full).unwrap();
            store.commit_batch("mm", &BatchRecord { inbound: vec![inbound("p1")], ..Default::default() }, 1).unwrap();
        }
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        assert_eq!(store.pending_inbound("mm").unwrap().len(), 1);
    }

    #[test]
    fn a_version_2_database_keeps_its_pending_work_through_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        {
            let connection = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            connection.execute_batch(&MIGRATIONS[..2].join(";\n")).unwrap();
            connection.pragma_update(None, "user_version", 2).unwrap();
            connection
                .execute_batch(
                    "INSERT INTO inbound (channel_instance, message_id, peer_kind, peer_id, thread_root_id, sender_id,
                         sender_name, text, created_at_ms, received_at_ms, status)
                     VALUES ('mm', 'p1', 'channel', 'c', '', 'u', 'alice', 'hi', 1, 1, 'received'),
                            ('mm', 'p2', 'channel', 'c', '', 'u', 'alice', 'hi', 1, 1, 'answered');
                     INSERT INTO outbound (session_key, channel_instance, conversation_id, thread_root_id, text,
                         inbound_id, status, created_at_ms, updated_at_ms)
                     VALUES ('s', 'mm', 'c', '', 'queued one', 1, 'queued', 1, 1),
                            ('s', 'mm', 'c', '', 'sent one', 2, 'delivered', 1, 1);",
                )
                .unwrap();
        }
        let store = Store::open(dir.path(), Durability::Full).unwrap();
        let pending = store.pending_inbound("mm").unwrap();
        assert_eq!(pending.iter().map(|p| p.1.message_id.as_str()).collect::<Vec<_>>(), ["p1"]);
        let queued = store.queued_replies("mm").unwrap();
        assert_eq!(queued.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["queued one"]);
        let counts = store.counts().unwrap();
        assert_eq!((counts.inbound_pending, counts.outbound_queued, counts.outbound_delivered), (1, 1, 1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_wait_for_a_wal_sync_and_leave_in_the_order_they_were_queued() {
        for durability in [Durability::Full, Durability::Normal] {
            let dir = tempfile::tempdir().unwrap();
            let store = std::sync::Arc::new(Store::open(dir.path(), durability).unwrap());
            let writer = StoreWriter::start(store.clone(), Histogram::new([0.001]));
            let batch =
                BatchRecord { inbound: (0..40).map(|i| inbound(&format!("p{i}"))).collect(), ..Default::default() };
            let ids = writer.commit_batch("mm", batch, 1).await.unwrap();
            let (told, mut sent) = tokio::sync::mpsc::unbounded_channel();
            let mut queued = Vec::new();
            for (i, id) in ids.into_iter().enumerate() {
                let reply_id =
                    writer.finish(turn_answering(id.unwrap(), "s", &format!("t{i}"))).await.unwrap().unwrap();
                queued.push(reply_id);
                let told = told.clone();
                writer.after_sync(Box::new(move |synced| {
                    let _ = told.send(synced.map(|()| reply_id));
                }));
            }
            let mut left = Vec::new();
            while left.len() < queued.len() {
                let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), sent.recv()).await;
                left.push(outcome.expect("every reply is told").unwrap().expect("the WAL syncs"));
            }
            assert_eq!(left, queued, "{durability:?}: replies leave in the order they were queued");

            // Many waiters while commits keep coming: the syncs overlap and end in any order,
            // the answers still come in the order asked.
            let writer = std::sync::Arc::new(writer);
            let committing = {
                let writer = writer.clone();
                tokio::spawn(async move {
                    for round in 0..50 {
                        let inbound = (0..5).map(|i| inbound(&format!("q{round}-{i}"))).collect();
                        writer.commit_batch("mm", BatchRecord { inbound, ..Default::default() }, 1).await.unwrap();
                    }
                })
            };
            let (told, mut answered) = tokio::sync::mpsc::unbounded_channel();
            for asked in 0..1000 {
                let told = told.clone();
                writer.after_sync(Box::new(move |synced| {
                    let _ = told.send(synced.map(|()| asked));
                }));
                if asked % 20 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            committing.await.unwrap();
            for expected in 0..1000 {
                let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), answered.recv()).await;
                assert_eq!(outcome.expect("every waiter is told").unwrap().expect("the WAL syncs"), expected);
            }
        }
    }

    #[test]
    fn a_wal_that_cannot_be_synced_says_which_file() {
        let missing = Path::new("/nonexistent-switchboard-state/switchboard.db-wal");
        let error = sync_file(missing, &mut None).unwrap_err();
        assert!(error.contains("/nonexistent-switchboard-state/switchboard.db-wal"), "{error}");
    }

    #[test]
    fn pruning_deletes_finished_rows_past_their_cut_off_and_keeps_pending_work() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::Normal).unwrap();
        {
            let connection = store.connection.lock().unwrap();
            for (i, at) in [(1, 100), (2, 200), (3, 5_000)] {
                connection
                    .execute(
                        "INSERT INTO turns (session_key, role, content, message_id, at_ms) VALUES ('k', 'user', 'x', ?1, ?2)",
                        params![format!("m{i}"), at],
                    )
                    .unwrap();
                connection
                    .execute(
                        "INSERT INTO dead_letters (channel_instance, generation, event_kind, conversation_id, session_key, payload, error, at_ms)
                         VALUES ('mm', 1, 'ws_frame', 'c', 'k', 'p', 'e', ?1)",
                        [at],
                    )
                    .unwrap();
            }
            // Old: one answered, one still waiting; one new answered.
            for (id, status, at) in [("a", "answered", 100), ("w", "received", 100), ("n", "answered", 5_000)] {
                connection
                    .execute(
                        "INSERT INTO inbound (channel_instance, message_id, peer_kind, peer_id, thread_root_id, sender_id,
                         sender_name, text, created_at_ms, received_at_ms, status)
                         VALUES ('mm', ?1, 'channel', 'c', '', 'u', 'alice', 't', ?2, ?2, ?3)",
                        params![id, at, status],
                    )
                    .unwrap();
                let reply_status = if status == "received" { "queued" } else { "delivered" };
                connection
                    .execute(
                        "INSERT INTO outbound (session_key, channel_instance, conversation_id, thread_root_id, text, status,
                         created_at_ms, updated_at_ms) VALUES ('k', 'mm', 'c', '', 'r', ?1, ?2, ?2)",
                        params![reply_status, at],
                    )
                    .unwrap();
            }
        }
        let pruned = store.prune(Some(1_000), None, Some(1_000)).unwrap();
        assert_eq!(pruned, Pruned { turns: 2, dead_letters: 0, inbound: 1, outbound: 1 });
        let connection = store.connection.lock().unwrap();
        let count = |sql: &str| connection.query_row(sql, [], |row| row.get::<_, i64>(0)).unwrap();
        assert_eq!(count("SELECT count(*) FROM turns"), 1);
        assert_eq!(count("SELECT count(*) FROM dead_letters"), 3, "0 days: kept");
        assert_eq!(count("SELECT count(*) FROM inbound WHERE status = 'received'"), 1, "waiting work stays");
        assert_eq!(count("SELECT count(*) FROM outbound WHERE status = 'queued'"), 1, "queued replies stay");
        drop(connection);
        assert_eq!(store.prune(Some(1_000), Some(1_000), Some(1_000)).unwrap().dead_letters, 2);
    }
}
