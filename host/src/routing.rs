//! Routing: inbound message → binding (channel instance → agent) → session key → session
//! registry → the session's lane → agent → reply handed to the channel instance that owns the
//! session's delivery target.
//!
//! Routing state lives here, in the host, never in an adapter (ARCHITECTURE.md §1): a reload
//! of an adapter cannot change which session a conversation maps to or where replies go.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use switchboard_plugin_api::{Event, OutboundReply, ReplyTarget};
use tokio::sync::mpsc;

use crate::{
    agent::{Agent, AgentRequest, HistoryTurn, Sender},
    apartment::Inbound,
    config::{Config, OnError, DEFAULT_AGENT},
    lane::Lanes,
    metrics::{self, Metrics},
    session::{now_ms, session_key, DeliveryTarget, Session, SessionStore},
    store::{DeadLetter, FinishedTurn, Pending, QueuedReply, Store, StoreError, StoreWriter, Turn},
};

/// The part of the config routing needs; replaced as a whole on reload.
#[derive(Default)]
struct Table {
    agents: HashMap<String, Arc<Agent>>,
    bindings: HashMap<String, String>,
    thread_sessions: HashMap<String, bool>,
    typing: Typing,
}

/// When the typing indicator shows while an agent works.
#[derive(Default, Clone, Copy)]
struct Typing {
    delay: Duration,
    interval: Duration,
}

pub struct Router {
    table: RwLock<Table>,
    sessions: Arc<dyn SessionStore>,
    store: Arc<Store>,
    writer: Arc<StoreWriter>,
    lanes: Lanes,
    instances: RwLock<HashMap<String, mpsc::UnboundedSender<Event>>>,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    /// Set when the gateway is stopping: inbound is still recorded, but answered after the
    /// next start.
    draining: AtomicBool,
    /// Per session, inbound ids that found its lane full: they wait in the store (as
    /// received) and are taken up, in order, as the lane has room — never dropped.
    waiting: Mutex<HashMap<String, VecDeque<i64>>>,
    /// When each reply's inbound message was taken off its channel instance's queue, by reply
    /// id, until the reply is confirmed or given up on (`switchboard_reply_latency_seconds`).
    reply_clock: Mutex<HashMap<i64, Instant>>,
}

/// Replies timed at once, at most: past it (a long outage of a chat server) new replies go
/// untimed rather than the map growing without bound.
const REPLIES_TIMED_MAX: usize = 100_000;

impl Router {
    pub fn new(
        config: &Config,
        sessions: Arc<dyn SessionStore>,
        writer: Arc<StoreWriter>,
        metrics: Arc<Metrics>,
        http: reqwest::Client,
    ) -> Arc<Self> {
        let router = Arc::new(Router {
            table: RwLock::new(Table::default()),
            sessions,
            store: writer.store().clone(),
            writer,
            lanes: Lanes::new(config.gateway.max_concurrent_turns, config.gateway.lane_capacity),
            instances: RwLock::new(HashMap::new()),
            metrics,
            http,
            draining: AtomicBool::new(false),
            waiting: Mutex::new(HashMap::new()),
            reply_clock: Mutex::new(HashMap::new()),
        });
        router.apply(config);
        router
    }

    /// Take the agents, bindings and per-channel routing options of `config`.
    pub fn apply(&self, config: &Config) {
        let agents = config
            .agents
            .iter()
            .map(|(id, agent)| (id.clone(), Arc::new(Agent { id: id.clone(), config: agent.clone() })))
            .collect();
        let bindings = config.bindings.iter().map(|b| (b.channel.clone(), b.agent.clone())).collect();
        let thread_sessions = config.channels.iter().map(|(id, c)| (id.clone(), c.thread_sessions)).collect();
        *self.table.write().unwrap() = Table {
            agents,
            bindings,
            thread_sessions,
            typing: Typing { delay: config.gateway.typing_delay, interval: config.gateway.typing_interval },
        };
    }

    pub fn sessions(&self) -> Arc<dyn SessionStore> {
        self.sessions.clone()
    }

