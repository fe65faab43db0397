//! A channel instance: one configured connection to a chat platform (`[channels.<id>]`).
//!
//! The instance task owns the instance's event queue, its [`Transport`] (sockets, HTTP,
//! timers) and its current adapter generation. Everything that happens — frames, responses,
//! timers, replies to deliver — is one ordered queue of events, drained in batches into the
//! generation's apartment. A swap happens *inside* this task, so events that arrive meanwhile
//! simply wait in the queue and reach the new generation in order (ARCHITECTURE.md §4).
//!
//! Modules, by concern (all are `impl Instance` blocks over the state defined here):
//! - this root: the instance's state, its task and event loop, and the graceful stop;
//! - `swap`: replacing a generation (export, construct, cut over, roll back on a failed
//!   first batch), refusing one, retiring and tearing down apartments;
//! - `containment`: a batch into the apartment whole or not at all — restart from the last
//!   good state after a panic, dead letters, the restart budget and halting, the watchdog
//!   that abandons an adapter call which does not return;
//! - `commit`: the write-ahead pipeline — a handled batch is stored before what it asked
//!   for is carried out, and carrying it out (transport, reply outcomes, health);
//! - `delivery`: the delivery window, replies held back beyond it, host-side redelivery.

mod commit;
mod containment;
mod delivery;
mod swap;
#[cfg(test)]
mod tests;

use commit::next_commit;

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use abi_stable::std_types::{RNone, RSome};
use switchboard_plugin_api::{Event, Handover, ShutdownReason, StateBlob};
use tokio::sync::{mpsc, oneshot};

use crate::{
    apartment::{Apartment, Command},
    bridge::{emit_adapter_log, HostBridge},
    catalog::Entry,
    config::ChannelConfig,
    ledger::{GenerationRecord, GenerationState, Ledger},
    loader::{self, FileDigest, LoadError},
    metrics::{self, Metrics},
    routing::Router,
    session::now_ms,
    store::{BatchRecord, DeadLetter, PendingBatch, StoreError},
    transport::Transport,
};

/// How many queued events go to the apartment in one hop.
const BATCH: usize = 256;

/// Replies handed to the adapter and not yet confirmed or failed, per channel instance, at most.
const DELIVERY_WINDOW: usize = 64;

/// Batches handled by the adapter whose commit is still in flight, at most. The adapter
/// handles the next batch while the store writes the last one; what a batch asked for is
/// carried out once it is stored, in order.
const COMMITS_IN_FLIGHT: usize = 4;

/// A generation that is loaded (on its apartment) but not yet constructed.
pub struct Prepared {
    pub number: u64,
    pub apartment: Apartment,
    pub source: PathBuf,
    pub digest: FileDigest,
}

/// Stage the plugin file and open it on a new apartment.
pub async fn prepare(
    entry: &Entry,
    generations_dir: PathBuf,
    channel: &str,
    number: u64,
    call_timeout: Duration,
) -> Result<Prepared, LoadError> {
    // Staged from the catalog's snapshot: byte for byte what was probed and validated.
    let source = entry.snapshot.clone();
    let digest = entry.digest.clone();
    let channel = channel.to_string();
    let (staged_digest, apartment) = tokio::task::spawn_blocking(move || {
        // The copy is what was probed (the same hash), or nothing is loaded.
        let (copy, staged) = loader::stage(&source, &generations_dir, &channel, number, &digest)?;
        let apartment = Apartment::open(&copy, format!("{channel}#{number}"), call_timeout);
        if apartment.is_err() {
            let _ = std::fs::remove_file(&copy);
        }
        Ok::<_, LoadError>((staged, apartment?))
    })
    .await
    .map_err(|e| LoadError::Stage { file: entry.path.clone(), reason: format!("staging task failed: {e}") })??;
    Ok(Prepared { number, apartment, source: entry.path.clone(), digest: staged_digest })
}

