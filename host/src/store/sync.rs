//! Durability off the writer's path: the WAL sync threads (what waits for the disk) and the
//! checkpointer that copies the WAL into the database.

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use prometheus_client::metrics::histogram::Histogram;
use rusqlite::Connection;

use super::{AfterSync, Store, StoreError};

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

impl Store {
    /// Write the WAL back into the database and empty it (at start-up).
    pub fn truncate_wal(&self) -> Result<(), StoreError> {
        self.connection.lock().unwrap().execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")?;
        Ok(())
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
pub(super) fn checkpoint_while_open(checkpointer: &Connection, writer: &std::sync::Weak<Mutex<Connection>>) {
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
pub(super) fn wal_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Threads that sync the WAL; while one syncs, the next waiting reply starts another sync
/// instead of waiting for that one to end first.
pub(super) const SYNC_THREADS: usize = 2;

/// What the WAL sync threads share.
pub(super) struct WalSyncs {
    pub(super) wal: PathBuf,
    pub(super) waiting: Mutex<std::sync::mpsc::Receiver<SyncRequest>>,
    /// A sync thread sleeps until something is to be synced: the writer nudges it then.
    pub(super) idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Group commits made so far (counted by the writer).
    pub(super) commits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Group commits known to be on the disk.
    pub(super) synced: std::sync::atomic::AtomicU64,
    /// Rounds of waiters, each with the ticket of the sync it waits for.
    pub(super) rounds: Mutex<Rounds>,
    pub(super) failing: std::sync::atomic::AtomicBool,
    pub(super) sync_seconds: Histogram,
}

/// What the sync threads are sent.
pub(super) enum SyncRequest {
    /// Run this once the commits made so far are on the disk.
    Wait(AfterSync),
    /// A commit was made while the threads slept (sync it within [`WAL_FLUSH_EVERY`]).
    Nudge,
}

#[derive(Default)]
pub(super) struct Rounds {
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
pub(super) fn sync_wal_while_open(syncs: &WalSyncs) {
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
pub(super) fn sync_file(path: &Path, file: &mut Option<std::fs::File>) -> Result<(), String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wal_that_cannot_be_synced_says_which_file() {
        let missing = Path::new("/nonexistent-switchboard-state/switchboard.db-wal");
        let error = sync_file(missing, &mut None).unwrap_err();
        assert!(error.contains("/nonexistent-switchboard-state/switchboard.db-wal"), "{error}");
    }
}
