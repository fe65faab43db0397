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
//! In the running gateway every write goes through the [`StoreWriter`] thread, in the order it
//! was submitted (a new session before the turn that refers to it), and its group commits put
//! the writes of many tasks into one transaction. Nothing on an async worker or an adapter's
//! thread waits for the disk: writes are queued to the writer, reads that must see them go
//! through it in order, and other reads run on read connections from a blocking thread (the
//! `*_async` methods) or, for the session registry, on a connection of its own.
//!
//! Modules:
//! - `schema`: the migrations and bringing a database up to date.
//! - `queries`: the reads (sessions, history, pending work, the delivery queue, counts) and
//!   the read connections they run on.
//! - `writes`: the rows each kind of write puts into a transaction, and the direct writes
//!   (tests, imports, start-up).
//! - `writer`: [`StoreWriter`], the thread that carries out writes and ordered reads, with
//!   group commits; [`Pending`], a write or read on its way.
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

pub use self::writer::{AfterSync, Pending, PendingBatch, StoreWriter, WRITER_THREAD};
use self::{
    queries::{open_reader, ReadPool},
    sync::checkpoint_while_open,
};
use crate::{apartment::Inbound, session::DeliveryTarget};

/// The file name of the database inside the state directory.
pub const DATABASE_FILE: &str = "switchboard.db";

/// An event an adapter could not handle, twice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeadLetter {
    pub channel_instance: String,
    pub generation: u64,
    pub event_kind: String,
    pub conversation_id: String,
    pub session_key: String,
    pub payload: String,
    pub error: String,
}

/// A stored dead letter, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub at_ms: i64,
    /// When an operator replayed it (it is handed over once).
    pub replayed_at_ms: Option<i64>,
    #[serde(flatten)]
    pub letter: DeadLetter,
}

/// What claiming a dead letter for a replay found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayClaim {
    /// Marked replayed now: the caller hands it over.
    Claimed,
    /// Replayed before, at this time.
    AlreadyReplayed(i64),
    NotFound,
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
    #[error("a state database read was cancelled: the gateway is stopping")]
    ReadCancelled,
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
    /// The writer's connection: the [`StoreWriter`] thread's (and the direct writes', for
    /// tests, imports and start-up).
    connection: std::sync::Arc<Mutex<Connection>>,
    /// Read connections for reads off the writer's path (history, counts): under WAL they
    /// read the last commit while the writer commits or waits for the disk. `None` in memory.
    readers: Option<ReadPool>,
    /// The session registry's read connection (see [`Store::session`]). `None` in memory.
    sessions_reader: Option<Mutex<Connection>>,
}

impl Store {
    /// Open (or create) the database in `state_dir` and bring its schema up to date.
    pub fn open(state_dir: &Path, durability: Durability) -> Result<Store, StoreError> {
        let path = state_dir.join(DATABASE_FILE);
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(&path, flags)
            .map_err(|e| StoreError::Open { path: path.clone(), reason: e.to_string() })?;
        let mut store = Store::init(path, connection, durability)?;
        store.sessions_reader = Some(Mutex::new(open_reader(&store.path)?));
        store.readers = Some(ReadPool::new(&store.path));
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
        let store = Store {
            path,
            connection: std::sync::Arc::new(Mutex::new(connection)),
            readers: None,
            sessions_reader: None,
            durability,
        };
        store.migrate()?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hold the writer's connection from another thread until the returned guard is dropped,
    /// as a long commit or a stalled disk would: what needs the writer waits meanwhile, what
    /// must not need it goes on.
    #[cfg(test)]
    pub(crate) fn hold_writer(self: &std::sync::Arc<Self>) -> HeldWriter {
        let (locked, is_locked) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let store = self.clone();
        let holder = std::thread::spawn(move || {
            let _held = store.connection.lock().unwrap();
            let _ = locked.send(());
            let _ = released.recv();
        });
        is_locked.recv().unwrap();
        HeldWriter { release: Some(release), holder: Some(holder) }
    }

    /// Whether the database is a file (it has read connections and a WAL to sync).
    fn on_disk(&self) -> bool {
        self.readers.is_some()
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

/// The writer's connection held by another thread ([`Store::hold_writer`]); released on drop.
#[cfg(test)]
pub(crate) struct HeldWriter {
    release: Option<std::sync::mpsc::Sender<()>>,
    holder: Option<std::thread::JoinHandle<()>>,
}

#[cfg(test)]
impl Drop for HeldWriter {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(holder) = self.holder.take() {
            let _ = holder.join();
        }
    }
}
