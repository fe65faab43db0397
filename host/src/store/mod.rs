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
//!
//! Modules:
//! - `schema`: the migrations and bringing a database up to date.
//! - `queries`: the reads (sessions, history, pending work, the delivery queue, counts).
//! - `writes`: the rows each kind of write puts into a transaction, and the direct writes.
//! - `writer`: [`StoreWriter`], the thread that carries out writes with group commits.
//! - `sync`: the WAL sync threads (replies that wait for the disk) and the checkpointer.

mod queries;
mod schema;
mod sync;
mod writer;
mod writes;

#[cfg(test)]
mod tests;

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use rusqlite::{Connection, OpenFlags};

use self::sync::checkpoint_while_open;
pub use self::writer::{AfterSync, PendingBatch, StoreWriter};
use crate::{apartment::Inbound, session::DeliveryTarget};

/// The file name of the database inside the state directory.
pub const DATABASE_FILE: &str = "switchboard.db";

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

/// Rows pruned by [`Store::prune`], by table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub turns: u64,
    pub dead_letters: u64,
    pub inbound: u64,
    pub outbound: u64,
}
