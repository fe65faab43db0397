//! Prometheus metrics, served on the admin listener at `/metrics`.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// A histogram per label set, all with the same buckets.
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets for what a person waits for: an agent's turn, a reply (seconds).
const WAIT_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

fn wait_histogram() -> Histogram {
    Histogram::new(WAIT_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    pub inbound_messages: Family<Labels, Counter>,
    pub replies_delivered: Family<Labels, Counter>,
    pub replies_failed: Family<Labels, Counter>,
    pub adapter_panics: Family<Labels, Counter>,
    pub adapter_restarts: Family<Labels, Counter>,
    /// Adapter calls that did not return within `gateway.adapter_call_timeout_ms`.
    pub adapter_hangs: Family<Labels, Counter>,
    pub instance_restarts: Family<Labels, Counter>,
    pub dead_letters: Family<Labels, Counter>,
    pub events_dispatched: Family<Labels, Counter>,
    pub agent_errors: Family<Labels, Counter>,
    pub reloads: Family<Labels, Counter>,
    /// Inbound messages recognised as already recorded (resume replay, catch-up) and not answered again.
    pub inbound_redelivered: Family<Labels, Counter>,
    /// Turns refused because their session's lane was full.
    pub lane_overflow: Family<Labels, Counter>,
    /// Failures to write the state database.
    pub store_errors: Counter,
    pub generations_started: Counter,
    pub generations_refused: Counter,
    pub generations_unloaded: Counter,
    /// Generations left loaded because a call into them did not return in time.
    pub generations_abandoned: Counter,
    /// Retired generations whose copy is still mapped (should stay 0 on Linux).
    pub generations_still_mapped: Gauge,
    pub generations_loaded: Gauge,
    /// Time events were held back while a generation was swapped.
    pub swap_pause_seconds: Histogram,
    /// Time each sync of the state database's WAL took: under durability=full every reply
    /// waits for one, so this is the disk's share of the reply latency.
    pub store_wal_sync_seconds: Histogram,
    /// Events in a channel instance's queue (and parked while no generation runs), not yet
    /// handed to its adapter, as of the instance's last turn of its loop.
    pub queue_depth: Family<Labels, Gauge>,
    /// WebSockets of a channel instance that are open now.
    pub websockets_connected: Family<Labels, Gauge>,
    /// WebSockets a channel instance opened after its first one (each a reconnect).
    pub websocket_reconnects: Family<Labels, Counter>,
    /// HTTP requests a channel instance's adapter asked for and that are not answered yet.
    pub http_requests_in_flight: Family<Labels, Gauge>,
    /// HTTP requests a channel instance's adapter asked for.
    pub http_requests: Family<Labels, Counter>,
    /// 1 while a channel instance is halted (its restart budget spent), else 0.
    pub instance_halted: Family<Labels, Gauge>,
    /// How long an agent took to answer a turn (labels: channel, agent).
    pub agent_turn_seconds: Histograms,
    /// From the channel instance taking an inbound message's event from its queue to the
    /// chat server confirming the reply.
    pub reply_latency_seconds: Histograms,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let metrics = Metrics {
            inbound_messages: Family::default(),
            replies_delivered: Family::default(),
            replies_failed: Family::default(),
            adapter_panics: Family::default(),
            adapter_restarts: Family::default(),
            adapter_hangs: Family::default(),
            instance_restarts: Family::default(),
            dead_letters: Family::default(),
            events_dispatched: Family::default(),
            agent_errors: Family::default(),
            reloads: Family::default(),
            inbound_redelivered: Family::default(),
            lane_overflow: Family::default(),
            store_errors: Counter::default(),
            generations_started: Counter::default(),
            generations_refused: Counter::default(),
            generations_unloaded: Counter::default(),
            generations_abandoned: Counter::default(),
            generations_still_mapped: Gauge::default(),
            generations_loaded: Gauge::default(),
            swap_pause_seconds: Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0]),
            store_wal_sync_seconds: Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5]),
            queue_depth: Family::default(),
            websockets_connected: Family::default(),
            websocket_reconnects: Family::default(),
            http_requests_in_flight: Family::default(),
            http_requests: Family::default(),
            instance_halted: Family::default(),
            agent_turn_seconds: Family::new_with_constructor(wait_histogram),
            reply_latency_seconds: Family::new_with_constructor(wait_histogram),
            registry: Registry::default(),
        };
        registry.register("inbound_messages", "Inbound messages routed to a session", metrics.inbound_messages.clone());
        registry.register("replies_delivered", "Replies the chat server confirmed", metrics.replies_delivered.clone());
        registry.register("replies_failed", "Replies the adapter gave up on", metrics.replies_failed.clone());
        registry.register("adapter_panics", "Panics caught at the adapter ABI edge", metrics.adapter_panics.clone());
        registry.register(
            "adapter_restarts",
            "Adapters restarted from their last good state after a panic",
            metrics.adapter_restarts.clone(),
        );
        registry.register(
            "adapter_hangs",
            "Adapter calls that did not return within gateway.adapter_call_timeout_ms",
            metrics.adapter_hangs.clone(),
        );
        registry.register(
            "instance_restarts",
            "Channel instances started again after their task died",
            metrics.instance_restarts.clone(),
        );
        registry.register(
            "dead_letters",
            "Events given up on after the adapter failed on them twice",
            metrics.dead_letters.clone(),
        );
        registry.register("events_dispatched", "Events handed to adapters", metrics.events_dispatched.clone());
        registry.register("agent_errors", "Agent turns that failed", metrics.agent_errors.clone());
        registry.register("reloads", "Reloads by trigger and outcome", metrics.reloads.clone());
        registry.register(
            "inbound_redelivered",
            "Inbound messages seen before (resume replay, catch-up), not answered again",
            metrics.inbound_redelivered.clone(),
        );
        registry.register(
            "lane_overflow",
            "Messages that found their session's lane full and waited in the store for room",
            metrics.lane_overflow.clone(),
        );
        registry.register("store_errors", "Failed writes to the state database", metrics.store_errors.clone());
        registry.register("generations_started", "Adapter generations started", metrics.generations_started.clone());
        registry.register(
            "generations_refused",
            "Adapter generations refused or rolled back",
            metrics.generations_refused.clone(),
        );
        registry.register(
            "generations_unloaded",
            "Adapter generations unloaded and unmapped",
            metrics.generations_unloaded.clone(),
        );
        registry.register(
            "generations_abandoned",
            "Adapter generations left loaded because a call into them did not return in time",
            metrics.generations_abandoned.clone(),
        );
        registry.register(
            "generations_still_mapped",
            "Retired generations whose copy is still mapped",
            metrics.generations_still_mapped.clone(),
        );
        registry.register(
            "generations_loaded",
            "Adapter libraries loaded into this process (each costs a TLS key)",
            metrics.generations_loaded.clone(),
        );
        registry.register(
            "swap_pause_seconds",
            "Time events were buffered during a generation swap",
            metrics.swap_pause_seconds.clone(),
        );
        registry.register(
            "store_wal_sync_seconds",
            "Time each sync of the state database's WAL took (under durability=full every reply waits for one)",
            metrics.store_wal_sync_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Events waiting in a channel instance's queue for its adapter (as of the instance's last loop turn)",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "websockets_connected",
            "WebSockets of a channel instance that are open now",
            metrics.websockets_connected.clone(),
        );
        registry.register(
            "websocket_reconnects",
            "WebSockets a channel instance opened after its first (reconnects; a Mattermost reconnect that cannot resume is followed by a REST catch-up)",
            metrics.websocket_reconnects.clone(),
        );
        registry.register(
            "http_requests_in_flight",
            "HTTP requests of a channel instance's adapter not answered yet",
            metrics.http_requests_in_flight.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests of a channel instance's adapter",
            metrics.http_requests.clone(),
        );
        registry.register(
            "instance_halted",
            "1 while a channel instance is halted (adapter restart budget spent) until a new build starts",
            metrics.instance_halted.clone(),
        );
        registry.register(
            "agent_turn_seconds",
            "Time an agent took to answer one turn",
            metrics.agent_turn_seconds.clone(),
        );
        registry.register(
            "reply_latency_seconds",
            "From a channel instance taking an inbound message off its queue to the chat server confirming the reply",
            metrics.reply_latency_seconds.clone(),
        );
        Metrics { registry, ..metrics }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn channel(channel: &str) -> Labels {
    vec![("channel", channel.to_string())]
}

pub fn channel_and_agent(channel: &str, agent: &str) -> Labels {
    vec![("channel", channel.to_string()), ("agent", agent.to_string())]
}

/// The connection metrics of one channel instance, for its transport (each handle shares its
/// value with the registry's series).
#[derive(Clone, Default)]
pub struct TransportMetrics {
    pub websockets_connected: Gauge,
    pub websocket_reconnects: Counter,
    pub http_requests_in_flight: Gauge,
    pub http_requests: Counter,
}

impl Metrics {
    pub fn transport(&self, channel_id: &str) -> TransportMetrics {
        let labels = channel(channel_id);
        TransportMetrics {
            websockets_connected: self.websockets_connected.get_or_create(&labels).clone(),
            websocket_reconnects: self.websocket_reconnects.get_or_create(&labels).clone(),
            http_requests_in_flight: self.http_requests_in_flight.get_or_create(&labels).clone(),
            http_requests: self.http_requests.get_or_create(&labels).clone(),
        }
    }
}
