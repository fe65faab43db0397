//! A channel instance: one configured connection to a chat platform (`[channels.<id>]`).
//!
//! The instance task owns the instance's event queue, its [`Transport`] (sockets, HTTP,
//! timers) and its current adapter generation. Everything that happens — frames, responses,
//! timers, replies to deliver — is one ordered queue of events, drained in batches into the
//! generation's apartment. A swap happens *inside* this task, so events that arrive meanwhile
//! simply wait in the queue and reach the new generation in order (ARCHITECTURE.md §4).

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::Arc,
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
) -> Result<Prepared, LoadError> {
    let source = entry.path.clone();
    let digest = entry.digest.clone();
    let channel = channel.to_string();
    let (staged_digest, apartment) = tokio::task::spawn_blocking(move || {
        // The copy is what was probed (the same hash), or nothing is loaded.
        let (copy, staged) = loader::stage(&source, &generations_dir, &channel, number, &digest)?;
        let apartment = Apartment::open(&copy, format!("{channel}#{number}"));
        if apartment.is_err() {
            let _ = std::fs::remove_file(&copy);
        }
        Ok::<_, LoadError>((staged, apartment?))
    })
    .await
    .map_err(|e| LoadError::Stage { file: entry.path.clone(), reason: format!("staging task failed: {e}") })??;
    Ok(Prepared { number, apartment, source: entry.path.clone(), digest: staged_digest })
}

pub enum Control {
    /// Start `prepared` with `config` and retire the current generation; rolls back on failure.
    Replace {
        prepared: Box<Prepared>,
        config: ChannelConfig,
        done: oneshot::Sender<Result<(), String>>,
    },
    Stop {
        done: oneshot::Sender<()>,
    },
}

/// The gateway's handle on a running instance.
#[derive(Clone)]
pub struct InstanceHandle {
    pub id: String,
    pub events: mpsc::UnboundedSender<Event>,
    control: mpsc::Sender<Control>,
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