    pub fn store(&self) -> Arc<Store> {
        self.store.clone()
    }

    /// The group-commit writer shared by every channel instance and turn.
    pub fn writer(&self) -> &StoreWriter {
        &self.writer
    }

    pub fn register_instance(&self, id: &str, events: mpsc::UnboundedSender<Event>) {
        self.instances.write().unwrap().insert(id.to_string(), events);
    }

    pub fn unregister_instance(&self, id: &str) {
        self.instances.write().unwrap().remove(id);
    }

    /// Stop starting turns; what arrives from now on waits in the store for the next start.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Turns waiting or running.
    pub fn busy_turns(&self) -> usize {
        self.lanes.busy()
    }

    /// After a start: answer what was recorded but not answered, and send what was queued but
    /// not confirmed, in their original order. The reads go in order through the writer;
    /// awaited before the instance handles a live event, what the last process left goes first.
    pub async fn recover(self: &Arc<Self>, channel: &str) {
        let pending = self.writer.pending_inbound(channel);
        let queued = self.writer.queued_replies(channel);
        let (pending, queued) = (pending.await, queued.await);
        self.take_up(channel, pending, queued);
    }

    /// Route the unanswered messages and deliver the queued replies a start found.
    fn take_up(
        self: &Arc<Self>,
        channel: &str,
        pending: Result<Vec<(i64, Inbound)>, StoreError>,
        queued: Result<Vec<QueuedReply>, StoreError>,
    ) {
        match pending {
            Ok(pending) => {
                if !pending.is_empty() {
                    tracing::info!(channel, messages = pending.len(), "answering inbound recorded before the restart");
                }
                for (inbound_id, inbound) in pending {
                    // Received by the last process: its wait is not this one's to time.
                    self.start_turn(channel, inbound_id, inbound, false, None);
                }
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(channel, "cannot read unanswered inbound from the store: {e}");
            }
        }
        match queued {
            Ok(queued) => {
                if !queued.is_empty() {
                    tracing::info!(channel, replies = queued.len(), "sending replies queued before the restart");
                }
                for reply in queued {
                    // It may have been handed out before the restart, after the adapter's
                    // state was last stored: the adapter looks for it before posting.
                    let hint = Event::ReplyMayHaveGoneOut { reply_id: reply.id as u64 };
                    self.send_to(&reply.target.channel_instance, hint);
                    self.deliver(reply);
                }
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(channel, "cannot read the delivery queue from the store: {e}");
            }
        }
    }

    /// The adapter state saved for `channel`, read in order after every batch submitted
    /// before (a restarted instance resumes from its last stored state).
    pub fn adapter_state_async(&self, channel: &str) -> Pending<Option<(u32, String)>> {
        self.writer.adapter_state(channel)
    }

    /// Replies of `channel` queued and not yet confirmed, read in order after every batch
    /// submitted before (with the confirmations it carried).
    pub fn queued_replies_async(&self, channel: &str) -> Pending<Vec<QueuedReply>> {
        self.writer.queued_replies(channel)
    }

    /// Keep an event an adapter failed on twice, in order with the instance's batches; the
    /// dead letter's id once stored.
    pub fn add_dead_letter(&self, letter: DeadLetter) -> Pending<i64> {
        self.writer.add_dead_letter(letter, now_ms())
    }

    /// The sessions of `channel` whose key starts with `prefix`, listed on a blocking thread
    /// (the listing reads the store).
    pub async fn list_sessions_async(&self, channel: &str, prefix: &str) -> Vec<Session> {
        let (sessions, channel, prefix) = (self.sessions.clone(), channel.to_string(), prefix.to_string());
        // Cancelled only when the runtime stops; the listing just names sessions (a dead
        // letter's), so none is better than a panic there.
        tokio::task::spawn_blocking(move || sessions.list(&channel, &prefix)).await.unwrap_or_default()
    }

