//! A conformance harness: drives an adapter through the same guarded ABI entry points the host
//! uses, with an in-memory host, and checks the adapter contract.
//!
//! The checks run against any [`AdapterSource`]: an [`AdapterPlugin`] linked into the test
//! ([`Linked`]; adapter crates call [`check_contract`] from their tests, then use [`Harness`]
//! for their own protocol tests), or the root module of a built library
//! ([`AdapterModuleRef`]; `switchboard check-plugin --conformance <file>` runs
//! [`run_checks`] on one, in a child process).

use std::{
    collections::{BTreeMap, BTreeSet},
    marker::PhantomData,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RNone, ROption, RSome, RStr, RString, RVec},
};

use crate::{
    action::{Action, LogLevel},
    adapter::{AdapterBox, PluginError},
    event::{Event, OutboundReply, ShutdownReason},
    export::{boxed, guard, AdapterPlugin},
    host::{HostApi, HostApi_TO, HostHandle, OpenResource, ResourceKind, SessionInfo},
    module::{AdapterModuleRef, ConfigProblem, Handover, Manifest, OpenConnection, StateBlob},
    ReplyTarget, ABI_VERSION,
};

/// What the in-memory host recorded.
#[derive(Debug, Default)]
pub struct HostRecord {
    pub logs: Vec<(LogLevel, String)>,
    pub sessions: BTreeMap<String, SessionInfo>,
    pub secrets: BTreeMap<String, String>,
    /// Answer every secret that is not in `secrets` with a placeholder (see
    /// [`TestHost::with_placeholder_secrets`]).
    pub placeholder_secrets: bool,
    pub now_ms: i64,
    /// What `HostApi::handed_over` answers: `Some` (empty until a handover sets it) for a
    /// host of this ABI minor, `None` to play a v1.0 host ([`TestHost::as_abi_v1_0`]).
    pub handed_over: Option<Vec<OpenResource>>,
}

/// The value [`TestHost::with_placeholder_secrets`] answers for every secret.
pub const PLACEHOLDER_SECRET: &str = "conformance-placeholder-secret";

/// An in-memory host for tests; `channel_instance` names the instance its sessions belong to.
#[derive(Clone)]
pub struct TestHost {
    pub channel_instance: String,
    pub record: Arc<Mutex<HostRecord>>,
}

impl TestHost {
    pub fn new(channel_instance: &str) -> Self {
        let record = HostRecord { now_ms: 1_700_000_000_000, handed_over: Some(Vec::new()), ..HostRecord::default() };
        Self { channel_instance: channel_instance.into(), record: Arc::new(Mutex::new(record)) }
    }

    pub fn with_secret(self, name: &str, value: &str) -> Self {
        self.record.lock().unwrap().secrets.insert(name.into(), value.into());
        self
    }

    /// Answer every secret the adapter asks for with [`PLACEHOLDER_SECRET`]: a checker that
    /// knows nothing of the adapter's secrets must still be able to build it, and must never
    /// read the operator's real ones.
    pub fn with_placeholder_secrets(self) -> Self {
        self.record.lock().unwrap().placeholder_secrets = true;
        self
    }

    /// Play a host of ABI v1.0: `handed_over` answers `None`, so an adapter falls back to
    /// what v1.0 had (`HttpRequest`, the handover's WebSocket list).
    pub fn as_abi_v1_0(self) -> Self {
        self.record.lock().unwrap().handed_over = None;
        self
    }

