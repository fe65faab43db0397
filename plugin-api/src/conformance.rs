//! A conformance harness: drives an [`AdapterPlugin`] in-process through the same guarded ABI
//! wrapper the host uses, with an in-memory host, and checks the adapter contract.
//! Adapter crates call [`check_contract`] from their tests, then use [`Harness`] for their
//! own protocol tests.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RNone, ROption, RSome, RStr, RString, RVec},
};

use crate::{
    action::{Action, LogLevel},
    adapter::{AdapterBox, PluginError},
    event::{Event, ShutdownReason},
    export::{boxed, AdapterPlugin},
    host::{HostApi, HostApi_TO, HostHandle, SessionInfo},
    module::{Handover, OpenConnection, StateBlob},
    ReplyTarget, ABI_VERSION,
};

/// What the in-memory host recorded.
#[derive(Debug, Default)]
pub struct HostRecord {
    pub logs: Vec<(LogLevel, String)>,
    pub sessions: BTreeMap<String, SessionInfo>,
    pub secrets: BTreeMap<String, String>,
    pub now_ms: i64,
}

/// An in-memory host for tests; `channel_instance` names the instance its sessions belong to.
#[derive(Clone)]
pub struct TestHost {
    pub channel_instance: String,
    pub record: Arc<Mutex<HostRecord>>,
}

impl TestHost {
    pub fn new(channel_instance: &str) -> Self {
        let record = HostRecord { now_ms: 1_700_000_000_000, ..HostRecord::default() };
        Self { channel_instance: channel_instance.into(), record: Arc::new(Mutex::new(record)) }
    }

    pub fn with_secret(self, name: &str, value: &str) -> Self {
        self.record.lock().unwrap().secrets.insert(name.into(), value.into());
        self
    }

    pub fn handle(&self) -> HostHandle {
        HostApi_TO::from_ptr(RArc::new(self.clone()), TD_Opaque)
    }

    pub fn advance(&self, ms: i64) {
        self.record.lock().unwrap().now_ms += ms;
    }
}

impl HostApi for TestHost {
    fn log(&self, level: LogLevel, message: RStr<'_>) {
        self.record.lock().unwrap().logs.push((level, message.to_string()));
    }

    fn secret(&self, name: RStr<'_>) -> ROption<RString> {
        self.record.lock().unwrap().secrets.get(name.as_str()).map(|s| s.as_str().into()).into()
    }

    fn now_ms(&self) -> i64 {
        self.record.lock().unwrap().now_ms
    }

    fn session(&self, key: RStr<'_>) -> ROption<SessionInfo> {
        self.record.lock().unwrap().sessions.get(key.as_str()).cloned().into()
    }

    fn sessions(&self, key_prefix: RStr<'_>) -> RVec<SessionInfo> {
        let record = self.record.lock().unwrap();
        record
            .sessions
            .values()
            .filter(|s| s.key.starts_with(key_prefix.as_str()))
            .filter(|s| s.channel_instance == self.channel_instance.as_str())
            .cloned()
            .collect()
    }

    fn open_session(&self, key: RStr<'_>, agent_id: RStr<'_>, target: ReplyTarget) -> SessionInfo {
        let mut record = self.record.lock().unwrap();
        let now = record.now_ms;
        let channel_instance = self.channel_instance.as_str().into();
        record
            .sessions
            .entry(key.to_string())
            .or_insert_with(|| SessionInfo {
                key: key.into(),
                agent_id: agent_id.into(),
                channel_instance,
                target,
                created_at_ms: now,
                last_active_ms: now,
            })
            .clone()
    }
}

/// One adapter generation driven in-process.
pub struct Harness {
    pub host: TestHost,
    pub adapter: AdapterBox,
    pub generation: u64,
}

impl Harness {
    /// Construct generation 1 of `A` and deliver `Started`; returns the harness and the
    /// actions `Started` produced.
    pub fn start<A: AdapterPlugin>(host: TestHost, config_json: &str) -> Result<(Self, Vec<Action>), String> {
        let handover = Handover { generation: 1, previous_state: RNone, connections: RVec::new(), cold: true };
        Self::start_with::<A>(host, config_json, handover)
    }