    /// The store's counts, read on a blocking thread.
    pub async fn counts_async(&self) -> Result<crate::store::StoreCounts, StoreError> {
        self.store.counts_async().await
    }

    /// Hand a queued reply to the channel instance that owns its target.
    pub fn deliver(&self, reply: QueuedReply) {
        let event = Event::DeliverReply(OutboundReply {
            reply_id: reply.id as u64,
            session_key: reply.session_key.as_str().into(),
            target: ReplyTarget::new(&reply.target.conversation_id, &reply.target.thread_root_id),
            text: reply.text.into(),
        });
        if !self.send_to(&reply.target.channel_instance, event) {
            tracing::warn!(
                session = %reply.session_key,
                channel = %reply.target.channel_instance,
                reply_id = reply.id,
                "the session's channel instance is not running; the reply stays queued for its next start"
            );
        }
    }

    /// Route one inbound message from channel instance `channel`, already recorded in the
    /// store as `inbound_id`; `taken_at` is when the instance took it off its queue.
    pub fn route(self: &Arc<Self>, channel: &str, inbound_id: i64, inbound: Inbound, taken_at: Instant) {
        self.start_turn(channel, inbound_id, inbound, false, Some(taken_at));
    }

    /// When the inbound message of reply `reply_id` was taken off its queue (forgotten now:
    /// the reply was confirmed or given up on).
    pub fn reply_timed_from(&self, reply_id: i64) -> Option<Instant> {
        self.reply_clock.lock().unwrap().remove(&reply_id)
    }

    /// Route one message to its session's lane; `resumed` when it waited in the store.
    fn start_turn(
        self: &Arc<Self>,
        channel: &str,
        inbound_id: i64,
        inbound: Inbound,
        resumed: bool,
        taken_at: Option<Instant>,
    ) {
        if self.draining.load(Ordering::SeqCst) {
            tracing::info!(channel, message_id = %inbound.message_id, "stopping: inbound recorded, answered after the next start");
            return;
        }
        let table = self.table.read().unwrap();
        let agent_id = table.bindings.get(channel).map_or(DEFAULT_AGENT, String::as_str).to_string();
        let Some(agent) = table.agents.get(&agent_id).cloned() else {
            tracing::error!(channel, agent = %agent_id, message_id = %inbound.message_id, "no such agent; message not answered");
            self.set_status(inbound_id, "no_agent");
            return;
        };
        let per_thread = table.thread_sessions.get(channel).copied().unwrap_or(false);
        let typing = table.typing;
        drop(table);

        let peer = if inbound.is_dm() { inbound.sender_id.as_str() } else { inbound.peer_id.as_str() };
        let thread = per_thread.then_some(inbound.thread_root_id.as_str());
        let key = session_key(&agent_id, channel, inbound.peer_kind.as_str(), peer, thread);
        let target = DeliveryTarget {
            channel_instance: channel.to_string(),
            conversation_id: inbound.peer_id.clone(),
            thread_root_id: if per_thread { inbound.thread_root_id.clone() } else { String::new() },
        };
        // Routing runs on an async worker: a session not in memory is read from the store
        // with the worker handed over to the others meanwhile (rare: the cache keeps the
        // recently active ones).
        let session = match self.sessions.in_memory(&key) {
            Some(session) => session,
            None => off_the_worker(|| self.sessions.open(&key, &agent_id, &target)),
        };
        self.sessions.touch(&key, now_ms());
        if !resumed {
            self.metrics.inbound_messages.get_or_create(&metrics::channel(channel)).inc();
            tracing::info!(
                session = %key,
                channel,
                conversation = %inbound.peer_id,
                message_id = %inbound.message_id,
                sender = %inbound.sender_name,
                "inbound"
            );
            // Behind messages already waiting for this session: order is kept.
            let mut waiting = self.waiting.lock().unwrap();
            if let Some(queue) = waiting.get_mut(&key).filter(|q| !q.is_empty()) {
                queue.push_back(inbound_id);
                return;
            }
        }
        let router = self.clone();
        let message_id = inbound.message_id.clone();
        let lane = key.clone();
        let turn = crate::lane::turn(move || async move {
            router.clone().turn(session, agent, inbound_id, inbound, typing, taken_at).await;
            router.take_up_waiting(&lane).await;
        });
        if self.lanes.submit(&key, turn).is_err() {
            let mut waiting = self.waiting.lock().unwrap();
            let queue = waiting.entry(key.clone()).or_default();
            if resumed {
                queue.push_front(inbound_id);
            } else {
                queue.push_back(inbound_id);
                self.metrics.lane_overflow.get_or_create(&metrics::channel(channel)).inc();
                if queue.len() == 1 {
                    tracing::warn!(
                        session = %key,
                        channel,
                        message_id = %message_id,
                        "the session's lane is full (gateway.lane_capacity); its next messages wait in the store"
                    );
                }
            }
        }
    }