    /// What the next generation inherits, as `HostApi::handed_over` will list it (a host of
    /// ABI v1.1 or later).
    pub fn set_handed_over(&self, resources: Vec<OpenResource>) {
        let mut record = self.record.lock().unwrap();
        if record.handed_over.is_some() {
            record.handed_over = Some(resources);
        }
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
        let record = self.record.lock().unwrap();
        match record.secrets.get(name.as_str()) {
            Some(value) => RSome(value.as_str().into()),
            None if record.placeholder_secrets => RSome(PLACEHOLDER_SECRET.into()),
            None => RNone,
        }
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

    fn handed_over(&self) -> ROption<RVec<OpenResource>> {
        self.record.lock().unwrap().handed_over.clone().map(RVec::from).into()
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

/// The constructor side of an adapter, which the checks build generations from.
pub trait AdapterSource {
    fn manifest(&self) -> Result<Manifest, PluginError>;
    fn validate_config(&self, config_json: &str) -> Result<Vec<ConfigProblem>, PluginError>;
    fn new_adapter(&self, host: HostHandle, config_json: &str, handover: Handover) -> Result<AdapterBox, PluginError>;
}

/// An [`AdapterPlugin`] linked into this process, behind the panic guard that
/// [`export_adapter!`](crate::export_adapter) puts around a library's entry points.
pub struct Linked<A>(PhantomData<fn() -> A>);

impl<A: AdapterPlugin> Linked<A> {
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<A: AdapterPlugin> Default for Linked<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: AdapterPlugin> AdapterSource for Linked<A> {
    fn manifest(&self) -> Result<Manifest, PluginError> {
        guard(A::manifest).into_result()
    }

    fn validate_config(&self, config_json: &str) -> Result<Vec<ConfigProblem>, PluginError> {
        guard(|| A::validate_config(config_json)).into_result()
    }

    fn new_adapter(&self, host: HostHandle, config_json: &str, handover: Handover) -> Result<AdapterBox, PluginError> {
        match guard(|| A::new(host, config_json, handover)).into_result()? {
            Ok(adapter) => Ok(boxed(adapter)),
            Err(reason) => Err(PluginError::Failed(reason.into())),
        }
    }
}

/// The root module of a loaded adapter library (what the host calls).
impl AdapterSource for AdapterModuleRef {
    fn manifest(&self) -> Result<Manifest, PluginError> {
        (AdapterModuleRef::manifest(self))().into_result()
    }

    fn validate_config(&self, config_json: &str) -> Result<Vec<ConfigProblem>, PluginError> {
        let problems = (AdapterModuleRef::validate_config(self))(RStr::from_str(config_json)).into_result()?;
        Ok(problems.into_vec())
    }

    fn new_adapter(&self, host: HostHandle, config_json: &str, handover: Handover) -> Result<AdapterBox, PluginError> {
        (AdapterModuleRef::new_adapter(self))(host, RStr::from_str(config_json), handover).into_result()
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
        Self::start_with::<A>(host, config_json, first_handover())
    }

    pub fn start_with<A: AdapterPlugin>(
        host: TestHost,
        config_json: &str,
        handover: Handover,
    ) -> Result<(Self, Vec<Action>), String> {
        Self::start_from(&Linked::<A>::new(), host, config_json, handover)
    }

    /// [`Self::start_with`] for any [`AdapterSource`] (a loaded library, say).
    pub fn start_from(
        source: &dyn AdapterSource,
        host: TestHost,
        config_json: &str,
        handover: Handover,
    ) -> Result<(Self, Vec<Action>), String> {
        let generation = handover.generation;
        let adapter = source.new_adapter(host.handle(), config_json, handover).map_err(|e| e.to_string())?;
        let mut harness = Self { host, adapter, generation };
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

/// What the very first generation of an instance is handed: cold, nothing before it.
fn first_handover() -> Handover {
    Handover { generation: 1, previous_state: RNone, connections: RVec::new(), cold: true }
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

/// HTTP requests a list of actions makes (v1.0 `HttpRequest` and v1.1 `HttpCall`), by id.
fn requested(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::HttpRequest { request, .. } => Some(*request),
            Action::HttpCall(call) => Some(call.request),
            _ => None,
        })
        .collect()
}

/// The checks [`run_checks`] reports, in order: (name, what it checks).
pub const CHECKS: &[(&str, &str)] = &[
    ("manifest", "the manifest names the adapter, a version and this ABI version"),
    (
        "validate_config",
        "the config validates clean, twice alike; each known-bad config gets a problem at its key path",
    ),
    ("validate_config_garbage", "garbage config text gets an answer, not a panic or a failure"),
    ("new_adapter_cold", "a first generation is built cold from the config and takes Started"),
    ("unknown_ids", "events for connection, request, timer and reply ids nobody issued are handled"),
    (
        "garbage_http",
        "garbage, error and failed answers to its own HTTP requests are handled (three rounds, following what it asks for in answer)",
    ),
    ("garbage_ws", "garbage frames on each WebSocket it opens are handled"),
    (
        "every_event",
        "AgentWorking, DeliverReply (also after ReplyMayHaveGoneOut), WsFrameSkipped and TimerFired for its timers are handled",
    ),
    (
        "handover",
        "export, then Shutdown(Replaced) closes nothing; a warm successor built from that state and the open connections adopts them and takes the responses its predecessor left in flight",
    ),
    ("stopping", "lost connections (WsClosed) and Shutdown(Stopping) are handled"),
    (
        "cold_restart",
        "a cold generation starts from the last exported state; unreadable state is refused or ignored, not a panic",
    ),
    ("export_state", "export_state after every batch succeeds, is idempotent and cheap"),
    ("conversation_of", "conversation_of answers for every event without failing, and the same twice"),
];

/// How long one `export_state` may take: the host calls it after every batch.
pub const EXPORT_STATE_BUDGET: Duration = Duration::from_millis(100);

/// How one check came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    /// Every violation found, not just the first.
    Failed(Vec<String>),
    /// Why the check could not run (a check it depends on failed).
    NotRun(String),
}

/// One check of [`CHECKS`] and how it came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Outcome,
    /// What the check found worth saying even when it passed (e.g. nothing to check).
    pub note: Option<String>,
}

/// What [`run_checks`] tells its observer as it goes.
#[derive(Debug)]
pub enum Progress<'a> {
    /// An entry point of the adapter is about to be called: a call that never returns, or
    /// takes the process down, does it here.
    Calling(&'a str),
    /// A check is complete.
    Checked(&'a CheckResult),
}

/// Run every check of [`CHECKS`] against the adapter `source` builds, with `config_json` (the
/// JSON of a channel instance table, host keys removed) and `host`; each `(config, key_path)`
/// of `invalid_configs` must get a problem at that key path. `observer` hears of every call
/// into the adapter before it is made, and of every check when it is complete.
pub fn run_checks(
    source: &dyn AdapterSource,
    host: TestHost,
    config_json: &str,
    invalid_configs: &[(&str, &str)],
    observer: &mut dyn FnMut(Progress<'_>),
) -> Vec<CheckResult> {
    let mut run = Run {
        source,
        host,
        config_json,
        observer,
        results: Vec::new(),
        export_state: Vec::new(),
        conversation_of: Vec::new(),
        last_state: None,
        in_flight: BTreeSet::new(),
        timers: BTreeSet::new(),
        connections: Vec::new(),
    };
    run.manifest();
    run.validate_config(invalid_configs);
    run.validate_config_garbage();
    let mut violations = Vec::new();
    let first = run.start(first_handover(), &mut violations);
    run.finish("new_adapter_cold", violations, None);
    let Some((mut first, _)) = first else {
        run.not_run_rest("the adapter could not be built (new_adapter_cold)");
        return run.results;
    };
    run.unknown_ids(&mut first);
    run.garbage_http(&mut first);
    run.garbage_ws(&mut first);
    run.every_event(&mut first);
    match run.handover(first) {
        Some(second) => run.stopping(second),
        None => run.not_run_one("stopping", "no successor generation (handover)"),
    }
    run.cold_restart();
    let export_state = std::mem::take(&mut run.export_state);
    run.finish("export_state", export_state, None);
    let conversation_of = std::mem::take(&mut run.conversation_of);
    run.finish("conversation_of", conversation_of, None);
    run.results
}

/// Check the contract every adapter must keep ([`CHECKS`]), with `A` linked in; `valid_config`
/// and `invalid_configs` as in [`run_checks`]. Returns every violation found, each after the
/// name of its check.
pub fn check_contract<A: AdapterPlugin>(
    host: TestHost,
    valid_config: &str,
    invalid_configs: &[(&str, &str)],
) -> Result<(), Vec<String>> {
    let results = run_checks(&Linked::<A>::new(), host, valid_config, invalid_configs, &mut |_| {});
    let violations: Vec<String> = results
        .into_iter()
        .flat_map(|result| match result.outcome {
            Outcome::Passed => Vec::new(),
            Outcome::Failed(violations) => violations.into_iter().map(|v| format!("{}: {v}", result.name)).collect(),
            Outcome::NotRun(why) => vec![format!("{}: not run: {why}", result.name)],
        })
        .collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

/// Config text no host sends, but a hand-edited file or a bug could: it must get an answer.
const GARBAGE_CONFIGS: &[&str] =
    &["", "not json", "{", "null", "42", "[]", "{}", "{\"\":null}", "{\"\\u0000\":[[[[{}]]]]}", "\"\u{feff}\""];

/// Frames a WebSocket may bring that no adapter should trip on.
fn garbage_frames() -> Vec<String> {
    vec![
        "this is not json".into(),
        "{\"event\":42}".into(),
        String::new(),
        "null".into(),
        // Deep nesting: a recursive parser without a limit overflows its stack on this.
        "[".repeat(100_000),
    ]
}

/// Why refusing unreadable state is worth a note.
const REFUSED_STATE: &str = "a cold instance whose stored state it cannot read stays down";

/// Where the replies the checks ask for go.
const CONVERSATION: &str = "conformance-conversation";

/// At most this much of an event or a config in a message.
const SHOWN_CHARS: usize = 160;

fn shorten(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// One run of the checks: the adapter's source, and what its generations asked for so far.
struct Run<'a> {
    source: &'a dyn AdapterSource,
    host: TestHost,
    config_json: &'a str,
    observer: &'a mut dyn FnMut(Progress<'_>),
    results: Vec<CheckResult>,
    /// Violations of the checks every batch contributes to, reported last.
    export_state: Vec<String>,
    conversation_of: Vec<String>,
    /// The state last exported, for the cold restart.
    last_state: Option<StateBlob>,
    /// Requests the adapter made that were not answered yet.
    in_flight: BTreeSet<u64>,
    /// Timers the adapter armed that did not fire yet.
    timers: BTreeSet<u64>,
    /// WebSockets the adapter opened that are not closed.
    connections: Vec<OpenConnection>,
}

impl Run<'_> {
    fn calling(&mut self, what: &str) {
        (self.observer)(Progress::Calling(what));
    }

    fn report(&mut self, result: CheckResult) {
        (self.observer)(Progress::Checked(&result));
        self.results.push(result);
    }

    fn finish(&mut self, name: &'static str, violations: Vec<String>, note: Option<String>) {
        let outcome = if violations.is_empty() { Outcome::Passed } else { Outcome::Failed(violations) };
        self.report(CheckResult { name, outcome, note });
    }

    fn not_run_one(&mut self, name: &'static str, why: &str) {
        self.report(CheckResult { name, outcome: Outcome::NotRun(why.to_string()), note: None });
    }

    /// Every check not reported yet is not run, for `why`.
    fn not_run_rest(&mut self, why: &str) {
        let reported: BTreeSet<&str> = self.results.iter().map(|r| r.name).collect();
        for (name, _) in CHECKS.iter().filter(|(name, _)| !reported.contains(name)) {
            self.not_run_one(name, why);
        }
    }

    fn manifest(&mut self) {
        self.calling("manifest()");
        let violations = match self.source.manifest() {
            Err(e) => vec![format!("manifest() failed: {e}")],
            Ok(manifest) => {
                let mut violations = Vec::new();
                if manifest.adapter_name.trim().is_empty() {
                    violations.push("adapter_name is empty".to_string());
                }
                if manifest.adapter_version.trim().is_empty() {
                    violations.push("adapter_version is empty".to_string());
                }
                if manifest.abi_version != ABI_VERSION {
                    violations.push(format!("abi_version {} but this crate is {ABI_VERSION}", manifest.abi_version));
                }
                violations
            }
        };
        self.finish("manifest", violations, None);
    }

    fn validate(&mut self, config: &str, violations: &mut Vec<String>) -> Option<Vec<ConfigProblem>> {
        let call = format!("validate_config({})", shorten(config));
        self.calling(&call);
        match self.source.validate_config(config) {
            Ok(problems) => Some(problems),
            Err(e) => {
                violations.push(format!("{call} failed: {e}"));
                None
            }
        }
    }

    fn validate_config(&mut self, invalid_configs: &[(&str, &str)]) {
        let mut violations = Vec::new();
        let config = self.config_json;
        let first = self.validate(config, &mut violations);
        let second = self.validate(config, &mut violations);
        if let (Some(first), Some(second)) = (first, second) {
            if !first.is_empty() {
                let listed: Vec<String> = first.iter().map(|p| format!("`{}`: {}", p.key_path, p.message)).collect();
                violations.push(format!("the config has problems: {}", listed.join("; ")));
            }
            if first != second {
                violations.push(format!("the same config validated twice gave {first:?}, then {second:?}"));
            }
        }
        for (config, key_path) in invalid_configs {
            if let Some(problems) = self.validate(config, &mut violations) {
                if !problems.iter().any(|p| p.key_path.as_str() == *key_path) {
                    violations.push(format!("expected a problem at `{key_path}` for {config}, got {problems:?}"));
                }
            }
        }
        self.finish("validate_config", violations, None);
    }

    fn validate_config_garbage(&mut self) {
        let mut violations = Vec::new();
        let half = self.config_json.char_indices().nth(self.config_json.chars().count() / 2).map_or(0, |(i, _)| i);
        let mut garbage: Vec<String> = GARBAGE_CONFIGS.iter().map(|c| c.to_string()).collect();
        garbage.push(self.config_json[..half].to_string());
        garbage.push(format!("{}}}]]", self.config_json));
        for config in &garbage {
            self.validate(config, &mut violations);
        }
        self.finish("validate_config_garbage", violations, None);
    }

    /// Build a generation from `handover` and hand it `Started`.
    fn start(&mut self, handover: Handover, violations: &mut Vec<String>) -> Option<(AdapterBox, Vec<Action>)> {
        let generation = handover.generation;
        let call = format!(
            "new_adapter(generation {generation}, {}, {} connection(s), {})",
            if handover.cold { "cold" } else { "warm" },
            handover.connections.len(),
            if handover.previous_state.is_some() { "with state" } else { "no state" }
        );
        self.calling(&call);
        match self.source.new_adapter(self.host.handle(), self.config_json, handover) {
            Err(e) => {
                violations.push(format!("{call} failed: {e}"));
                None
            }
            Ok(mut adapter) => {
                let actions = self.feed(&mut adapter, Event::Started { generation }, violations);
                Some((adapter, actions))
            }
        }
    }

    /// Hand `event` to `adapter` as a batch of its own, as the host would: `conversation_of`
    /// is asked first (the host asks it when it gives up on an event), then `handle`, then
    /// the state is exported.
    fn feed(&mut self, adapter: &mut AdapterBox, event: Event, violations: &mut Vec<String>) -> Vec<Action> {
        let shown = shorten(&format!("{event:?}"));
        self.check_conversation_of(adapter, &event, &shown);
        self.answered(&event);
        // What the host carries out of a replaced generation's answer: only its log records.
        let replaced = matches!(event, Event::Shutdown { reason: ShutdownReason::Replaced });
        let call = format!("handle({shown})");
        self.calling(&call);
        let actions: Vec<Action> = match adapter.handle(event.into_ne()).into_result() {
            Ok(actions) => actions.into_iter().filter_map(|a| a.into_enum().ok()).collect(),
            Err(e) => {
                violations.push(format!("{call} failed: {e}"));
                Vec::new()
            }
        };
        if !replaced {
            self.asked(&actions);
        }
        self.check_export_state(adapter, &call);
        actions
    }

    /// Forget what `event` answers.
    fn answered(&mut self, event: &Event) {
        match event {
            Event::HttpResponse { request, .. } | Event::HttpFailed { request, .. } => {
                self.in_flight.remove(request);
            }
            Event::TimerFired { timer } => {
                self.timers.remove(timer);
            }
            Event::WsClosed { conn, .. } => self.connections.retain(|c| c.conn != *conn),
            _ => {}
        }
    }

    /// Note what `actions` ask for.
    fn asked(&mut self, actions: &[Action]) {
        self.in_flight.extend(requested(actions));
        self.connections.extend(opened_connections(actions));
        for action in actions {
            match action {
                Action::SetTimer { timer, .. } => {
                    self.timers.insert(*timer);
                }
                Action::CancelTimer { timer } => {
                    self.timers.remove(timer);
                }
                Action::WsClose { conn, .. } => self.connections.retain(|c| c.conn != *conn),
                _ => {}
            }
        }
    }

    fn check_conversation_of(&mut self, adapter: &AdapterBox, event: &Event, shown: &str) {
        let call = format!("conversation_of({shown})");
        self.calling(&call);
        let ask = || {
            adapter
                .conversation_of(&event.clone().into_ne())
                .into_result()
                .map(|found| found.into_option().map(RString::into_string))
        };
        match (ask(), ask()) {
            (Err(e), _) | (_, Err(e)) => self.conversation_of.push(format!("{call} failed: {e}")),
            (Ok(first), Ok(second)) if first != second => {
                self.conversation_of.push(format!("{call} answered {first:?}, then {second:?}"))
            }
            _ => {}
        }
    }

    /// Export twice, as after a batch: both must succeed, agree, and be quick.
    fn check_export_state(&mut self, adapter: &mut AdapterBox, after: &str) {
        let call = format!("export_state() after {after}");
        self.calling(&call);
        let started = Instant::now();
        let first = adapter.export_state().into_result();
        let took = started.elapsed();
        let second = adapter.export_state().into_result();
        match (first, second) {
            (Err(e), _) | (_, Err(e)) => self.export_state.push(format!("{call} failed: {e}")),
            (Ok(first), Ok(second)) => {
                if first != second {
                    self.export_state.push(format!(
                        "{call} changed the adapter: two exports in a row differ ({} then {})",
                        shorten(&format!("{first:?}")),
                        shorten(&format!("{second:?}"))
                    ));
                }
                self.last_state = Some(first);
            }
        }
        if took > EXPORT_STATE_BUDGET {
            self.export_state.push(format!(
                "{call} took {} ms (at most {} ms: the host exports after every batch)",
                took.as_millis(),
                EXPORT_STATE_BUDGET.as_millis()
            ));
        }
    }

    fn unknown_ids(&mut self, adapter: &mut AdapterBox) {
        let mut violations = Vec::new();
        for event in [
            Event::HttpResponse { request: u64::MAX, status: 200, headers: RVec::new(), body: "{}".into() },
            Event::HttpFailed { request: u64::MAX, error: "unknown request".into() },
            Event::TimerFired { timer: u64::MAX },
            Event::WsOpened { conn: u64::MAX },
            Event::WsFrame { conn: u64::MAX, text: "{}".into() },
            Event::WsClosed { conn: u64::MAX, code: 1006, reason: "unknown connection".into() },
            Event::ReplyMayHaveGoneOut { reply_id: u64::MAX },
        ] {
            self.feed(adapter, event, &mut violations);
        }
        self.finish("unknown_ids", violations, None);
    }

    /// Its own requests answered with garbage, an error status or a failure, in turn; what it
    /// asks for in answer gets the next kind of garbage.
    fn garbage_http(&mut self, adapter: &mut AdapterBox) {
        let mut violations = Vec::new();
        let mut pending: Vec<u64> = self.in_flight.iter().copied().collect();
        let note = pending.is_empty().then(|| "the adapter made no HTTP request when started".to_string());
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
                next.extend(requested(&self.feed(adapter, event, &mut violations)));
            }
            pending = next;
        }
        self.finish("garbage_http", violations, note);
    }

    fn garbage_ws(&mut self, adapter: &mut AdapterBox) {
        let mut violations = Vec::new();
        let connections: Vec<u64> = self.connections.iter().map(|c| c.conn).collect();
        let note = connections.is_empty().then(|| "the adapter opened no WebSocket when started".to_string());
        for conn in connections {
            self.feed(adapter, Event::WsOpened { conn }, &mut violations);
            for text in garbage_frames() {
                self.feed(adapter, Event::WsFrame { conn, text: text.into() }, &mut violations);
            }
        }
        self.finish("garbage_ws", violations, note);
    }

    fn every_event(&mut self, adapter: &mut AdapterBox) {
        let mut violations = Vec::new();
        let reply = |reply_id: u64, thread_root_id: &str| {
            Event::DeliverReply(OutboundReply {
                reply_id,
                session_key: format!("agent:main:conformance:channel:{CONVERSATION}").into(),
                target: ReplyTarget::new(CONVERSATION, thread_root_id),
                text: "a reply from the conformance check".into(),
            })
        };
        let mut events = vec![
            Event::AgentWorking { target: ReplyTarget::new(CONVERSATION, "") },
            reply(1, ""),
            reply(2, "conformance-thread-root"),
            Event::ReplyMayHaveGoneOut { reply_id: 3 },
            reply(3, ""),
        ];
        for connection in &self.connections {
            events.push(Event::WsFrameSkipped { conn: connection.conn, text: "this is not json".into() });
        }
        for timer in &self.timers {
            events.push(Event::TimerFired { timer: *timer });
        }
        for event in events {
            self.feed(adapter, event, &mut violations);
        }
        self.finish("every_event", violations, None);
    }

    /// Replace `first` as the host does; returns the successor.
    fn handover(&mut self, mut first: AdapterBox) -> Option<AdapterBox> {
        let mut violations = Vec::new();
        self.calling("export_state() for the handover");
        let state = match first.export_state().into_result() {
            Ok(state) => Some(state),
            Err(e) => {
                violations.push(format!("export_state() for the handover failed: {e}"));
                None
            }
        };
        let shutdown = Event::Shutdown { reason: ShutdownReason::Replaced };
        for action in self.feed(&mut first, shutdown, &mut violations) {
            if let Action::WsClose { conn, .. } = action {
                violations.push(format!("Shutdown(Replaced) closed connection {conn}, which its successor owns"));
            }
        }
        self.calling("dropping generation 1");
        drop(first);
        let connections = self.connections.clone();
        let mut inherited: Vec<OpenResource> = connections
            .iter()
            .map(|c| OpenResource { kind: ResourceKind::WEBSOCKET, id: c.conn, detail: c.url.clone() })
            .collect();
        inherited.extend(self.in_flight.iter().map(|request| OpenResource {
            kind: ResourceKind::HTTP_REQUEST,
            id: *request,
            detail: "".into(),
        }));
        self.host.set_handed_over(inherited);
        let handover =
            Handover { generation: 2, previous_state: state.into(), connections: connections.into(), cold: false };
        let adopted = !self.connections.is_empty();
        let second = self.start(handover, &mut violations).map(|(mut second, actions)| {
            if adopted && !opened_connections(&actions).is_empty() {
                violations
                    .push("generation 2 opened a new WebSocket instead of adopting the handed-over one".to_string());
            }
            let in_flight: Vec<u64> = self.in_flight.iter().copied().collect();
            for request in in_flight {
                let response = Event::HttpResponse { request, status: 200, headers: RVec::new(), body: "{}".into() };
                self.feed(&mut second, response, &mut violations);
            }
            second
        });
        self.finish("handover", violations, None);
        second
    }

    fn stopping(&mut self, mut adapter: AdapterBox) {
        let mut violations = Vec::new();
        let connections: Vec<u64> = self.connections.iter().map(|c| c.conn).collect();
        for conn in connections {
            let lost = Event::WsClosed { conn, code: 1006, reason: "connection lost".into() };
            self.feed(&mut adapter, lost, &mut violations);
        }
        self.feed(&mut adapter, Event::Shutdown { reason: ShutdownReason::Stopping }, &mut violations);
        self.calling("dropping generation 2");
        drop(adapter);
        self.finish("stopping", violations, None);
    }

    fn cold_restart(&mut self) {
        let mut violations = Vec::new();
        let handover = Handover {
            generation: 3,
            previous_state: self.last_state.clone().into(),
            connections: RVec::new(),
            cold: true,
        };
        if let Some((adapter, _)) = self.start(handover, &mut violations) {
            self.calling("dropping generation 3");
            drop(adapter);
        }
        let unreadable = StateBlob { format_version: u32::MAX, data: "\u{0}this is no state of yours {".into() };
        let handover =
            Handover { generation: 4, previous_state: RSome(unreadable), connections: RVec::new(), cold: true };
        let call = "new_adapter(generation 4, cold, unreadable state)";
        self.calling(call);
        let mut note = None;
        match self.source.new_adapter(self.host.handle(), self.config_json, handover) {
            Ok(mut adapter) => {
                self.feed(&mut adapter, Event::Started { generation: 4 }, &mut violations);
                self.calling("dropping generation 4");
                drop(adapter);
            }
            Err(PluginError::Failed(reason)) => {
                note = Some(format!("unreadable state is refused ({reason}): {REFUSED_STATE}"));
            }
            Err(e) => violations.push(format!("{call} failed: {e}")),
        }
        self.finish("cold_restart", violations, note);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// An adapter whose export counts its calls: exporting changes it.
    struct CountingExports(u64);

    impl AdapterPlugin for CountingExports {
        fn manifest() -> Manifest {
            Manifest { adapter_name: "counting".into(), ..Trusting::manifest() }
        }

        fn validate_config(_config_json: &str) -> Vec<ConfigProblem> {
            Vec::new()
        }

        fn new(_host: HostHandle, _config_json: &str, _handover: Handover) -> Result<Self, String> {
            Ok(CountingExports(0))
        }

        fn handle(&mut self, _event: Event) -> Vec<Action> {
            Vec::new()
        }

        fn export_state(&mut self) -> StateBlob {
            self.0 += 1;
            StateBlob { format_version: 1, data: self.0.to_string().into() }
        }
    }

    #[test]
    fn an_export_that_changes_the_adapter_fails_only_the_export_check() {
        let results = run_checks(&Linked::<CountingExports>::new(), TestHost::new("t"), "{}", &[], &mut |_| {});
        let names: Vec<&str> = results.iter().map(|r| r.name).collect();
        assert_eq!(names, CHECKS.iter().map(|(name, _)| *name).collect::<Vec<_>>(), "every check, in order");
        for result in &results {
            match (result.name, &result.outcome) {
                ("export_state", Outcome::Failed(violations)) => {
                    assert!(violations[0].contains("two exports in a row differ"), "{violations:?}")
                }
                ("export_state", other) => panic!("the export check passed: {other:?}"),
                (_, outcome) => assert_eq!(outcome, &Outcome::Passed, "{}", result.name),
            }
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