/// A generation of an adapter linked into this process, on an apartment of its own (the
/// unit tests' fake apartment).
#[cfg(test)]
fn prepare_in_process(
    module: switchboard_plugin_api::AdapterModuleRef,
    number: u64,
    call_timeout: Duration,
) -> Prepared {
    let apartment = Apartment::in_process(module, &format!("fake#{number}"), call_timeout);
    let digest = FileDigest { sha256_hex: format!("{number:0>64}"), len: 0 };
    Prepared { number, apartment, source: PathBuf::from("/nonexistent/fake"), digest }
}

pub enum Control {
    /// Start `prepared` with `config` and retire the current generation; rolls back on failure.
    Replace { prepared: Box<Prepared>, config: ChannelConfig, done: oneshot::Sender<Result<(), String>> },
    /// Stop gracefully, by `deadline` at the latest (an adapter that does not return by then
    /// is abandoned, see [`crate::apartment`]).
    Stop { deadline: tokio::time::Instant, done: oneshot::Sender<()> },
    /// Answer at once: the service manager's watchdog asks whether the instance's task still
    /// turns (see [`crate::notify`]).
    Heartbeat { answer: oneshot::Sender<()> },
}

/// The gateway's handle on a running instance.
#[derive(Clone)]
pub struct InstanceHandle {
    pub id: String,
    pub events: mpsc::UnboundedSender<Event>,
    control: mpsc::Sender<Control>,
    /// Set while the instance has no generation because its last one was abandoned (hung):
    /// the reload controller starts a new one of the current build.
    vacant: Arc<AtomicBool>,
}

impl InstanceHandle {
    pub async fn replace(&self, prepared: Prepared, config: ChannelConfig) -> Result<(), String> {
        let (done, result) = oneshot::channel();
        self.control
            .send(Control::Replace { prepared: Box::new(prepared), config, done })
            .await
            .map_err(|_| "the channel instance is gone".to_string())?;
        result.await.unwrap_or_else(|_| Err("the channel instance is gone".into()))
    }

    /// Stop gracefully; returns by `deadline` whatever the adapter does.
    pub async fn stop(&self, deadline: tokio::time::Instant) {
        let (done, stopped) = oneshot::channel();
        let stopping = async {
            if self.control.send(Control::Stop { deadline, done }).await.is_ok() {
                let _ = stopped.await;
            }
        };
        if tokio::time::timeout_at(deadline, stopping).await.is_err() {
            tracing::warn!(channel = %self.id, "channel instance did not stop by the deadline; leaving it");
        }
    }

    /// Resolves once the instance's task has answered a heartbeat, or is gone (a stopped
    /// instance has nothing to be stuck in). How long it takes is the watchdog's measure.
    pub async fn heartbeat(&self) {
        let (answer, answered) = oneshot::channel();
        if self.control.send(Control::Heartbeat { answer }).await.is_ok() {
            let _ = answered.await;
        }
    }

    /// The instance waits for a new generation (its last one was abandoned).
    pub fn is_vacant(&self) -> bool {
        self.vacant.load(Ordering::SeqCst)
    }
}

struct Running {
    number: u64,
    apartment: Apartment,
    events_handled: u64,
    /// Constructed cold and no batch through yet: a restart hands it the same cold start.
    cold_start: bool,
}

/// A batch the adapter handled, on its way to the store: what it asked for waits for the
/// commit (write ahead).
struct Committing {
    generation: u64,
    commands: Vec<Command>,
    /// The adapter's state went with it (if the commit fails, it is still unstored).
    storing_state: bool,
    inbound: usize,
    /// When the batch's first event was taken off the queue (a reply's latency starts there).
    taken_at: Instant,
    outcome: PendingBatch,
}

/// Who a pending reply is for, for the delivery log line.
struct PendingReply {
    session_key: String,
    conversation_id: String,
}

pub struct Shared {
    pub router: Arc<Router>,
    pub metrics: Arc<Metrics>,
    pub ledger: Ledger,
    pub http: reqwest::Client,
    /// What channel instances without `ca_file` connect with (`http` is its HTTP client).
    pub tls: crate::tls::ChannelTls,
    /// The largest WebSocket message a channel's socket takes (`gateway.ws_max_message_bytes`).
    pub ws_max_message_bytes: usize,
    /// Where an instance whose task died is reported (the reload controller restarts it).
    pub supervisor: mpsc::Sender<crate::gateway::ControlMessage>,
    /// Restarts allowed per instance within the window (`gateway.adapter_restart_*`).
    pub adapter_restarts: (u32, Duration),
    /// How long one adapter call may take (`gateway.adapter_call_timeout_ms`).
    pub adapter_call_timeout: Duration,
    /// How long an instance's WebSockets may all be down before `/readyz` fails
    /// (`gateway.disconnected_grace_ms`).
    pub disconnected_grace: Duration,
}