    pub async fn stop(&self) {
        let (done, stopped) = oneshot::channel();
        if self.control.send(Control::Stop { done }).await.is_ok() {
            let _ = stopped.await;
        }
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
    /// Set while a new generation handles its first batch after a swap: a failure then is not
    /// retried on it but rolls back to the generation it replaced (the failure goes here).
    trial: Option<Option<String>>,
    /// Replies the adapter gave up on (retryable) and how often the host sent them again.
    host_retries: HashMap<u64, u32>,
    /// When the adapter was restarted after a panic, within the budget window.
    restarts: VecDeque<Instant>,
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

/// Whether a batch can have moved the adapter's state (everything but typing indicators).
fn moves_state(event: &Event) -> bool {
    !matches!(event, Event::AgentWorking { .. })
}

/// The outcome of the oldest batch in flight.
async fn next_commit(committing: &mut VecDeque<Committing>) -> Result<Vec<Option<i64>>, StoreError> {
    match committing.front_mut() {
        Some(oldest) => (&mut oldest.outcome).await,
        None => std::future::pending().await,
    }
}

/// Start a channel instance with its first generation.
pub async fn spawn(id: String, config: ChannelConfig, prepared: Prepared, shared: Arc<Shared>) -> InstanceHandle {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (control_tx, control) = mpsc::channel(8);
    shared.router.register_instance(&id, events_tx.clone());
    let tls = crate::tls::ChannelTls::for_channel(&id, config.ca_file.as_ref(), &shared.tls);
    let transport = Transport::new(&id, events_tx.clone(), tls, shared.ws_max_message_bytes);
    let saved_state = match shared.router.store().adapter_state(&id) {
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
        host_retries: HashMap::new(),
        restarts: VecDeque::new(),
    };
    let (done, _) = oneshot::channel();
    instance.replace(prepared, config, done).await;
    // Before any live event is handled: what the last process left unanswered goes first.
    instance.shared.router.recover(&id);
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
    InstanceHandle { id, events: events_tx, control: control_tx }
}

impl Instance {
    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                control = self.control.recv() => match control {
                    Some(Control::Replace { prepared, config, done }) => {
                        self.replace(*prepared, config, done).await;
                        self.feed_parked().await;
                        self.release_deliveries().await;
                    }
                    Some(Control::Stop { done }) => {
                        self.stop().await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop().await;
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

    /// Keep the replies beyond the delivery window (and all after them, for order) back.
    fn hold_back_deliveries(&mut self, batch: Vec<Event>) -> Vec<Event> {
        let mut room = DELIVERY_WINDOW.saturating_sub(self.pending_replies.len());
        let mut admitted = Vec::with_capacity(batch.len());
        for event in batch {
            if matches!(event, Event::DeliverReply(_)) {
                if room == 0 || !self.delivery_backlog.is_empty() {
                    self.delivery_backlog.push_back(event);
                    continue;
                }
                room -= 1;
            }
            admitted.push(event);
        }
        admitted
    }

    /// Hand held-back replies to the adapter as the window frees up.
    async fn release_deliveries(&mut self) {
        while !self.delivery_backlog.is_empty() && self.current.is_some() {
            let room = DELIVERY_WINDOW.saturating_sub(self.pending_replies.len());
            if room == 0 {
                return;
            }
            let take = room.min(self.delivery_backlog.len());
            let batch: Vec<Event> = self.delivery_backlog.drain(..take).collect();
            self.dispatch(batch).await;
        }
    }

    /// Hand events to the running generation and carry out what it asks.
    ///
    /// A batch goes through whole or not at all: its commands are only carried out once the
    /// adapter handled every event of it. When the adapter fails on an event (a caught panic),
    /// nothing of the batch has happened yet; the adapter is rebuilt from its last good state
    /// (the state exported after the previous batch) and handed the batch again. An event it
    /// fails on twice is dead-lettered and the rest of the batch goes on without it.
    async fn dispatch(&mut self, batch: Vec<Event>) {
        if self.current.is_none() {
            self.parked.extend(batch);
            return;
        }
        for event in &batch {
            match event {
                Event::DeliverReply(reply) => {
                    self.pending_replies.insert(
                        reply.reply_id,
                        PendingReply {
                            session_key: reply.session_key.to_string(),
                            conversation_id: reply.target.conversation_id.to_string(),
                        },
                    );
                }
                Event::WsClosed { conn, .. } => {
                    self.transport.forget_socket(*conn);
                    self.websockets_up.remove(conn);
                    self.shared.ledger.set_connections(&self.id, self.websockets_up.len(), now_ms());
                }
                Event::WsOpened { conn } => {
                    self.websockets_up.insert(*conn);
                    self.shared.ledger.set_connections(&self.id, self.websockets_up.len(), now_ms());
                }
                Event::TimerFired { timer } => self.transport.timer_fired(*timer),
                _ => {}
            }
        }
        let export = batch.iter().any(moves_state);
        let mut batch = batch;
        let mut failures: HashMap<usize, u32> = HashMap::new();
        let mut dead: Vec<usize> = Vec::new();
        let mut substituted: Vec<usize> = Vec::new();
        let mut restart: Option<Handover> = None;
        let (handled, exported, number) = loop {
            let Some(running) = self.current.as_ref() else {
                // Halted (or the apartment died) while retrying: keep the rest for later.
                self.parked.extend(batch.into_iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e));
                return;
            };
            let number = running.number;
            let live: Vec<usize> = (0..batch.len()).filter(|i| !dead.contains(i)).collect();
            let events: Vec<Event> = live.iter().map(|&i| batch[i].clone()).collect();
            let rebuild =
                restart.take().map(|handover| (self.host_handle(number), self.config.adapter_config_json(), handover));
            let restarted = rebuild.is_some();
            let outcome = running
                .apartment
                .run(move |resident| {
                    let mut events = events;
                    if let Some((host, config_json, handover)) = rebuild {
                        if let Err(e) = resident.reconstruct(host, &config_json, handover) {
                            return (vec![Err(e)], None);
                        }
                        events.insert(0, Event::Started { generation: number });
                    }
                    let expected = events.len();
                    let handled = resident.handle_all(events);
                    let whole = handled.len() == expected && handled.iter().all(Result::is_ok);
                    let state = if whole && export { Some(resident.export_state()) } else { None };
                    (handled, state)
                })
                .await;
            let (mut handled, exported) = match outcome {
                Ok(outcome) => outcome,
                Err(gone) => {
                    tracing::error!(channel = %self.id, generation = number, "{gone}; the instance has no running adapter");
                    self.retire_current(false);
                    continue;
                }
            };
            let failed_at = handled.iter().position(Result::is_err);
            let Some(position) = failed_at else {
                if restarted {
                    tracing::info!(channel = %self.id, generation = number, events = live.len(), "restarted adapter handled the batch");
                }
                break (handled, exported, number);
            };
            let error = match handled.swap_remove(position) {
                Err(error) => error.to_string(),
                Ok(_) => unreachable!("position points at an error"),
            };
            self.shared.metrics.adapter_panics.get_or_create(&metrics::channel(&self.id)).inc();
            if let Some(trial) = self.trial.as_mut() {
                // A new generation failing its first batch: nothing of it was carried out, and
                // the generation it replaced takes over again (`replace`).
                *trial = Some(format!("{} failed: {error}", event_kind(&batch[live[position]])));
                return;
            }
            // With a rebuild, position 0 is its `Started`: the restart itself failed.
            let index = if restarted { position.checked_sub(1).map(|p| live[p]) } else { Some(live[position]) };
            match index {
                None => {
                    tracing::error!(channel = %self.id, generation = number, "the restarted adapter failed to start: {error}")
                }
                Some(index) => {
                    let attempts = failures.entry(index).or_insert(0);
                    *attempts += 1;
                    let kind = event_kind(&batch[index]);
                    if *attempts >= 2 {
                        if substituted.contains(&index) {
                            tracing::error!(channel = %self.id, generation = number, event = kind, "adapter failed on the stand-in for a dead letter too; dropped: {error}");
                            dead.push(index);
                        } else {
                            self.dead_letter(number, &batch[index], &error).await;
                            // Where the adapter tracks a cursor, it is told to move past the
                            // event instead of acting on it (else a resume brings it back).
                            match stand_in(&batch[index], &error) {
                                Some(stand_in) => {
                                    batch[index] = stand_in;
                                    substituted.push(index);
                                    failures.remove(&index);
                                }
                                None => dead.push(index),
                            }
                        }
                    } else {
                        tracing::error!(channel = %self.id, generation = number, event = kind, "adapter failed on an event; restarting it from its last good state to try once more: {error}");
                    }
                }
            }
            if !self.may_restart() {
                let remaining =
                    batch.iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e.clone()).collect();
                self.halt(remaining, &error);
                return;
            }
            self.shared.metrics.adapter_restarts.get_or_create(&metrics::channel(&self.id)).inc();
            // The earlier batches' actions first: the handover lists the open connections.
            self.settle().await;
            let cold = self.current.as_ref().is_some_and(|r| r.cold_start);
            restart = Some(Handover {
                generation: number,
                previous_state: self.saved_state.clone().map_or(RNone, RSome),
                connections: self.transport.open_connections().into(),
                cold,
            });
        };
        self.handled_at = Some(Instant::now());
        // These frames are handled (or dead-lettered): their socket may read as many more.
        self.transport.frames_handled(
            batch.iter().filter(|e| matches!(e, Event::WsFrame { .. } | Event::WsFrameSkipped { .. })).count(),
        );
        let count = handled.len() as u64;
        if let Some(running) = self.current.as_mut() {
            running.events_handled += count;
            running.cold_start = false;
        }
        let id = self.id.clone();
        self.shared.ledger.update(&id, number, |r| r.events_handled += count);
        self.shared.metrics.events_dispatched.get_or_create(&metrics::channel(&id)).inc_by(count);
        let commands: Vec<Command> = handled.into_iter().flatten().flatten().collect();
        let state = match exported {
            Some(Ok(state)) => Some(state),
            Some(Err(e)) => {
                tracing::error!(channel = %id, generation = number, "adapter could not export its state: {e}");
                None
            }
            None => None,
        };
        // Write ahead: the batch's inbound, reply outcomes and the adapter's cursor are stored
        // together before anything the batch asked for is carried out.
        self.submit(number, commands, state, false).await;
    }

    /// Carry out what a stored batch asked for.
    fn carry_out(&mut self, committed: Committing, outcome: Result<Vec<Option<i64>>, StoreError>) {
        let Committing { generation, commands, storing_state, inbound, .. } = committed;
        let inbound_ids = match outcome {
            Ok(ids) => ids,
            Err(e) => {
                if storing_state {
                    self.state_unstored = true;
                }
                self.shared.metrics.store_errors.inc();
                tracing::error!(
                    channel = %self.id,
                    generation,
                    inbound,
                    "cannot store this batch; its messages are answered but a crash now could lose them: {e}"
                );
                // Without the store there is no telling a redelivery; answer rather than drop.
                (0..inbound).map(|_| Some(0)).collect()
            }
        };
        let mut inbound_ids = inbound_ids.into_iter();
        for command in commands {
            match command {
                Command::Inbound(inbound) => match inbound_ids.next().flatten() {
                    Some(inbound_id) => self.shared.router.route(&self.id, inbound_id, inbound),
                    None => {
                        self.shared.metrics.inbound_redelivered.get_or_create(&metrics::channel(&self.id)).inc();
                        tracing::info!(
                            channel = %self.id,
                            message_id = %inbound.message_id,
                            "inbound seen before (replay or catch-up); not answered twice"
                        );
                    }
                },
                command => self.execute(generation, command),
            }
        }
    }

    /// Wait for every batch in flight to be stored and carry out what each asked for.
    async fn settle(&mut self) {
        while let Some(mut committed) = self.committing.pop_front() {
            let outcome = (&mut committed.outcome).await;
            self.carry_out(committed, outcome);
        }
    }

    fn host_handle(&self, generation: u64) -> switchboard_plugin_api::HostHandle {
        HostBridge { channel_instance: self.id.clone(), generation, sessions: self.shared.router.sessions() }
            .into_handle()
    }

    /// Count a restart against the instance's budget; whether it is allowed.
    fn may_restart(&mut self) -> bool {
        let (budget, window) = self.shared.adapter_restarts;
        let now = Instant::now();
        self.restarts.retain(|at| now.duration_since(*at) < window);
        if self.restarts.len() >= budget as usize {
            return false;
        }
        self.restarts.push_back(now);
        true
    }

    /// Give up on an event the adapter failed on twice: store it, say which session it
    /// concerned, and settle a reply it carried as failed.
    async fn dead_letter(&mut self, generation: u64, event: &Event, error: &str) {
        let kind = event_kind(event);
        let conversation = match self.current.as_ref() {
            Some(running) => {
                let probe = event.clone();
                running.apartment.run(move |resident| resident.conversation_of(&probe)).await.ok().flatten()
            }
            None => None,
        }
        .unwrap_or_default();
        let sessions: Vec<String> = if conversation.is_empty() {
            Vec::new()
        } else {
            self.shared
                .router
                .sessions()
                .list(&self.id, "")
                .into_iter()
                .filter(|s| s.target.conversation_id == conversation)
                .map(|s| s.key)
                .collect()
        };
        let session = if sessions.is_empty() { "(none yet)".to_string() } else { sessions.join(",") };
        let payload = match event {
            Event::WsFrame { text, .. } => text.to_string(),
            Event::HttpResponse { body, status, .. } => format!("HTTP {status}: {body}"),
            Event::DeliverReply(reply) => reply.text.to_string(),
            other => format!("{other:?}"),
        };
        self.shared.metrics.dead_letters.get_or_create(&metrics::channel(&self.id)).inc();
        let letter = DeadLetter {
            channel_instance: self.id.clone(),
            generation,
            event_kind: kind.to_string(),
            conversation_id: conversation.clone(),
            session_key: session.clone(),
            payload,
            error: error.to_string(),
        };
        let stored = self.shared.router.store().add_dead_letter(&letter, now_ms());
        if let Err(e) = &stored {
            self.shared.metrics.store_errors.inc();
            tracing::error!(channel = %self.id, "cannot store the dead letter: {e}");
        }
        if let Event::DeliverReply(reply) = event {
            self.pending_replies.remove(&reply.reply_id);
            self.shared.metrics.replies_failed.get_or_create(&metrics::channel(&self.id)).inc();
            let record =
                BatchRecord { failed: vec![(reply.reply_id, format!("dead-lettered: {error}"))], ..Default::default() };
            if let Err(e) = self.shared.router.store().commit_batch(&self.id, &record, now_ms()) {
                tracing::error!(channel = %self.id, reply_id = reply.reply_id, "cannot mark the reply failed: {e}");
            }
        }
        tracing::error!(
            channel = %self.id,
            generation,
            session = %session,
            conversation = %conversation,
            event = kind,
            dead_letter = stored.unwrap_or(0),
            "dead-lettered an event the adapter failed on twice; the rest goes on: {error}"
        );
    }

    /// The restart budget is spent: stop running an adapter for this instance. Events are
    /// kept (parked) for the next generation a reload brings.
    fn halt(&mut self, remaining: Vec<Event>, error: &str) {
        let (budget, window) = self.shared.adapter_restarts;
        let Some(old) = self.current.take() else { return };
        tracing::error!(
            channel = %self.id,
            generation = old.number,
            restarts = budget,
            window = ?window,
            kept_events = remaining.len() + self.parked.len(),
            "channel instance halted: the adapter failed again after {budget} restarts within {window:?} ({error}); \
             drop a fixed build into the plugin directory or reload to resume"
        );
        self.shared.ledger.update(&self.id, old.number, |r| r.state = GenerationState::Retiring);
        self.tear_down_later(old.number, old.apartment, GenerationState::Halted);
        let mut kept = remaining;
        kept.append(&mut self.parked);
        self.parked = kept;
    }

    /// Send one batch to the store, to be carried out once stored ([`Self::carry_out`]); waits
    /// only when [`COMMITS_IN_FLIGHT`] batches are already on their way. The adapter's state
    /// goes with it when `state_now` or [`STATE_STORE_EVERY`] has passed.
    async fn submit(&mut self, generation: u64, commands: Vec<Command>, state: Option<(u32, String)>, state_now: bool) {
        let mut record = BatchRecord { adapter_state: state, ..Default::default() };
        for command in &commands {
            match command {
                Command::Inbound(inbound) => record.inbound.push(inbound.clone()),
                Command::ReplyDelivered { reply_id, platform_message_id } => {
                    record.delivered.push((*reply_id, platform_message_id.clone()))
                }
                Command::ReplyFailed { reply_id, error, retryable: false } => {
                    record.failed.push((*reply_id, error.clone()))
                }
                Command::SaveState { format_version, data } if record.adapter_state.is_none() => {
                    record.adapter_state = Some((*format_version, data.clone()))
                }
                _ => {}
            }
        }
        if let Some((format_version, data)) = record.adapter_state.take() {
            self.saved_state = Some(StateBlob { format_version, data: data.into() });
            self.state_unstored = true;
        }
        let due = state_now || self.state_stored_at.is_none_or(|at| at.elapsed() >= STATE_STORE_EVERY);
        if self.state_unstored && due {
            record.adapter_state = self.saved_state.as_ref().map(|s| (s.format_version, s.data.to_string()));
        }
        let storing_state = record.adapter_state.is_some();
        // A confirmation alone is not worth a commit of its own (a third of a reply's writes):
        // until it is stored, a restart hands the reply back and the adapter looks before it
        // posts again. The adapter's state, which no longer lists the delivery, is never
        // stored without it.
        let only_confirmations = record.inbound.is_empty() && record.failed.is_empty() && !storing_state && !state_now;
        if only_confirmations {
            self.confirmations_unstored.append(&mut record.delivered);
        } else if !self.confirmations_unstored.is_empty() {
            let mut delivered = std::mem::take(&mut self.confirmations_unstored);
            delivered.append(&mut record.delivered);
            record.delivered = delivered;
        }
        if storing_state {
            // Counted as stored from now on; a failed commit marks it unstored again.
            self.state_unstored = false;
            self.state_stored_at = Some(Instant::now());
        }
        let inbound = record.inbound.len();
        let nothing_to_store =
            inbound == 0 && record.delivered.is_empty() && record.failed.is_empty() && !storing_state;
        if nothing_to_store && self.committing.is_empty() {
            let ready = PendingBatch::ready(Ok(Vec::new()));
            return self.carry_out(
                Committing { generation, commands, storing_state, inbound, outcome: ready },
                Ok(Vec::new()),
            );
        }
        let outcome = if nothing_to_store {
            PendingBatch::ready(Ok(Vec::new()))
        } else {
            self.shared.router.writer().submit_batch(&self.id, record, now_ms())
        };
        if self.committing.len() >= COMMITS_IN_FLIGHT {
            if let Some(mut oldest) = self.committing.pop_front() {
                let outcome = (&mut oldest.outcome).await;
                self.carry_out(oldest, outcome);
            }
        }
        self.committing.push_back(Committing { generation, commands, storing_state, inbound, outcome });
    }

    fn execute(&mut self, generation: u64, command: Command) {
        match command {
            Command::WsOpen { conn, url, headers } => {
                tracing::info!(channel = %self.id, generation, conn, url = %redact_query(&url), "opening WebSocket");
                self.transport.ws_open(conn, url, headers);
            }
            Command::WsSend { conn, text } => self.transport.ws_send(conn, text),
            Command::WsClose { conn, code, reason } => self.transport.ws_close(conn, code, reason),
            Command::Http { request, method, url, headers, body, timeout_ms } => {
                self.transport.http(request, method, url, headers, body, timeout_ms)
            }
            Command::SetTimer { timer, after_ms } => self.transport.set_timer(timer, after_ms),
            Command::CancelTimer { timer } => self.transport.cancel_timer(timer),
            Command::Inbound(_) => unreachable!("inbound is routed by dispatch"),
            Command::ReplyDelivered { reply_id, platform_message_id } => {
                self.host_retries.remove(&reply_id);
                self.shared.metrics.replies_delivered.get_or_create(&metrics::channel(&self.id)).inc();
                match self.pending_replies.remove(&reply_id) {
                    Some(reply) => tracing::info!(
                        channel = %self.id,
                        session = %reply.session_key,
                        post_id = %platform_message_id,
                        "delivered reply to channel:{}",
                        reply.conversation_id
                    ),
                    None => {
                        tracing::info!(channel = %self.id, reply_id, post_id = %platform_message_id, "delivered reply")
                    }
                }
            }
            Command::ReplyFailed { reply_id, error, retryable } => {
                let reply = self.pending_replies.remove(&reply_id);
                let session = reply.as_ref().map_or("", |r| r.session_key.as_str());
                let conversation = reply.as_ref().map_or("", |r| r.conversation_id.as_str());
                let round = self.host_retries.entry(reply_id).or_insert(0);
                *round += 1;
                if retryable && *round <= HOST_DELIVERY_ROUNDS {
                    let wait = HOST_RETRY_AFTER * *round;
                    tracing::warn!(channel = %self.id, session, conversation, reply_id, round = *round, "reply not delivered yet ({error}); handing it to the adapter again in {wait:?}");
                    self.retry_delivery_later(reply_id, wait);
                } else {
                    self.host_retries.remove(&reply_id);
                    self.shared.metrics.replies_failed.get_or_create(&metrics::channel(&self.id)).inc();
                    if retryable {
                        // Dead-lettered: stays in the store as failed, with the reason.
                        let record = BatchRecord { failed: vec![(reply_id, error.clone())], ..Default::default() };
                        if let Err(e) = self.shared.router.store().commit_batch(&self.id, &record, now_ms()) {
                            tracing::error!(channel = %self.id, reply_id, "cannot mark the reply failed: {e}");
                        }
                    }
                    tracing::error!(channel = %self.id, session, conversation, reply_id, retryable, "reply could not be delivered: {error}");
                }
            }
            Command::SaveState { .. } => {}
            Command::Log { level, message } => emit_adapter_log(&self.id, generation, level, &message),
            Command::Health { healthy, detail } => {
                let problem = (!healthy).then_some(detail);
                if self.shared.ledger.set_problem(&self.id, problem.clone()) {
                    match problem {
                        Some(detail) => {
                            tracing::warn!(channel = %self.id, generation, "channel instance not ready: {detail}")
                        }
                        None => tracing::info!(channel = %self.id, generation, "channel instance ready again"),
                    }
                }
            }
            Command::Unknown => {
                tracing::debug!(channel = %self.id, generation, "adapter asked for an action this host does not know; ignored")
            }
        }
    }

    /// Hand a reply the adapter gave up on back to it later, from the store (it may have been
    /// confirmed meanwhile).
    fn retry_delivery_later(&self, reply_id: u64, wait: Duration) {
        let router = self.shared.router.clone();
        let channel = self.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(wait).await;
            match router.store().queued_replies(&channel) {
                Ok(queued) => {
                    if let Some(reply) = queued.into_iter().find(|r| r.id as u64 == reply_id) {
                        router.deliver(reply);
                    }
                }
                Err(e) => tracing::error!(channel, reply_id, "cannot read the delivery queue: {e}"),
            }
        });
    }

