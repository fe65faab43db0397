//! The ledger: every adapter generation this process started, for `/status` and the logs.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
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
}
