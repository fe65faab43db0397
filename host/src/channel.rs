//! A channel instance: one configured connection to a chat platform (`[channels.<id>]`).
//!
//! The instance task owns the instance's event queue, its [`Transport`] (sockets, HTTP,
//! timers) and its current adapter generation. Everything that happens — frames, responses,
//! timers, replies to deliver — is one ordered queue of events, drained in batches into the
//! generation's apartment. A swap happens *inside* this task, so events that arrive meanwhile
//! simply wait in the queue and reach the new generation in order (ARCHITECTURE.md §4).

use std::{
    collections::HashMap,
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
    transport::Transport,
};

/// How many queued events go to the apartment in one hop.
const BATCH: usize = 256;

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
        let copy = loader::stage(&source, &generations_dir, &channel, number, &digest)?;
        // The file may have changed between the scan and the copy: hash what was copied.
        let staged = loader::digest(&copy)?;
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
    /// The last state the adapter asked to save (handed to a generation that starts without
    /// a predecessor, e.g. after its predecessor died).
    saved_state: Option<StateBlob>,
}

/// Start a channel instance with its first generation.
pub async fn spawn(id: String, config: ChannelConfig, prepared: Prepared, shared: Arc<Shared>) -> InstanceHandle {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (control_tx, control) = mpsc::channel(8);
    shared.router.register_instance(&id, events_tx.clone());
    let transport = Transport::new(events_tx.clone(), shared.http.clone());
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
        saved_state: None,
    };
    let (done, _) = oneshot::channel();
    instance.replace(prepared, config, done).await;
    tokio::spawn(instance.run());
    InstanceHandle { id, events: events_tx, control: control_tx }
}

impl Instance {
    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                control = self.control.recv() => match control {
                    Some(Control::Replace { prepared, config, done }) => self.replace(*prepared, config, done).await,
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
                Some(first) = self.events.recv() => {
                    let mut batch = Vec::with_capacity(16);
                    batch.push(first);
                    while batch.len() < BATCH {
                        match self.events.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    self.dispatch(batch).await;
                }
            }
        }
    }

    /// Hand events to the running generation and carry out what it asks.
    async fn dispatch(&mut self, batch: Vec<Event>) {
        let Some(running) = self.current.as_mut() else {
            self.parked.extend(batch);
            return;
        };
        let mut kinds = Vec::with_capacity(batch.len());
        for event in &batch {
            kinds.push(event_kind(event));
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
                Event::WsClosed { conn, .. } => self.transport.forget_socket(*conn),
                Event::TimerFired { timer } => self.transport.timer_fired(*timer),
                _ => {}
            }
        }
        let count = batch.len() as u64;
        let handled = match running.apartment.run(move |resident| resident.handle_all(batch)).await {
            Ok(handled) => handled,
            Err(gone) => {
                tracing::error!(channel = %self.id, generation = running.number, "{gone}; the instance has no running adapter");
                self.retire_current(false);
                return;
            }
        };
        running.events_handled += count;
        let number = running.number;
        let id = self.id.clone();
        self.shared.ledger.update(&id, number, |r| r.events_handled += count);
        self.shared.metrics.events_dispatched.get_or_create(&metrics::channel(&id)).inc_by(count);
        for (kind, outcome) in kinds.into_iter().zip(handled) {
            match outcome {
                Ok(commands) => {
                    for command in commands {
                        self.execute(number, command);
                    }
                }
                Err(error) => {
                    self.shared.metrics.adapter_panics.get_or_create(&metrics::channel(&id)).inc();
                    tracing::error!(channel = %id, generation = number, event = kind, "adapter failed to handle an event: {error}");
                }
            }
        }
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
            Command::Inbound(inbound) => self.shared.router.route(&self.id, inbound),
            Command::ReplyDelivered { reply_id, platform_message_id } => {
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
                self.shared.metrics.replies_failed.get_or_create(&metrics::channel(&self.id)).inc();
                let reply = self.pending_replies.remove(&reply_id);
                tracing::error!(
                    channel = %self.id,
                    session = reply.as_ref().map_or("", |r| r.session_key.as_str()),
                    conversation = reply.as_ref().map_or("", |r| r.conversation_id.as_str()),
                    retryable,
                    "reply could not be delivered: {error}"
                );
            }
            Command::SaveState { format_version, data } => {
                self.saved_state = Some(StateBlob { format_version, data: data.into() });
            }
            Command::Log { level, message } => emit_adapter_log(&self.id, generation, level, &message),
            Command::Unknown => {
                tracing::debug!(channel = %self.id, generation, "adapter asked for an action this host does not know; ignored")
            }
        }
    }

    /// Swap in `prepared`. Events wait in the queue meanwhile. On any failure the current
    /// generation keeps serving, untouched.
    async fn replace(&mut self, prepared: Prepared, config: ChannelConfig, done: oneshot::Sender<Result<(), String>>) {
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

        // 2. Construct the new generation with the registry handle, the open connections
        //    and the handed-over state.
        let handover = Handover {
            generation: number,
            previous_state: previous_state.map_or(RNone, RSome),
            connections: self.transport.open_connections().into(),
        };
        let host = HostBridge {
            channel_instance: self.id.clone(),
            generation: number,
            sessions: self.shared.router.sessions(),
        }
        .into_handle();
        let config_json = config.adapter_config_json();
        match apartment.run(move |resident| resident.construct(host, &config_json, handover)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.refuse(number, apartment, format!("constructor failed: {e}"), done),
            Err(gone) => return self.refuse(number, apartment, gone.to_string(), done),
        }

        // 3. Cut over: the old generation is told it was replaced (it must leave the
        //    connections alone), the new one starts, and queued events flow to it.
        let previous = self.current.replace(Running { number, apartment, events_handled: 0 });
        self.config = config;
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
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Running);
        self.shared.metrics.generations_started.inc();
        let mut first = vec![Event::Started { generation: number }];
        first.append(&mut self.parked);
        self.dispatch(first).await;
        let pause = paused_at.elapsed();
        self.shared.metrics.swap_pause_seconds.observe(pause.as_secs_f64());
        tracing::info!(
            channel = %self.id,
            generation = number,
            adapter = %manifest.adapter_name,
            version = %manifest.adapter_version,
            build = %manifest.build,
            sha256 = %digest.short(),
            pause_us = pause.as_micros() as u64,
            "generation started"
        );
        let _ = done.send(Ok(()));
    }

    fn refuse(&mut self, number: u64, apartment: Apartment, reason: String, done: oneshot::Sender<Result<(), String>>) {
        self.shared.metrics.generations_refused.inc();
        let serving = self.current.as_ref().map(|r| r.number);
        tracing::error!(
            channel = %self.id,
            generation = number,
            still_serving = ?serving,
            "new adapter generation refused, rolled back: {reason}"
        );
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Refused);
        self.tear_down_later(number, apartment, GenerationState::Refused);
        let _ = done.send(Err(reason));
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
        if let Some(running) = self.current.as_ref() {
            let number = running.number;
            if let Ok(outcomes) = running
                .apartment
                .run(|resident| resident.handle_all(vec![Event::Shutdown { reason: ShutdownReason::Stopping }]))
                .await
            {
                for command in outcomes.into_iter().flatten().flatten() {
                    self.execute(number, command);
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