    /// A turn of `session_key` ended: hand its lane the next message that waited in the store.
    async fn take_up_waiting(self: &Arc<Self>, session_key: &str) {
        loop {
            // Looked at, not taken, while it is read: a message arriving meanwhile still
            // finds the queue and waits behind it.
            let next = {
                let mut waiting = self.waiting.lock().unwrap();
                let Some(queue) = waiting.get(session_key) else { return };
                let next = queue.front().copied();
                if next.is_none() {
                    waiting.remove(session_key);
                }
                next
            };
            let Some(inbound_id) = next else { return };
            let read = self.store.waiting_inbound_async(inbound_id).await;
            {
                // Only this lane's turns take from its queue, one at a time: it is still first.
                let mut waiting = self.waiting.lock().unwrap();
                if let Some(queue) = waiting.get_mut(session_key) {
                    if queue.front() == Some(&inbound_id) {
                        queue.pop_front();
                    }
                    if queue.is_empty() {
                        waiting.remove(session_key);
                    }
                }
            }
            match read {
                // Its wait in the store is not timed: the time it was taken off the queue is
                // not kept with it.
                Ok(Some((channel, inbound))) => return self.start_turn(&channel, inbound_id, inbound, true, None),
                // Answered meanwhile (a restart took it up), or gone: the next one then.
                Ok(None) => {}
                Err(e) => {
                    self.metrics.store_errors.inc();
                    tracing::error!(
                        inbound_id,
                        "cannot read a waiting message; it is answered after the next start: {e}"
                    );
                }
            }
        }
    }