struct Instance {
    id: String,
    config: ChannelConfig,
    shared: Arc<Shared>,
    events: mpsc::UnboundedReceiver<Event>,
    control: mpsc::Receiver<Control>,
    transport: Transport,
    current: Option<Running>,
    /// Events that arrived while no generation was running; delivered to the next one.
    parked: Vec<Event>,
    pending_replies: HashMap<u64, PendingReply>,
    /// Handled batches waiting for their commit, oldest first.
    committing: VecDeque<Committing>,
    /// Replies waiting for room in the delivery window, oldest first. The host keeps them,
    /// not the adapter: its state (exported after every batch) stays small under a backlog.
    delivery_backlog: VecDeque<Event>,
    /// The last state stored for the adapter (handed to a generation that starts without
    /// a predecessor: the first one of this process, or after its predecessor died).
    saved_state: Option<StateBlob>,
    /// `saved_state` is newer than the one in the store.
    state_unstored: bool,
    /// Replies the chat server confirmed, not yet marked delivered in the store: they go with
    /// the next batch that is stored, at the latest after [`STATE_STORE_EVERY`], and always
    /// with the adapter's state (see [`Instance::submit`]).
    confirmations_unstored: Vec<(u64, String)>,
    /// When the adapter's state was last written to the store.
    state_stored_at: Option<Instant>,
    /// When the running generation last handled a batch (the end of a swap's pause).
    handled_at: Option<Instant>,
    /// No generation has run on this transport yet: nothing of an earlier one survives.
    cold: bool,
    /// WebSockets that opened and have not closed (for `/status`).
    websockets_up: std::collections::BTreeSet<u64>,
    /// The adapter asked for a WebSocket: only an open one means the platform was reached.
    asked_for_websocket: bool,
    /// The platform answered (told to the ledger once, for start-up readiness).
    reached: bool,
    /// Set while a new generation handles its first batch after a swap: a failure then is not
    /// retried on it but rolls back to the generation it replaced (the failure goes here).
    trial: Option<Option<String>>,
    /// Replies the adapter gave up on (retryable) and how often the host sent them again.
    host_retries: HashMap<u64, u32>,
    /// When the adapter was restarted after a panic, within the budget window.
    restarts: VecDeque<Instant>,
    /// Shared with [`InstanceHandle::is_vacant`].
    vacant: Arc<AtomicBool>,
    /// Set when stopping: no adapter call may last past it.
    stop_by: Option<tokio::time::Instant>,
    /// Events waiting for the adapter (`switchboard_queue_depth`), set at each loop turn.
    queue_depth: prometheus_client::metrics::gauge::Gauge,
    /// When the batch being handled was taken from the queue: where a reply's latency starts.
    batch_taken_at: Instant,
}

/// How often the host hands a reply back to the adapter after it gave up (retryable), and
/// how long it waits first (times the round).
const HOST_DELIVERY_ROUNDS: u32 = 5;
const HOST_RETRY_AFTER: Duration = Duration::from_secs(20);

/// How long a graceful stop waits for the answers of HTTP requests in flight.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(2);

/// How often, at most, the adapter's state goes to the store under load. Storing it less often
/// than it changes is safe (a crash resumes from an older cursor: the replayed messages are
/// recognised as seen, and deliveries look before they post again); at tens of kilobytes it
/// was most of what every batch wrote. Swaps and restarts hand over the state in memory.
const STATE_STORE_EVERY: Duration = Duration::from_millis(100);

