//! The writer thread: every write, from all tasks and adapter threads, carried out in the
//! order it was submitted, with group commits; and the reads that must see those writes.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::histogram::Histogram;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{
    queries,
    sync::{sync_wal_while_open, wal_path, Rounds, SyncRequest, WalSyncs, SYNC_THREADS},
    writes::{write_batch, write_dead_letter, write_inbound_status, write_session, write_turn},
    BatchRecord, DeadLetter, Durability, FinishedTurn, QueuedReply, ReplayClaim, Store, StoreError,
};
use crate::{apartment::Inbound, session::Session};

/// One write for the writer thread: its rows, and where its outcome goes. Type-erased, so
/// that one queue keeps every kind of write in submission order.
trait Job: Send {
    /// Put the rows into the group's transaction; whether that worked (when not, the group
    /// rolls this job back alone).
    fn write(&mut self, transaction: &Connection) -> bool;
    /// Tell the outcome of [`Job::write`], once the group committed.
    fn answer(self: Box<Self>);
    /// Tell that the group did not commit: nothing of it is stored.
    fn fail(self: Box<Self>, error: StoreError);
}

/// A [`Job`] from its rows (run again if the group starts over) and its answer.
struct Write<T, Rows, Answer> {
    rows: Rows,
    answer: Answer,
    outcome: Option<Result<T, StoreError>>,
}

impl<T, Rows, Answer> Job for Write<T, Rows, Answer>
where
    T: Send,
    Rows: FnMut(&Connection) -> Result<T, StoreError> + Send,
    Answer: FnOnce(Result<T, StoreError>) + Send,
{
    fn write(&mut self, transaction: &Connection) -> bool {
        let outcome = (self.rows)(transaction);
        let written = outcome.is_ok();
        self.outcome = Some(outcome);
        written
    }

    fn answer(self: Box<Self>) {
        let Write { answer, outcome, .. } = *self;
        answer(outcome.unwrap_or_else(|| Err(StoreError::GroupFailed("not written".into()))));
    }

    fn fail(self: Box<Self>, error: StoreError) {
        let Write { answer, .. } = *self;
        answer(Err(error));
    }
}

/// What the writer thread is sent.
enum Request {
    Write(Box<dyn Job>),
    /// A read that must see every write submitted before it: it runs on the writer's
    /// connection once those are committed, before any write submitted after it.
    Read(Box<dyn FnOnce(&Connection) + Send>),
}

/// Carries out the state database's writes — channel batches, finished turns, new sessions,
/// statuses, dead letters, from all tasks and adapter threads — on a thread of its own, in the
/// order they were submitted (a new session is stored before the turn that refers to it), with
/// group commits: while one commit is written, the writes that arrive meanwhile gather for
/// the next, so a burst costs a few transactions instead of one per message, and no async
/// worker or adapter thread waits for SQLite. Reads that must see those writes (the adapter
/// state at a start, the delivery queue) go through it too, in order.
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
    store: Arc<Store>,
    requests: std::sync::mpsc::Sender<Request>,
    /// To the WAL sync thread; `None` for a store in memory.
    syncs: Option<std::sync::mpsc::Sender<SyncRequest>>,
    durability: Durability,
}

/// What waits for the commits before it to be on the disk; told whether they are.
pub type AfterSync = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// The most requests one group commit takes.
const GROUP_COMMIT_MAX: usize = 1024;

