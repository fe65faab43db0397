//! Lanes: each session's turns run one at a time, in arrival order; different sessions run
//! concurrently, up to a global cap. A lane holds at most `capacity` waiting turns: a turn
//! beyond that is handed back to the caller, whose message then waits in the store until the
//! lane has room (`routing`).

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{mpsc, Semaphore};

/// A turn as it waits in a lane: what builds its future, not the future. An agent turn's
/// future is kilobytes before it first runs; the closure holds just the message and the
/// session, so a full lane costs a tenth of the memory (e2e `bounds`).
pub type Turn = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A [`Turn`] that runs `make()`'s future once its lane gets to it.
pub fn turn<F>(make: impl FnOnce() -> F + Send + 'static) -> Turn
where
    F: Future<Output = ()> + Send + 'static,
{
    Box::new(move || Box::pin(make()))
}

#[derive(Clone)]
pub struct Lanes {
    inner: Arc<LanesInner>,
}

struct LanesInner {
    lanes: Mutex<HashMap<String, mpsc::Sender<Turn>>>,
    permits: Arc<Semaphore>,
    capacity: usize,
    idle_after: Duration,
    /// Turns submitted and not finished, across all lanes.
    busy: AtomicUsize,
}

impl Lanes {
    pub fn new(max_concurrent_turns: usize, capacity: usize) -> Self {
        Self {
            inner: Arc::new(LanesInner {
                lanes: Mutex::new(HashMap::new()),
                permits: Arc::new(Semaphore::new(max_concurrent_turns.max(1))),
                capacity: capacity.max(1),
                idle_after: Duration::from_secs(60),
                busy: AtomicUsize::new(0),
            }),
        }
    }

    /// Queue `turn` on the lane of `session_key`, starting the lane if needed. A full lane
    /// hands the turn back.
    pub fn submit(&self, session_key: &str, turn: Turn) -> Result<(), Turn> {
        // Sending under the lock pairs with the lane's retirement check under the same lock:
        // a lane never retires with a turn still queued.
        let mut lanes = self.inner.lanes.lock().unwrap();
        let turn = match lanes.get(session_key) {
            Some(lane) => match lane.try_send(turn) {
                Ok(()) => {
                    self.inner.busy.fetch_add(1, Ordering::SeqCst);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Full(turn)) => return Err(turn),
                Err(mpsc::error::TrySendError::Closed(turn)) => turn,
            },
            None => turn,
        };
        let (tx, rx) = mpsc::channel(self.inner.capacity);
        let _ = tx.try_send(turn);
        self.inner.busy.fetch_add(1, Ordering::SeqCst);
        lanes.insert(session_key.to_string(), tx);
        tokio::spawn(run_lane(self.inner.clone(), session_key.to_string(), rx));
        Ok(())
    }

    pub fn active(&self) -> usize {
        self.inner.lanes.lock().unwrap().len()
    }

    /// Turns waiting or running.
    pub fn busy(&self) -> usize {
        self.inner.busy.load(Ordering::SeqCst)
    }
}

async fn run_lane(inner: Arc<LanesInner>, key: String, mut turns: mpsc::Receiver<Turn>) {
    loop {
        let turn = match tokio::time::timeout(inner.idle_after, turns.recv()).await {
            Ok(Some(turn)) => turn,
            Ok(None) => return,
            Err(_idle) => {
                let mut lanes = inner.lanes.lock().unwrap();
                match turns.try_recv() {
                    Ok(turn) => {
                        drop(lanes);
                        turn
                    }
                    Err(_) => {
                        lanes.remove(&key);
                        return;
                    }
                }
            }
        };
        let Ok(_permit) = inner.permits.clone().acquire_owned().await else { return };
        turn().await;
        inner.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_of_one_session_run_in_order_and_sessions_run_concurrently() {
        let lanes = Lanes::new(4, 16);
        let log = Arc::new(Mutex::new(Vec::new()));
        // Session a's first turn waits for session b's turn: with lanes that were not
        // concurrent this would never finish.
        let (b_ran_tx, b_ran_rx) = tokio::sync::oneshot::channel::<()>();
        let mut b_ran_rx = Some(b_ran_rx);
        for i in 0..5u64 {
            let log = log.clone();
            let wait_for_b = if i == 0 { b_ran_rx.take() } else { None };
            let _ = lanes.submit(
                "a",
                turn(move || async move {
                    if let Some(b) = wait_for_b {
                        let _ = b.await;
                    }
                    tokio::time::sleep(Duration::from_millis(5 - i)).await;
                    log.lock().unwrap().push(format!("a{i}"));
                }),
            );
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let _ = lanes.submit(
            "a",
            turn(move || async move {
                let _ = done_tx.send(());
            }),
        );
        let _ = lanes.submit(
            "b",
            turn(move || async move {
                let _ = b_ran_tx.send(());
            }),
        );
        tokio::time::timeout(Duration::from_secs(5), done_rx).await.expect("lanes deadlocked").unwrap();
        let log = log.lock().unwrap().clone();
        assert_eq!(log, vec!["a0", "a1", "a2", "a3", "a4"]);
        assert_eventually_idle(&lanes).await;
    }

    async fn assert_eventually_idle(lanes: &Lanes) {
        for _ in 0..100 {
            if lanes.busy() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} turns still counted as busy", lanes.busy());
    }

    #[tokio::test]
    async fn a_full_lane_hands_the_turn_back() {
        let lanes = Lanes::new(1, 2);
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        // The first turn runs (and blocks), two wait, the fourth does not fit.
        let _ = lanes.submit(
            "a",
            turn(move || async move {
                let _ = hold.await;
            }),
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(lanes.submit("a", turn(|| async {})).is_ok());
        assert!(lanes.submit("a", turn(|| async {})).is_ok());
        assert!(lanes.submit("a", turn(|| async {})).is_err());
        assert!(lanes.submit("b", turn(|| async {})).is_ok(), "other sessions are not affected");
        let _ = release.send(());
        assert_eventually_idle(&lanes).await;
    }
}