    pub fn start_with<A: AdapterPlugin>(
        host: TestHost,
        config_json: &str,
        handover: Handover,
    ) -> Result<(Self, Vec<Action>), String> {
        let generation = handover.generation;
        let adapter = A::new(host.handle(), config_json, handover)?;
        let mut harness = Self { host, adapter: boxed(adapter), generation };
        let actions = harness.feed(Event::Started { generation }).map_err(|e| e.to_string())?;
        Ok((harness, actions))
    }

    /// Hand one event to the adapter and return its actions (converted from the ABI form).
    pub fn feed(&mut self, event: Event) -> Result<Vec<Action>, PluginError> {
        let actions = self.adapter.handle(event.into_ne()).into_result()?;
        Ok(actions.into_iter().filter_map(|a| a.into_enum().ok()).collect())
    }

    /// Which conversation the adapter says `event` concerns (through the ABI method).
    pub fn conversation_of(&self, event: &Event) -> Result<Option<String>, PluginError> {
        let found = self.adapter.conversation_of(&event.clone().into_ne()).into_result()?;
        Ok(found.into_option().map(|c| c.into_string()))
    }

    /// Hand this generation over as the host does for a replacement: its state is exported
    /// first (the host keeps the old generation untold until the new one is built from it),
    /// then it is told it was replaced.
    pub fn hand_over(mut self) -> Result<(StateBlob, Vec<Action>), PluginError> {
        let state = self.adapter.export_state().into_result()?;
        let actions = self.feed(Event::Shutdown { reason: ShutdownReason::Replaced })?;
        Ok((state, actions))
    }
}

/// Connections a list of actions opens.
pub fn opened_connections(actions: &[Action]) -> Vec<OpenConnection> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::WsOpen { conn, url, .. } => Some(OpenConnection { conn: *conn, url: url.clone() }),
            _ => None,
        })
        .collect()
}

/// HTTP requests a list of actions makes, by request id.
fn requested(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| if let Action::HttpRequest { request, .. } = a { Some(*request) } else { None })
        .collect()
}

