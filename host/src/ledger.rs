//! The ledger: every adapter generation this process started, for `/status` and the logs.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GenerationState {
    Running,
    /// Replaced; being torn down.
    Retiring,
    /// Torn down and no longer mapped.
    Unloaded,
    /// Torn down but the copy is still mapped (leaked).
    StillMapped,
    /// Its constructor failed; never served.
    Refused,
    /// It kept failing after restarts; the instance stopped running it (terminal).
    Halted,
    /// A call into it did not return in time: its thread and library were left as they
    /// were (still loaded, counted against the generation budget) and the instance went on
    /// without it.
    Abandoned,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerationRecord {
    pub channel: String,
    pub generation: u64,
    pub adapter_name: String,
    pub adapter_version: String,
    pub build: String,
    /// The ABI minor the library was built against (0: v1.0, which could not say).
    pub abi_minor: u32,
    pub source: PathBuf,
    pub sha256: String,
    pub copy: PathBuf,
    pub loaded_at_ms: i64,
    pub state: GenerationState,
    pub events_handled: u64,
    /// How long events were held while this generation took over (µs): until it had handled
    /// the events that queued up meanwhile.
    pub swap_pause_us: Option<u64>,
    /// Until that first batch was also stored and what it asked for carried out (µs).
    pub swap_settled_us: Option<u64>,
    /// Whether `/proc/self/maps` still lists the copy (`null` where it cannot be told).
    pub mapped: Option<bool>,
}

#[derive(Clone, Default)]
pub struct Ledger {
    records: Arc<Mutex<Vec<GenerationRecord>>>,
    /// Channel instances whose adapter says it cannot work, with why (`Action::Health`).
    problems: Arc<Mutex<BTreeMap<String, String>>>,
    /// Each channel instance's connections as its transport last saw them.
    connections: Arc<Mutex<BTreeMap<String, Connections>>>,
    /// Channel instances whose platform answered since this process started them (see
    /// [`Ledger::mark_reached`]): what start-up readiness waits for.
    reached: Arc<Mutex<BTreeSet<String>>>,
}

/// Why channel instances are not ready, as `/readyz` and the service manager's status say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotReady {
    /// Expected instances with no running adapter generation.
    pub missing: Vec<String>,
    /// Expected instances that cannot work, with why (what their adapter reported, or no
    /// WebSocket up for longer than the grace).
    pub problems: BTreeMap<String, String>,
}

impl NotReady {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.problems.is_empty()
    }

    /// One line: `no running adapter for a, b; c: <problem>`.
    pub fn reasons(&self) -> String {
        let mut reasons: Vec<String> = Vec::new();
        if !self.missing.is_empty() {
            reasons.push(format!("no running adapter for {}", self.missing.join(", ")));
        }
        reasons.extend(self.problems.iter().map(|(channel, problem)| format!("{channel}: {problem}")));
        reasons.join("; ")
    }
}

/// How many of an instance's WebSockets are up, and since when (ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Connections {
    pub websockets_up: usize,
    pub since_ms: i64,
}

impl Ledger {
    pub fn add(&self, record: GenerationRecord) {
        self.records.lock().unwrap().push(record);
    }

    pub fn update(&self, channel: &str, generation: u64, change: impl FnOnce(&mut GenerationRecord)) {
        let mut records = self.records.lock().unwrap();
        if let Some(record) = records.iter_mut().rev().find(|r| r.channel == channel && r.generation == generation) {
            change(record);
        }
    }

    pub fn snapshot(&self) -> Vec<GenerationRecord> {
        self.records.lock().unwrap().clone()
    }

    /// Record what the adapter of `channel` says of its health; whether that changed it.
    pub fn set_problem(&self, channel: &str, problem: Option<String>) -> bool {
        let mut problems = self.problems.lock().unwrap();
        match problem {
            Some(problem) => problems.insert(channel.to_string(), problem.clone()).as_ref() != Some(&problem),
            None => problems.remove(channel).is_some(),
        }
    }

    /// Record that `channel` has `websockets_up` WebSockets open (a change restarts `since_ms`).
    pub fn set_connections(&self, channel: &str, websockets_up: usize, now_ms: i64) {
        let mut connections = self.connections.lock().unwrap();
        let known = connections.get(channel).map(|c| c.websockets_up);
        if known != Some(websockets_up) {
            connections.insert(channel.to_string(), Connections { websockets_up, since_ms: now_ms });
        }
    }

    pub fn connections(&self) -> BTreeMap<String, Connections> {
        self.connections.lock().unwrap().clone()
    }

    /// Channel instances whose adapter reported a problem, with it.
    pub fn problems(&self) -> BTreeMap<String, String> {
        self.problems.lock().unwrap().clone()
    }

    /// The running generation of each channel.
    pub fn running(&self) -> Vec<GenerationRecord> {
        self.snapshot().into_iter().filter(|r| r.state == GenerationState::Running).collect()
    }

    /// The platform of `channel` answered: a WebSocket opened, or — for an adapter that asked
    /// for none — an HTTP request got a 2xx answer.
    pub fn mark_reached(&self, channel: &str) {
        self.reached.lock().unwrap().insert(channel.to_string());
    }

    pub fn reached(&self, channel: &str) -> bool {
        self.reached.lock().unwrap().contains(channel)
    }

    /// Which of the `expected` instances are not ready now, and why: no running generation,
    /// a problem their adapter reported, or all their WebSockets down for longer than
    /// `disconnected_grace` (a reconnect takes a second or two). An instance that never opened
    /// a socket (an HTTP-only adapter, or a server that refused it from the start) is the
    /// adapter's to report (`Action::Health`).
    pub fn not_ready(&self, expected: &BTreeSet<String>, disconnected_grace: Duration, now_ms: i64) -> NotReady {
        let running: BTreeSet<String> = self.running().into_iter().map(|r| r.channel).collect();
        let missing = expected.iter().filter(|c| !running.contains(*c)).cloned().collect();
        let mut problems = self.problems();
        problems.retain(|channel, _| expected.contains(channel));
        let grace_ms = disconnected_grace.as_millis() as i64;
        for (channel, connections) in self.connections() {
            if connections.websockets_up == 0 && now_ms - connections.since_ms > grace_ms && expected.contains(&channel)
            {
                let down_s = (now_ms - connections.since_ms) / 1000;
                problems.entry(channel).or_insert_with(|| format!("no WebSocket up for {down_s} s"));
            }
        }
        NotReady { missing, problems }
    }
}