/// Start a channel instance with its first generation.
pub async fn spawn(id: String, config: ChannelConfig, prepared: Prepared, shared: Arc<Shared>) -> InstanceHandle {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (control_tx, control) = mpsc::channel(8);
    shared.router.register_instance(&id, events_tx.clone());
    let tls = crate::tls::ChannelTls::for_channel(&id, config.ca_file.as_ref(), &shared.tls);
    let transport =
        Transport::new(&id, events_tx.clone(), tls, shared.ws_max_message_bytes, shared.metrics.transport(&id));
    let queue_depth = shared.metrics.queue_depth.get_or_create(&metrics::channel(&id)).clone();
    let saved_state = match shared.router.adapter_state_async(&id).await {
        Ok(saved) => saved.map(|(format_version, data)| StateBlob { format_version, data: data.into() }),
        Err(e) => {
            shared.metrics.store_errors.inc();
            tracing::error!(channel = %id, "cannot read the saved adapter state; the adapter starts fresh: {e}");
            None
        }
    };
    let mut instance = Instance {
        id: id.clone(),
        config: config.clone(),
        shared,
        events,
        control,
        transport,
        current: None,
        parked: Vec::new(),
        pending_replies: HashMap::new(),
        committing: VecDeque::new(),
        delivery_backlog: VecDeque::new(),
        saved_state,
        state_unstored: false,
        confirmations_unstored: Vec::new(),
        state_stored_at: None,
        handled_at: None,
        cold: true,
        trial: None,
        websockets_up: Default::default(),
        asked_for_websocket: false,
        reached: false,
        host_retries: HashMap::new(),
        restarts: VecDeque::new(),
        vacant: Arc::new(AtomicBool::new(false)),
        stop_by: None,
        queue_depth,
        batch_taken_at: Instant::now(),
    };
    let vacant = instance.vacant.clone();
    let (done, _) = oneshot::channel();
    instance.replace(prepared, config, done).await;
    // Before any live event is handled: what the last process left unanswered goes first.
    instance.shared.router.recover(&id).await;
    let supervisor = instance.shared.supervisor.clone();
    let channel = id.clone();
    tokio::spawn(async move {
        use futures_util::FutureExt;
        // A panic in host code must not silently stop a channel while /status says running.
        if let Err(panic) = std::panic::AssertUnwindSafe(instance.run()).catch_unwind().await {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            let died = crate::gateway::ControlMessage::InstanceDied { channel, reason };
            let _ = supervisor.send(died).await;
        }
    });
    InstanceHandle { id, events: events_tx, control: control_tx, vacant }
}