impl StoreWriter {
    /// Start the writer thread (and the WAL sync thread for a store on disk, which observes
    /// each sync's duration into `sync_seconds`); they end when the writer is dropped.
    pub fn start(store: Arc<Store>, sync_seconds: Histogram) -> StoreWriter {
        let commits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let idle = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let syncs = store.on_disk().then(|| {
            let (syncs, waiting) = std::sync::mpsc::channel::<SyncRequest>();
            let shared = Arc::new(WalSyncs {
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
        let slow = slow_store_fault();
        let (requests, incoming) = std::sync::mpsc::channel::<Request>();
        let writing = store.clone();
        let spawned = std::thread::Builder::new().name(WRITER_THREAD.into()).spawn(move || {
            // A read that ended the last group: it runs before anything submitted after it.
            let mut next: Option<Request> = None;
            loop {
                let first = match next.take() {
                    Some(request) => request,
                    None => match incoming.recv() {
                        Ok(request) => request,
                        Err(_) => return,
                    },
                };
                let first = match first {
                    Request::Read(read) => {
                        read(&writing.connection.lock().unwrap());
                        continue;
                    }
                    Request::Write(job) => job,
                };
                let mut group = vec![first];
                while group.len() < GROUP_COMMIT_MAX {
                    match incoming.try_recv() {
                        Ok(Request::Write(job)) => group.push(job),
                        Ok(read @ Request::Read(_)) => {
                            // The writes before it commit first, so that it sees them.
                            next = Some(read);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Some(slow) = slow {
                    std::thread::sleep(slow);
                }
                writing.write_group(group);
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
        StoreWriter { store, requests, syncs, durability }
    }

    /// The store this writer writes to (for reads that need no ordering).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
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

    /// Queue a write: `rows` with the next group commit, then `answer` with its outcome, on
    /// the writer thread. Never waits: an adapter thread or a tokio worker may call it.
    fn submit<T: Send + 'static>(
        &self,
        rows: impl FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
        answer: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) {
        let job: Box<dyn Job> = Box::new(Write { rows, answer, outcome: None });
        if let Err(std::sync::mpsc::SendError(Request::Write(job))) = self.requests.send(Request::Write(job)) {
            job.fail(StoreError::WriterStopped);
        }
    }

    /// [`Self::submit`], its outcome awaited through the returned [`Pending`]. `what` names the
    /// write in the log line that reports its failure when nobody awaits it.
    fn submit_pending<T: Send + 'static>(
        &self,
        what: &'static str,
        rows: impl FnMut(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Pending<T> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.submit(rows, move |result| {
            if let Err(Err(e)) = done.send(result) {
                tracing::error!("{what}: {e}");
            }
        });
        Pending { outcome }
    }

    /// Run `read` on the writer thread once every write submitted before is committed, before
    /// any write submitted after it.
    fn read_in_order<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Pending<T> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let request = Request::Read(Box::new(move |connection| {
            let _ = done.send(read(connection));
        }));
        // A writer gone drops `done` with the request: the reader is told `WriterStopped`.
        let _ = self.requests.send(request);
        Pending { outcome }
    }

    /// Store `turn` with the next group commit; its queued reply's id. Committed, not
    /// necessarily on the disk: send the reply from [`Self::after_sync`]. Submitted at the
    /// call, so it is stored after everything submitted before (the session's insert).
    pub fn finish(&self, turn: FinishedTurn) -> Pending<Option<i64>> {
        self.submit_pending("cannot store a finished turn", move |transaction| write_turn(transaction, &turn))
    }

    /// [`Store::commit_batch`] with the next group commit.
    pub fn commit_batch(&self, channel: &str, record: BatchRecord, now_ms: i64) -> PendingBatch {
        self.submit_batch(channel, record, now_ms)
    }

    /// Queue `record` for the next group commit without waiting for it: the caller can go on
    /// with other work and await the outcome later. Batches submitted one after another
    /// commit in that order, as every write does.
    pub fn submit_batch(&self, channel: &str, record: BatchRecord, now_ms: i64) -> PendingBatch {
        let channel = channel.to_string();
        self.submit_pending("cannot store a batch of adapter events", move |transaction| {
            write_batch(transaction, &channel, &record, now_ms)
        })
    }

    /// Queue a new session's row ahead of everything submitted after it (the turns and batches
    /// that refer to it), without waiting: `stored` is told the outcome on the writer thread.
    /// A session stored before stays as it is.
    pub fn insert_session(&self, session: Session, stored: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        self.submit(move |transaction| write_session(transaction, &session), stored);
    }

    /// Set an inbound message's status (e.g. `no_agent`: it will not be answered).
    pub fn set_inbound_status(&self, inbound_id: i64, status: &str) -> Pending<()> {
        let status = status.to_string();
        self.submit_pending("cannot store an inbound message's status", move |transaction| {
            write_inbound_status(transaction, inbound_id, &status)
        })
    }

    /// Keep an event an adapter failed on twice; its dead letter's id.
    pub fn add_dead_letter(&self, letter: DeadLetter, now_ms: i64) -> Pending<i64> {
        self.submit_pending("cannot store a dead letter", move |transaction| {
            write_dead_letter(transaction, &letter, now_ms)
        })
    }

    /// Mark dead letter `id` replayed at `now_ms` unless it was before: a replay hands it over
    /// once, however many operators ask at the same time.
    pub fn claim_replay(&self, id: i64, now_ms: i64) -> Pending<ReplayClaim> {
        self.submit_pending("cannot mark a dead letter replayed", move |transaction| {
            let claimed = transaction.execute(
                "UPDATE dead_letters SET replayed_at_ms = ?2 WHERE id = ?1 AND replayed_at_ms IS NULL",
                params![id, now_ms],
            )?;
            if claimed == 1 {
                return Ok(ReplayClaim::Claimed);
            }
            let found: Option<Option<i64>> = transaction
                .query_row("SELECT replayed_at_ms FROM dead_letters WHERE id = ?1", [id], |row| row.get(0))
                .optional()?;
            Ok(match found {
                Some(Some(at)) => ReplayClaim::AlreadyReplayed(at),
                // Not replayed, yet not claimed: cannot be, short of a concurrent delete.
                Some(None) | None => ReplayClaim::NotFound,
            })
        })
    }

    /// Undo [`Self::claim_replay`] of a dead letter that could not be handed over after all.
    pub fn unclaim_replay(&self, id: i64) -> Pending<()> {
        self.submit_pending("cannot undo a dead letter's replay mark", move |transaction| {
            transaction.execute("UPDATE dead_letters SET replayed_at_ms = NULL WHERE id = ?1", [id])?;
            Ok(())
        })
    }

    /// Delete dead letter `id`; whether there was one.
    pub fn drop_dead_letter(&self, id: i64) -> Pending<bool> {
        self.submit_pending("cannot delete a dead letter", move |transaction| {
            Ok(transaction.execute("DELETE FROM dead_letters WHERE id = ?1", [id])? == 1)
        })
    }

    /// Mark a queued reply as failed for good, with the reason (it stays in the store).
    pub fn mark_failed(&self, reply_id: u64, error: &str, now_ms: i64) -> Pending<()> {
        let record = BatchRecord { failed: vec![(reply_id, error.to_string())], ..Default::default() };
        // The channel only matters for inbound rows and adapter state, which this has none of.
        self.submit_pending("cannot mark a reply failed", move |transaction| {
            write_batch(transaction, "", &record, now_ms).map(drop)
        })
    }

    /// The adapter state saved for `channel`, after every batch submitted before is stored.
    pub fn adapter_state(&self, channel: &str) -> Pending<Option<(u32, String)>> {
        let channel = channel.to_string();
        self.read_in_order(move |connection| queries::adapter_state(connection, &channel))
    }

    /// Replies of `channel` queued and not yet confirmed, oldest first, after every batch
    /// submitted before (with the confirmations it carried) is stored.
    pub fn queued_replies(&self, channel: &str) -> Pending<Vec<QueuedReply>> {
        let channel = channel.to_string();
        self.read_in_order(move |connection| queries::queued_replies(connection, &channel))
    }

    /// Resolves once every write submitted before it is stored (also the fire-and-forget
    /// ones): the last thing a graceful stop waits for.
    pub fn flush(&self) -> Pending<()> {
        self.read_in_order(|_| Ok(()))
    }

    /// Inbound messages of `channel` recorded but not answered yet, oldest first, after every
    /// write submitted before is stored.
    pub fn pending_inbound(&self, channel: &str) -> Pending<Vec<(i64, Inbound)>> {
        let channel = channel.to_string();
        self.read_in_order(move |connection| queries::pending_inbound(connection, &channel))
    }
}

/// The writer thread's name (tests check that writes run there, not on their caller).
pub const WRITER_THREAD: &str = "store-writer";

/// Debug builds: `SWITCHBOARD_FAULT_STORE_SLOW_MS=<n>` makes every group commit sleep `n` ms
/// first, a slow disk for the tests of a writer backlog. Read once, at the writer's start.
fn slow_store_fault() -> Option<std::time::Duration> {
    #[cfg(debug_assertions)]
    {
        let slow = slow_store_fault_from(&std::env::var("SWITCHBOARD_FAULT_STORE_SLOW_MS").ok()?);
        if let Some(slow) = slow {
            tracing::warn!(ms = slow.as_millis() as u64, "fault injection: every store group commit sleeps first");
        }
        slow
    }
    #[cfg(not(debug_assertions))]
    None
}

/// The sleep `SWITCHBOARD_FAULT_STORE_SLOW_MS` asks for; none for 0 or what is not a number.
#[cfg(debug_assertions)]
fn slow_store_fault_from(value: &str) -> Option<std::time::Duration> {
    value.trim().parse::<u64>().ok().filter(|&ms| ms > 0).map(std::time::Duration::from_millis)
}

/// A write or ordered read on its way through the [`StoreWriter`]; awaiting it gives its
/// outcome. The write happens whether or not it is awaited: [`Pending::detach`] one whose
/// outcome nobody needs, and a failure is logged instead.
pub struct Pending<T> {
    outcome: tokio::sync::oneshot::Receiver<Result<T, StoreError>>,
}

/// A batch on its way to the store ([`StoreWriter::submit_batch`]); awaiting it gives, per
/// inbound message in order, its new id or `None` for a redelivery.
pub type PendingBatch = Pending<Vec<Option<i64>>>;

impl<T> Pending<T> {
    /// An outcome known without the store (nothing to write).
    pub fn ready(outcome: Result<T, StoreError>) -> Pending<T> {
        let (done, pending) = tokio::sync::oneshot::channel();
        let _ = done.send(outcome);
        Pending { outcome: pending }
    }

    /// Let the write go on without waiting for it; a failure is logged on the writer thread.
    pub fn detach(self) {}
}

impl<T> std::future::Future for Pending<T> {
    type Output = Result<T, StoreError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.outcome)
            .poll(cx)
            .map(|received| received.unwrap_or(Err(StoreError::WriterStopped)))
    }
}

impl Store {
    /// Write `group` in one transaction, each job inside a savepoint of its own if one fails,
    /// and answer every job.
    fn write_group(&self, mut group: Vec<Box<dyn Job>>) {
        let mut connection = self.connection.lock().unwrap();
        let outcome = (|| -> Result<(), StoreError> {
            // Every job straight into one transaction: savepoints cost a statement journal
            // copy of each page a job touches, and jobs almost never fail.
            let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if group.iter_mut().all(|job| job.write(&transaction)) {
                transaction.commit()?;
                return Ok(());
            }
            // One failed, maybe half-written: start over with each job in a savepoint of its
            // own, so the one that fails is rolled back alone and the others stay.
            drop(transaction);
            let mut transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for job in &mut group {
                let savepoint = transaction.savepoint()?;
                if job.write(&savepoint) {
                    savepoint.commit()?;
                } else {
                    // Dropping the savepoint rolls this job back.
                    drop(savepoint);
                }
            }
            Ok(transaction.commit()?)
        })();
        drop(connection);
        match outcome {
            Ok(()) => group.into_iter().for_each(|job| job.answer()),
            Err(e) => {
                // The group did not commit: nothing of it is stored.
                let reason = e.to_string();
                for job in group {
                    job.fail(StoreError::GroupFailed(reason.clone()));
                }
            }
        }
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::slow_store_fault_from;

    #[test]
    fn the_slow_store_fault_takes_milliseconds() {
        assert_eq!(slow_store_fault_from(" 250 "), Some(std::time::Duration::from_millis(250)));
        assert_eq!(slow_store_fault_from("0"), None);
        assert_eq!(slow_store_fault_from("slow"), None);
    }
}