    /// Swap in `prepared`. Events wait in the queue meanwhile. On any failure the current
    /// generation keeps serving, untouched.
    async fn replace(&mut self, prepared: Prepared, config: ChannelConfig, done: oneshot::Sender<Result<(), String>>) {
        // What the current generation asked for so far is carried out first: the handover
        // lists the open connections, and the new generation must not miss one being opened.
        self.settle().await;
        let paused_at = Instant::now();
        let Prepared { number, apartment, source, digest } = prepared;
        let manifest = apartment.manifest.clone();
        self.shared.ledger.add(GenerationRecord {
            channel: self.id.clone(),
            generation: number,
            adapter_name: manifest.adapter_name.to_string(),
            adapter_version: manifest.adapter_version.to_string(),
            build: manifest.build.to_string(),
            source: source.clone(),
            sha256: digest.sha256_hex.clone(),
            copy: apartment.copy_path().to_path_buf(),
            loaded_at_ms: now_ms(),
            state: GenerationState::Refused,
            events_handled: 0,
            swap_pause_us: None,
            swap_settled_us: None,
            mapped: Some(true),
        });
        self.shared.metrics.generations_loaded.inc();

        // 1. The current generation's state; it is not told anything yet, so a failure
        //    below leaves it exactly as it was.
        let previous_state = match &self.current {
            Some(running) => match running.apartment.run(|resident| resident.export_state()).await {
                Ok(Ok((format_version, data))) => Some(StateBlob { format_version, data: data.into() }),
                Ok(Err(e)) => {
                    return self.refuse(
                        number,
                        apartment,
                        format!("the running generation could not export its state: {e}"),
                        done,
                    )
                }
                Err(gone) => return self.refuse(number, apartment, gone.to_string(), done),
            },
            None => self.saved_state.clone(),
        };

        let exported_after = paused_at.elapsed();

        // 2. Construct the new generation with the registry handle, the open connections
        //    and the handed-over state.
        let handover = Handover {
            generation: number,
            previous_state: previous_state.map_or(RNone, RSome),
            connections: self.transport.open_connections().into(),
            cold: self.cold,
        };
        let host = self.host_handle(number);
        let config_json = config.adapter_config_json();
        match apartment.run(move |resident| resident.construct(host, &config_json, handover)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.refuse(number, apartment, format!("constructor failed: {e}"), done),
            Err(gone) => return self.refuse(number, apartment, gone.to_string(), done),
        }

        let constructed_after = paused_at.elapsed();

        // 3. Cut over: the new generation starts and the events queued meanwhile flow to it;
        //    then the old one is told it was replaced (it must leave the connections alone).
        //    It is only ever run when called, so telling it after the cut-over is safe and
        //    keeps its goodbye out of the pause.
        let previous = self.current.replace(Running { number, apartment, events_handled: 0, cold_start: self.cold });
        self.cold = false;
        let previous_config = self.use_config(config);
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Running);
        self.shared.metrics.generations_started.inc();
        let mut first = vec![Event::Started { generation: number }];
        // What waited while no generation ran goes first, a batch at a time (the rest
        // follows right after this one, see `feed_parked`).
        let from_parked = self.parked.len().min(BATCH - 1);
        first.extend(self.parked.drain(..from_parked));
        while self.parked.is_empty() && first.len() < BATCH {
            match self.events.try_recv() {
                Ok(event) => first.push(event),
                Err(_) => break,
            }
        }
        let first = self.hold_back_deliveries(first);
        self.handled_at = None;
        // On trial until its first batch went through: the old generation is kept (not yet
        // told it was replaced) to take over again with the same events if it fails.
        let held = previous.as_ref().map(|_| first.clone());
        self.trial = held.as_ref().map(|_| None);
        self.dispatch(first).await;
        if let (Some(Some(failure)), Some(held)) = (self.trial.take(), held) {
            return self.roll_back(number, previous, previous_config, held, failure, done).await;
        }
        self.trial = None;
        self.settle().await;
        // Paused until the new generation has handled what queued up; storing the batch and
        // carrying out what it asked for follows as for any batch (`swap_settled_us`).
        let settled = paused_at.elapsed();
        let pause = self.handled_at.map_or(settled, |at| at.duration_since(paused_at));
        self.shared.metrics.swap_pause_seconds.observe(pause.as_secs_f64());
        self.shared.ledger.update(&self.id, number, |r| {
            r.swap_pause_us = Some(pause.as_micros() as u64);
            r.swap_settled_us = Some(settled.as_micros() as u64);
        });
        if let Some(old) = previous {
            if let Ok(outcomes) = old
                .apartment
                .run(|resident| resident.handle_all(vec![Event::Shutdown { reason: ShutdownReason::Replaced }]))
                .await
            {
                for command in outcomes.into_iter().flatten().flatten() {
                    // Only its last words: anything else would act for a generation that is gone.
                    if let Command::Log { level, message } = command {
                        emit_adapter_log(&self.id, old.number, level, &message);
                    }
                }
            }
            self.retire(old, true);
        }
        tracing::info!(
            channel = %self.id,
            generation = number,
            adapter = %manifest.adapter_name,
            version = %manifest.adapter_version,
            build = %manifest.build,
            sha256 = %digest.short(),
            pause_us = pause.as_micros() as u64,
            exported_after_us = exported_after.as_micros() as u64,
            constructed_after_us = constructed_after.as_micros() as u64,
            "generation started"
        );
        let _ = done.send(Ok(()));
    }

    /// The new generation `number` failed its first batch: the one it replaced serves again,
    /// handed the same events (nothing the failed batch asked for was carried out).
    async fn roll_back(
        &mut self,
        number: u64,
        previous: Option<Running>,
        previous_config: ChannelConfig,
        held: Vec<Event>,
        failure: String,
        done: oneshot::Sender<Result<(), String>>,
    ) {
        let Some(failed) = std::mem::replace(&mut self.current, previous) else { return };
        self.use_config(previous_config);
        self.discard(
            number,
            failed.apartment,
            &format!("new adapter generation failed its first batch, rolled back: {failure}"),
        );
        let events: Vec<Event> = held.into_iter().filter(|e| !matches!(e, Event::Started { .. })).collect();
        self.dispatch(events).await;
        self.settle().await;
        let _ = done.send(Err(format!("the new generation failed its first batch: {failure}")));
    }

    fn refuse(&mut self, number: u64, apartment: Apartment, reason: String, done: oneshot::Sender<Result<(), String>>) {
        self.discard(number, apartment, &format!("new adapter generation refused, rolled back: {reason}"));
        let _ = done.send(Err(reason));
    }

    /// Generation `number` never serves: say why (with who still does) and tear it down.
    fn discard(&mut self, number: u64, apartment: Apartment, why: &str) {
        self.shared.metrics.generations_refused.inc();
        let serving = self.current.as_ref().map(|r| r.number);
        tracing::error!(channel = %self.id, generation = number, still_serving = ?serving, "{why}");
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Refused);
        self.tear_down_later(number, apartment, GenerationState::Refused);
    }

    /// Take `config` as the instance's, with the roots its `ca_file` says for new connections.
    fn use_config(&mut self, config: ChannelConfig) -> ChannelConfig {
        if config.ca_file != self.config.ca_file {
            self.transport.set_tls(crate::tls::ChannelTls::for_channel(
                &self.id,
                config.ca_file.as_ref(),
                &self.shared.tls,
            ));
            tracing::info!(channel = %self.id, "ca_file changed: new connections trust the new roots");
        }
        std::mem::replace(&mut self.config, config)
    }

    fn retire_current(&mut self, replaced: bool) {
        if let Some(old) = self.current.take() {
            self.retire(old, replaced);
        }
    }

    fn retire(&mut self, old: Running, replaced: bool) {
        tracing::info!(channel = %self.id, generation = old.number, events_handled = old.events_handled, replaced, "retiring generation");
        self.shared.ledger.update(&self.id, old.number, |r| r.state = GenerationState::Retiring);
        self.tear_down_later(old.number, old.apartment, GenerationState::Unloaded);
    }

    /// Join the apartment and close the library off the event path, then check the maps.
    fn tear_down_later(&self, number: u64, mut apartment: Apartment, final_state: GenerationState) {
        let channel = self.id.clone();
        let ledger = self.shared.ledger.clone();
        let metrics = self.shared.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let result = apartment.tear_down();
            metrics.generations_loaded.dec();
            match result.still_mapped {
                Some(true) => {
                    metrics.generations_still_mapped.inc();
                    tracing::warn!(channel, generation = number, copy = %result.copy_path.display(), "generation torn down but its copy is still mapped");
                    ledger.update(&channel, number, |r| {
                        r.state = GenerationState::StillMapped;
                        r.mapped = Some(true);
                    });
                }
                mapped => {
                    metrics.generations_unloaded.inc();
                    let _ = std::fs::remove_file(&result.copy_path);
                    tracing::info!(channel, generation = number, copy = %result.copy_path.display(), unmapped = mapped.is_some(), "generation unloaded");
                    ledger.update(&channel, number, |r| {
                        if r.state != GenerationState::Refused {
                            r.state = final_state;
                        }
                        r.mapped = mapped;
                    });
                }
            }
        });
    }

    async fn stop(&mut self) {
        self.settle().await;
        // Requests in flight (a reply being posted) are let finish and their answers handed
        // to the adapter first, so the state stored last knows what was posted: the next start
        // need not look for it, and cannot race a request the server is still handling.
        let deadline = tokio::time::Instant::now() + IN_FLIGHT_GRACE;
        while self.current.is_some() && self.transport.http_in_flight() > 0 {
            let Ok(Some(first)) = tokio::time::timeout_at(deadline, self.events.recv()).await else { break };
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
                .run(|resident| {
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

/// What the adapter gets instead of an event it failed on twice, where it must learn that
/// the event is gone: a skipped frame (move the sequence past it), a failed request.
fn stand_in(event: &Event, error: &str) -> Option<Event> {
    match event {
        Event::WsFrame { conn, text } => Some(Event::WsFrameSkipped { conn: *conn, text: text.clone() }),
        Event::HttpResponse { request, .. } => Some(Event::HttpFailed {
            request: *request,
            error: format!("the response was dead-lettered (the adapter failed on it twice: {error})").into(),
        }),
        _ => None,
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
        _ => "unknown",
    }
}

/// A URL for the log, without its query string (which may carry credentials).
fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, query)) if query.contains("token") => format!("{base}?<redacted>"),
        _ => url.to_string(),
    }
}
