//! Routing: inbound message → binding (channel instance → agent) → session key → session
//! registry → the session's lane → agent → reply handed to the channel instance that owns the
//! session's delivery target.
//!
//! Routing state lives here, in the host, never in an adapter (ARCHITECTURE.md §1): a reload
//! of an adapter cannot change which session a conversation maps to or where replies go.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use switchboard_plugin_api::{Event, OutboundReply, PeerKind, ReplyTarget};
use tokio::sync::mpsc;

use crate::{
    agent::{Agent, AgentRequest, Sender},
    apartment::Inbound,
    config::{Config, DEFAULT_AGENT},
    lane::Lanes,
    metrics::{self, Metrics},
    session::{now_ms, session_key, DeliveryTarget, Session, SessionStore},
};

/// The part of the config routing needs; replaced as a whole on reload.
#[derive(Default)]
struct Table {
    agents: HashMap<String, Arc<Agent>>,
    bindings: HashMap<String, String>,
    thread_sessions: HashMap<String, bool>,
    typing_interval: Duration,
}

pub struct Router {
    table: RwLock<Table>,
    sessions: Arc<dyn SessionStore>,
    lanes: Lanes,
    instances: RwLock<HashMap<String, mpsc::UnboundedSender<Event>>>,
    next_reply_id: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Router {
    pub fn new(config: &Config, sessions: Arc<dyn SessionStore>, metrics: Arc<Metrics>) -> Arc<Self> {
        let router = Arc::new(Router {
            table: RwLock::new(Table::default()),
            sessions,
            lanes: Lanes::new(config.gateway.max_concurrent_turns),
            instances: RwLock::new(HashMap::new()),
            next_reply_id: AtomicU64::new(1),
            metrics,
        });
        router.apply(config);
        router
    }

    /// Take the agents, bindings and per-channel routing options of `config`.
    pub fn apply(&self, config: &Config) {
        let agents = config
            .agents
            .iter()
            .map(|(id, agent)| (id.clone(), Arc::new(Agent { id: id.clone(), kind: agent.kind.clone() })))
            .collect();
        let bindings = config.bindings.iter().map(|b| (b.channel.clone(), b.agent.clone())).collect();
        let thread_sessions = config.channels.iter().map(|(id, c)| (id.clone(), c.thread_sessions)).collect();
        *self.table.write().unwrap() =
            Table { agents, bindings, thread_sessions, typing_interval: config.gateway.typing_interval };
    }

    pub fn sessions(&self) -> Arc<dyn SessionStore> {
        self.sessions.clone()
    }

    pub fn register_instance(&self, id: &str, events: mpsc::UnboundedSender<Event>) {
        self.instances.write().unwrap().insert(id.to_string(), events);
    }

    pub fn unregister_instance(&self, id: &str) {
        self.instances.write().unwrap().remove(id);
    }

    /// Route one inbound message from channel instance `channel`.
    pub fn route(self: &Arc<Self>, channel: &str, inbound: Inbound) {
        let table = self.table.read().unwrap();
        let agent_id = table.bindings.get(channel).map_or(DEFAULT_AGENT, String::as_str).to_string();
        let Some(agent) = table.agents.get(&agent_id).cloned() else {
            tracing::error!(channel, agent = %agent_id, message_id = %inbound.message_id, "no such agent; message not answered");
            return;
        };
        let per_thread = table.thread_sessions.get(channel).copied().unwrap_or(false);
        let typing_interval = table.typing_interval;
        drop(table);

        let peer = match inbound.peer_kind {
            PeerKind::Dm => inbound.sender_id.as_str(),
            PeerKind::Channel | PeerKind::Group => inbound.peer_id.as_str(),
        };
        let thread = per_thread.then_some(inbound.thread_root_id.as_str());
        let key = session_key(&agent_id, channel, inbound.peer_kind, peer, thread);
        let target = DeliveryTarget {
            channel_instance: channel.to_string(),
            conversation_id: inbound.peer_id.clone(),
            thread_root_id: if per_thread { inbound.thread_root_id.clone() } else { String::new() },
        };
        let session = self.sessions.open(&key, &agent_id, &target);
        self.sessions.touch(&key, now_ms());
        self.metrics.inbound_messages.get_or_create(&metrics::channel(channel)).inc();
        tracing::info!(
            session = %key,
            channel,
            conversation = %inbound.peer_id,
            message_id = %inbound.message_id,
            sender = %inbound.sender_name,
            "inbound"
        );
        let router = self.clone();
        self.lanes.submit(&key, Box::pin(async move { router.turn(session, agent, inbound, typing_interval).await }));
    }

    /// One agent turn for `session`, with a typing indicator while the agent works.
    async fn turn(self: Arc<Self>, session: Session, agent: Arc<Agent>, inbound: Inbound, typing_interval: Duration) {
        // The reply goes where the registry says the session lives, into the thread the
        // message came from.
        let target = ReplyTarget::new(&session.target.conversation_id, &inbound.thread_root_id);
        let request = AgentRequest {
            session_key: session.key.clone(),
            agent_id: agent.id.clone(),
            channel: session.target.channel_instance.clone(),
            conversation_id: session.target.conversation_id.clone(),
            thread_root_id: inbound.thread_root_id.clone(),
            message_id: inbound.message_id.clone(),
            sender: Sender { id: inbound.sender_id.clone(), name: inbound.sender_name.clone() },
            text: inbound.text.clone(),
        };
        let typing = async {
            loop {
                self.send_to(&session.target.channel_instance, Event::AgentWorking { target: target.clone() });
                tokio::time::sleep(typing_interval).await;
            }
        };
        let outcome = tokio::select! {
            outcome = agent.respond(&request) => outcome,
            _ = typing => unreachable!("the typing loop never ends"),
        };
        match outcome {
            Ok(Some(text)) => {
                let reply = OutboundReply {
                    reply_id: self.next_reply_id.fetch_add(1, Ordering::Relaxed),
                    session_key: session.key.as_str().into(),
                    target,
                    text: text.into(),
                };
                if !self.send_to(&session.target.channel_instance, Event::DeliverReply(reply)) {
                    tracing::error!(session = %session.key, channel = %session.target.channel_instance, "the session's channel instance is not running; reply dropped");
                }
            }
            Ok(None) => tracing::debug!(session = %session.key, "agent chose not to reply"),
            Err(error) => {
                self.metrics.agent_errors.get_or_create(&metrics::channel(&session.target.channel_instance)).inc();
                tracing::error!(session = %session.key, agent = %agent.id, "agent failed: {error}");
            }
        }
    }

    fn send_to(&self, channel: &str, event: Event) -> bool {
        match self.instances.read().unwrap().get(channel) {
            Some(events) => events.send(event).is_ok(),
            None => false,
        }
    }
}