    /// Store an inbound message's status through the writer, without waiting for it.
    fn set_status(&self, inbound_id: i64, status: &'static str) {
        let stored = self.writer.set_inbound_status(inbound_id, status);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside the runtime (a tool): the writer logs a failure itself.
            return stored.detach();
        };
        let metrics = self.metrics.clone();
        runtime.spawn(async move {
            if let Err(e) = stored.await {
                metrics.store_errors.inc();
                tracing::error!(inbound_id, "cannot store the inbound status {status}: {e}");
            }
        });
    }

    /// One agent turn for `session`, with a typing indicator while the agent works.
    async fn turn(
        self: Arc<Self>,
        session: Session,
        agent: Arc<Agent>,
        inbound_id: i64,
        inbound: Inbound,
        typing: Typing,
        taken_at: Option<Instant>,
    ) {
        // The reply goes to the conversation and thread the message came from. Not to where
        // the session was first seen: a DM session follows the person, and on Matrix a person
        // can write to the bot from more than one room (each two-member room counts as a DM).
        let target = ReplyTarget::new(&inbound.peer_id, &inbound.thread_root_id);
        let stored = if agent.reads_history() {
            self.store.history_async(&session.key, agent.config.history_limit).await
        } else {
            Ok(Vec::new())
        };
        let history = match stored {
            Ok(turns) => turns.into_iter().map(|t| HistoryTurn { role: t.role, content: t.content }).collect(),
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::error!(session = %session.key, "cannot read the session's history; answering without it: {e}");
                Vec::new()
            }
        };
        let request = AgentRequest {
            session_key: session.key.clone(),
            agent_id: agent.id.clone(),
            channel: session.target.channel_instance.clone(),
            conversation_id: inbound.peer_id.clone(),
            thread_root_id: inbound.thread_root_id.clone(),
            message_id: inbound.message_id.clone(),
            sender: Sender { id: inbound.sender_id.clone(), name: inbound.sender_name.clone() },
            text: inbound.text.clone(),
            history,
        };
        let typing_shown = async {
            tokio::time::sleep(typing.delay).await;
            loop {
                self.send_to(&session.target.channel_instance, Event::AgentWorking { target: target.clone() });
                tokio::time::sleep(typing.interval).await;
            }
        };
        let asked_at = Instant::now();
        let outcome = tokio::select! {
            outcome = agent.respond(&self.http, &request) => outcome,
            _ = typing_shown => unreachable!("the typing loop never ends"),
        };
        self.metrics
            .agent_turn_seconds
            .get_or_create(&metrics::channel_and_agent(&session.target.channel_instance, &agent.id))
            .observe(asked_at.elapsed().as_secs_f64());
        let user = Turn { role: "user".into(), content: inbound.text.clone() };
        let (transcript, reply) = match outcome {
            Ok(Some(text)) => (vec![user, Turn { role: "assistant".into(), content: text.clone() }], Some(text)),
            Ok(None) => {
                tracing::debug!(session = %session.key, "agent chose not to reply");
                (vec![user], None)
            }
            Err(error) => {
                self.metrics.agent_errors.get_or_create(&metrics::channel(&session.target.channel_instance)).inc();
                tracing::error!(session = %session.key, agent = %agent.id, message_id = %inbound.message_id, "agent failed: {error}");
                match &agent.config.on_error {
                    OnError::Reply(text) => (vec![user], Some(text.clone())),
                    OnError::Silent => (vec![user], None),
                }
            }
        };
        let delivery_target = DeliveryTarget {
            conversation_id: inbound.peer_id.clone(),
            thread_root_id: inbound.thread_root_id.clone(),
            ..session.target.clone()
        };
        let finished = FinishedTurn {
            inbound_id,
            session_key: session.key.clone(),
            transcript,
            message_id: inbound.message_id.clone(),
            reply: reply.clone().map(|text| (delivery_target.clone(), text)),
            finished_at_ms: now_ms(),
        };
        match self.writer.finish(finished).await {
            Ok(Some(reply_id)) => {
                // Queued and committed; it leaves once on the disk (`gateway.durability`). The
                // lane meanwhile goes on with the session's next turn.
                if let Some(taken_at) = taken_at {
                    let mut clock = self.reply_clock.lock().unwrap();
                    if clock.len() < REPLIES_TIMED_MAX {
                        clock.insert(reply_id, taken_at);
                    }
                }
                let reply = QueuedReply {
                    id: reply_id,
                    session_key: session.key,
                    target: delivery_target,
                    text: reply.unwrap_or_default(),
                };
                let router = self.clone();
                self.writer.after_sync(Box::new(move |synced| match synced {
                    Ok(()) => router.deliver(reply),
                    Err(e) => {
                        router.metrics.store_errors.inc();
                        tracing::error!(session = %reply.session_key, reply_id, "reply queued but not yet on the disk; it is sent after the next start: {e}");
                    }
                }));
            }
            Ok(None) => {}
            Err(e) => {
                // Not sent: a reply that is not queued could be sent twice after a restart.
                self.metrics.store_errors.inc();
                tracing::error!(session = %session.key, message_id = %inbound.message_id, "cannot store the turn; it will be answered after the next start: {e}");
            }
        }
    }

    pub fn send_to(&self, channel: &str, event: Event) -> bool {
        match self.instances.read().unwrap().get(channel) {
            Some(events) => events.send(event).is_ok(),
            None => false,
        }
    }
}

/// Run blocking `work` from async code without holding up the worker's other tasks (on a
/// runtime that can hand the worker over; elsewhere, as it is).
fn off_the_worker<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
