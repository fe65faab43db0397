//! The writer thread: hot writes from all tasks, carried out in order with group commits.

use std::sync::Mutex;

use prometheus_client::metrics::histogram::Histogram;
use rusqlite::{Connection, TransactionBehavior};

use super::{
    sync::{sync_wal_while_open, wal_path, Rounds, SyncRequest, WalSyncs, SYNC_THREADS},
    writes::{write_batch, write_turn},
    BatchRecord, Durability, FinishedTurn, Store, StoreError,
};

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
            while let Ok(first) = incoming.recv() {
                let mut group = vec![first];
                while group.len() < GROUP_COMMIT_MAX {
                    match incoming.try_recv() {
                        Ok(request) => group.push(request),
                        Err(_) => break,
                    }
                }
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
