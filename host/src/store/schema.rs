//! The schema: its migrations, and bringing a database up to date at open.

use rusqlite::TransactionBehavior;

use super::{Store, StoreError};

/// Each entry migrates the schema from version `index` to `index + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // 3 → 4: the session registry keeps only some sessions in memory and reads the rest from
    // here: an adapter's listing of its instance's sessions by key prefix is an index range.
    "CREATE INDEX sessions_by_channel ON sessions (channel_instance, key);",
    // 4 → 5: a dead letter an operator handed to its channel instance again (`switchboard
    // dead-letters replay`) says when, so that it is handed over once.
    "ALTER TABLE dead_letters ADD COLUMN replayed_at_ms INTEGER;",
];

impl Store {
    pub(super) fn migrate(&self) -> Result<(), StoreError> {
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
}