impl Instance {
    async fn run(mut self) {
        loop {
            self.queue_depth.set((self.events.len() + self.parked.len()) as i64);
            tokio::select! {
                biased;
                control = self.control.recv() => match control {
                    Some(Control::Replace { prepared, config, done }) => {
                        self.replace(*prepared, config, done).await;
                        self.feed_parked().await;
                        self.release_deliveries().await;
                    }
                    Some(Control::Stop { deadline, done }) => {
                        self.stop(deadline).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Control::Heartbeat { answer }) => {
                        let _ = answer.send(());
                    }
                    None => {
                        let deadline = tokio::time::Instant::now() + self.shared.adapter_call_timeout;
                        self.stop(deadline).await;
                        return;
                    }
                },
                outcome = next_commit(&mut self.committing), if !self.committing.is_empty() => {
                    let committed = self.committing.pop_front().expect("a commit was awaited");
                    self.carry_out(committed, outcome);
                    self.release_deliveries().await;
                }
                () = tokio::time::sleep(STATE_STORE_EVERY), if self.state_unstored || !self.confirmations_unstored.is_empty() => {
                    let generation = self.current.as_ref().map_or(0, |r| r.number);
                    self.submit(generation, Vec::new(), None, true).await;
                }
                Some(first) = self.events.recv(), if self.committing.len() < COMMITS_IN_FLIGHT => {
                    #[cfg(debug_assertions)]
                    inject_task_fault(&first);
                    #[cfg(debug_assertions)]
                    inject_task_stall(&first).await;
                    self.batch_taken_at = Instant::now();
                    let mut batch = Vec::with_capacity(16);
                    batch.push(first);
                    while batch.len() < BATCH {
                        match self.events.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    let batch = self.hold_back_deliveries(batch);
                    if !batch.is_empty() {
                        self.dispatch(batch).await;
                    }
                    self.release_deliveries().await;
                }
            }
        }
    }

    /// Hand what waited while no generation ran to the running one, a batch at a time.
    async fn feed_parked(&mut self) {
        while self.current.is_some() && !self.parked.is_empty() {
            let take = self.parked.len().min(BATCH);
            let piece: Vec<Event> = self.parked.drain(..take).collect();
            let piece = self.hold_back_deliveries(piece);
            self.dispatch(piece).await;
        }
    }

    /// How long the next adapter call may take: the call timeout, or less while stopping.
    fn call_budget(&self) -> Duration {
        let timeout = self.shared.adapter_call_timeout;
        match self.stop_by {
            Some(by) => by.saturating_duration_since(tokio::time::Instant::now()).min(timeout),
            None => timeout,
        }
    }

    /// The host handle of generation `generation`; a warm one lists what it inherits.
    fn host_handle(&self, generation: u64, cold: bool) -> switchboard_plugin_api::HostHandle {
        HostBridge {
            channel_instance: self.id.clone(),
            generation,
            sessions: self.shared.router.sessions(),
            handed_over: if cold { Vec::new() } else { self.transport.open_resources() },
        }
        .into_handle()
    }

    async fn stop(&mut self, stop_by: tokio::time::Instant) {
        // Every adapter call from here on ends by `stop_by` (an adapter that does not is
        // abandoned): a stop never waits on plugin code past its deadline.
        self.stop_by = Some(stop_by);
        self.settle().await;
        // Requests in flight (a reply being posted) are let finish and their answers handed
        // to the adapter first, so the state stored last knows what was posted: the next start
        // need not look for it, and cannot race a request the server is still handling.
        let deadline = (tokio::time::Instant::now() + IN_FLIGHT_GRACE).min(stop_by);
        while self.current.is_some() && self.transport.http_in_flight() > 0 {
            let Ok(Some(first)) = tokio::time::timeout_at(deadline, self.events.recv()).await else { break };
            self.batch_taken_at = Instant::now();
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match self.events.try_recv() {
                    Ok(event) => batch.push(event),
                    Err(_) => break,
                }
            }
            let batch = self.hold_back_deliveries(batch);
            self.dispatch(batch).await;
            self.settle().await;
        }
        if let Some(running) = self.current.as_ref() {
            let number = running.number;
            if let Ok((outcomes, state)) = running
                .apartment
                .run_within(self.call_budget(), |resident| {
                    let handled = resident.handle_all(vec![Event::Shutdown { reason: ShutdownReason::Stopping }]);
                    (handled, resident.export_state())
                })
                .await
            {
                let commands: Vec<Command> = outcomes.into_iter().flatten().flatten().collect();
                // The last state (cursor, deliveries) is what the next start resumes from.
                // Inbound it hands over now is stored, for the next start to answer.
                self.submit(number, commands, state.ok(), true).await;
                if let Some(mut last) = self.committing.pop_back() {
                    if let Err(e) = (&mut last.outcome).await {
                        self.shared.metrics.store_errors.inc();
                        tracing::error!(channel = %self.id, generation = number, "cannot store the adapter's last state: {e}");
                    }
                    for command in last.commands {
                        if !matches!(command, Command::Inbound(_)) {
                            self.execute(number, command);
                        }
                    }
                }
            }
            // Give close frames a moment to go out before the sockets are dropped.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.retire_current(false);
        self.transport.shut_down();
        self.shared.router.unregister_instance(&self.id);
        if !self.parked.is_empty() {
            tracing::warn!(channel = %self.id, events = self.parked.len(), "instance stopped with events no generation handled");
        }
        if !self.delivery_backlog.is_empty() {
            tracing::info!(channel = %self.id, replies = self.delivery_backlog.len(), "replies still queued; sent after the next start");
        }
    }
}

/// Test builds only: `SWITCHBOARD_FAULT_TASK_PANIC=<text>` makes the instance task itself
/// panic on a frame holding `<text>` (host code failing, not the adapter), so the supervision
/// of instance tasks can be shown end to end; with `SWITCHBOARD_FAULT_TASK_PANIC_ONCE=<file>`
/// only while that file exists (it is removed as the fault fires).
#[cfg(debug_assertions)]
fn inject_task_fault(event: &Event) {
    if let (Event::WsFrame { text, .. }, Ok(marker)) = (event, std::env::var("SWITCHBOARD_FAULT_TASK_PANIC")) {
        if !marker.is_empty() && text.as_str().contains(marker.as_str()) {
            if let Some(once) = std::env::var_os("SWITCHBOARD_FAULT_TASK_PANIC_ONCE") {
                if std::fs::remove_file(once).is_err() {
                    return;
                }
            }
            panic!("fault injected into the instance task");
        }
    }
}

/// The event that hands a dead letter to its channel instance again (`POST
/// /dead-letters/{id}/replay`), rebuilt from what the store kept of it (its kind and payload,
/// see `containment::dead_letter`). Only text frames can be: their payload is the whole frame.
/// A response or a reply is not kept whole, and its request or delivery is long gone.
pub fn replay_of(event_kind: &str, payload: &str) -> Option<Event> {
    match event_kind {
        "ws_frame" | "ws_frame_replayed" => Some(Event::WsFrameReplayed { text: payload.into() }),
        _ => None,
    }
}

/// Test builds only: `SWITCHBOARD_FAULT_TASK_STALL=<text>` makes the instance task stall for
/// `SWITCHBOARD_FAULT_TASK_STALL_MS` (default 3000) on the first frame holding `<text>` — host
/// code stuck, so the service manager's watchdog can be shown to go quiet. It blocks its async
/// worker thread, or with `SWITCHBOARD_FAULT_TASK_STALL_AWAIT=1` waits in an `.await` that takes
/// that long (a task stuck while the runtime runs on).
#[cfg(debug_assertions)]
async fn inject_task_stall(event: &Event) {
    static STALLED: AtomicBool = AtomicBool::new(false);
    let Ok(marker) = std::env::var("SWITCHBOARD_FAULT_TASK_STALL") else { return };
    let Event::WsFrame { text, .. } = event else { return };
    if marker.is_empty() || !text.as_str().contains(marker.as_str()) || STALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let ms = std::env::var("SWITCHBOARD_FAULT_TASK_STALL_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let stall = Duration::from_millis(ms);
    if std::env::var_os("SWITCHBOARD_FAULT_TASK_STALL_AWAIT").is_some() {
        tracing::warn!(stall_ms = ms, "fault injected: the instance task waits without answering");
        tokio::time::sleep(stall).await;
    } else {
        tracing::warn!(stall_ms = ms, "fault injected: the instance task blocks its worker");
        std::thread::sleep(stall);
    }
}

fn event_kind(event: &Event) -> &'static str {
    match event {
        Event::Started { .. } => "started",
        Event::WsOpened { .. } => "ws_opened",
        Event::WsFrame { .. } => "ws_frame",
        Event::WsClosed { .. } => "ws_closed",
        Event::HttpResponse { .. } => "http_response",
        Event::HttpFailed { .. } => "http_failed",
        Event::TimerFired { .. } => "timer_fired",
        Event::DeliverReply(_) => "deliver_reply",
        Event::AgentWorking { .. } => "agent_working",
        Event::Shutdown { .. } => "shutdown",
        Event::WsFrameSkipped { .. } => "ws_frame_skipped",
        Event::ReplyMayHaveGoneOut { .. } => "reply_may_have_gone_out",
        Event::WsBinaryFrame { .. } => "ws_binary_frame",
        Event::HttpBytesResponse { .. } => "http_bytes_response",
        Event::HttpResponseSkipped { .. } => "http_response_skipped",
        Event::StreamOpened { .. } => "stream_opened",
        Event::StreamData { .. } => "stream_data",
        Event::StreamLine { .. } => "stream_line",
        Event::StreamClosed { .. } => "stream_closed",
        Event::WsFrameReplayed { .. } => "ws_frame_replayed",
        _ => "unknown",
    }
}