/// Check the contract every adapter must keep:
/// - the manifest names the adapter, a version and this crate's ABI version;
/// - `valid_config` validates clean; each `(config, key_path)` in `invalid_configs` yields a
///   problem at that key path;
/// - garbage frames, garbage HTTP answers (to its own requests and to unknown ones) and
///   unknown ids neither panic nor stop the adapter — WebSocket and HTTP-only adapters alike;
/// - a replacement generation built from the exported state and the open connections adopts
///   them: it opens no new WebSocket, and the old one closes none on `Replaced`.
///
/// Returns every violation found, not just the first.
pub fn check_contract<A: AdapterPlugin>(
    host: TestHost,
    valid_config: &str,
    invalid_configs: &[(&str, &str)],
) -> Result<(), Vec<String>> {
    let mut violations = Vec::new();
    let manifest = A::manifest();
    if manifest.adapter_name.trim().is_empty() {
        violations.push("manifest: adapter_name is empty".to_string());
    }
    if manifest.adapter_version.trim().is_empty() {
        violations.push("manifest: adapter_version is empty".to_string());
    }
    if manifest.abi_version != ABI_VERSION {
        violations.push(format!("manifest: abi_version {} but this crate is {ABI_VERSION}", manifest.abi_version));
    }
    let problems = A::validate_config(valid_config);
    if !problems.is_empty() {
        violations.push(format!("validate_config: the valid config has problems: {problems:?}"));
    }
    for (config, key_path) in invalid_configs {
        let problems = A::validate_config(config);
        if !problems.iter().any(|p| p.key_path.as_str() == *key_path) {
            violations
                .push(format!("validate_config: expected a problem at `{key_path}` for {config}, got {problems:?}"));
        }
    }

    let (mut first, started) = match Harness::start::<A>(host.clone(), valid_config) {
        Ok(started) => started,
        Err(e) => {
            violations.push(format!("constructor refused the valid config: {e}"));
            return Err(violations);
        }
    };
    let connections = opened_connections(&started);
    let mut feed = |harness: &mut Harness, event: Event| {
        let shown = format!("{event:?}");
        match harness.feed(event) {
            Ok(actions) => actions,
            Err(e) => {
                violations.push(format!("handle({shown}) failed: {e}"));
                Vec::new()
            }
        }
    };
    // Ids nobody issued, whatever kind of adapter this is.
    for event in [
        Event::HttpResponse { request: u64::MAX, status: 200, headers: RVec::new(), body: "{}".into() },
        Event::HttpFailed { request: u64::MAX, error: "unknown request".into() },
        Event::TimerFired { timer: u64::MAX },
        Event::WsFrame { conn: u64::MAX, text: "{}".into() },
        Event::ReplyMayHaveGoneOut { reply_id: u64::MAX },
    ] {
        feed(&mut first, event);
    }
    // Its own requests answered with garbage, an error status or a failure, in turn; what
    // it asks for in answer gets the next kind of garbage (a bounded number of rounds).
    let mut pending = requested(&started);
    for round in 0..3 {
        let mut next = Vec::new();
        for request in std::mem::take(&mut pending) {
            let event = match round {
                0 => Event::HttpResponse {
                    request,
                    status: 200,
                    headers: RVec::new(),
                    body: "this is not json \u{0} {".into(),
                },
                1 => Event::HttpResponse { request, status: 500, headers: RVec::new(), body: "".into() },
                _ => Event::HttpFailed { request, error: "connection refused".into() },
            };
            next.extend(requested(&feed(&mut first, event)));
        }
        pending = next;
    }
    for conn in &connections {
        let events = [
            Event::WsOpened { conn: conn.conn },
            Event::WsFrame { conn: conn.conn, text: "this is not json".into() },
            Event::WsFrame { conn: conn.conn, text: "{\"event\":42}".into() },
            Event::WsFrame { conn: u64::MAX, text: "{}".into() },
            Event::HttpFailed { request: u64::MAX, error: "unknown request".into() },
            Event::TimerFired { timer: u64::MAX },
        ];
        for event in events {
            feed(&mut first, event);
        }
    }
    match first.hand_over() {
        Err(e) => violations.push(format!("hand_over failed: {e}")),
        Ok((state, shutdown_actions)) => {
            for action in &shutdown_actions {
                if let Action::WsClose { conn, .. } = action {
                    violations.push(format!("Shutdown(Replaced) closed connection {conn}"));
                }
            }
            let handover = Handover {
                generation: 2,
                previous_state: RSome(state),
                connections: connections.clone().into(),
                cold: false,
            };
            match Harness::start_with::<A>(host, valid_config, handover) {
                Err(e) => violations.push(format!("generation 2 refused the handover: {e}")),
                Ok((_, actions)) => {
                    if !connections.is_empty() && !opened_connections(&actions).is_empty() {
                        violations.push(
                            "generation 2 opened a new WebSocket instead of adopting the handed-over one".to_string(),
                        );
                    }
                }
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{module::ConfigProblem, Manifest};

    /// An HTTP-only adapter that trusts what the server says: it polls once when started
    /// and takes the answer's body for a number without looking.
    struct Trusting;

    impl AdapterPlugin for Trusting {
        fn manifest() -> Manifest {
            Manifest {
                adapter_name: "trusting".into(),
                adapter_version: "0".into(),
                abi_version: ABI_VERSION,
                build: "t".into(),
            }
        }

        fn validate_config(_config_json: &str) -> Vec<ConfigProblem> {
            Vec::new()
        }

        fn new(_host: HostHandle, _config_json: &str, _handover: Handover) -> Result<Self, String> {
            Ok(Trusting)
        }

        fn handle(&mut self, event: Event) -> Vec<Action> {
            match event {
                Event::Started { .. } => vec![Action::HttpRequest {
                    request: 1,
                    method: "GET".into(),
                    url: "http://127.0.0.1:1/poll".into(),
                    headers: RVec::new(),
                    body: "".into(),
                    timeout_ms: 1000,
                }],
                Event::HttpResponse { request: 1, body, .. } => {
                    let cursor: u64 = body.as_str().parse().expect("the server sends a number");
                    let _ = cursor;
                    Vec::new()
                }
                _ => Vec::new(),
            }
        }

        fn export_state(&mut self) -> StateBlob {
            StateBlob { format_version: 1, data: "{}".into() }
        }
    }

    #[test]
    fn an_http_only_adapter_that_panics_on_a_garbage_answer_fails_the_contract() {
        let violations = check_contract::<Trusting>(TestHost::new("t"), "{}", &[]).expect_err("a violation");
        assert!(
            violations.iter().any(|v| v.contains("HttpResponse") && v.contains("request: 1")),
            "the garbage answer to its own request is named: {violations:?}"
        );
    }
}
