//! The channel logic on a fake apartment: an adapter linked into the test process (no
//! library, no sockets) that can be told to hang, so containment is shown without timing
//! the real plugin. What a real `.so` does is the e2e suite's business.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use switchboard_plugin_api::{
    export::{root_module, AdapterPlugin},
    Action, ConfigProblem, Event, Handover, HostHandle, Manifest, StateBlob, ABI_VERSION,
};
use tokio::sync::mpsc;

use super::{prepare_in_process, spawn, InstanceHandle, Prepared, Shared};
use crate::{
    config::{ChannelConfig, Config},
    gateway::ControlMessage,
    ledger::{GenerationState, Ledger},
    metrics::Metrics,
    routing::Router,
    session::MemorySessions,
    store::Store,
};

/// What each fake generation handled, by test: `(test, generation, what)`.
fn journal() -> &'static Mutex<Vec<(String, u64, String)>> {
    static JOURNAL: OnceLock<Mutex<Vec<(String, u64, String)>>> = OnceLock::new();
    JOURNAL.get_or_init(Default::default)
}

/// Tests whose hung adapters may return now (so their threads end with the test).
fn released() -> &'static Mutex<HashSet<String>> {
    static RELEASED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    RELEASED.get_or_init(Default::default)
}

fn handled_by(test: &str, generation: u64) -> Vec<String> {
    journal()
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, g, _)| t == test && *g == generation)
        .map(|(_, _, w)| w.clone())
        .collect()
}

/// Block the apartment until the test is over: a hung plugin, as far as the host can tell.
fn hang(test: &str, generation: u64, what: &str) {
    journal().lock().unwrap().push((test.to_string(), generation, format!("hanging on {what}")));
    while !released().lock().unwrap().contains(test) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The fake adapter. Its config says which test it belongs to and where it hangs.
struct Fake {
    test: String,
    generation: u64,
    hang_on: String,
    hang_on_started: bool,
}

impl AdapterPlugin for Fake {
    fn manifest() -> Manifest {
        Manifest {
            adapter_name: "fake".into(),
            adapter_version: "0".into(),
            abi_version: ABI_VERSION,
            build: "t".into(),
        }
    }

    fn validate_config(_config_json: &str) -> Vec<ConfigProblem> {
        Vec::new()
    }

    fn new(_host: HostHandle, config_json: &str, handover: Handover) -> Result<Self, String> {
        let config: serde_json::Value = serde_json::from_str(config_json).map_err(|e| e.to_string())?;
        let text = |key: &str| config[key].as_str().unwrap_or_default().to_string();
        let fake = Fake {
            test: text("test"),
            generation: handover.generation,
            hang_on: text("hang_on"),
            hang_on_started: config["hang_on_started"].as_bool().unwrap_or(false),
        };
        if config["hang_on_construct"].as_bool().unwrap_or(false) {
            hang(&fake.test, fake.generation, "construct");
        }
        Ok(fake)
    }

    fn handle(&mut self, event: Event) -> Vec<Action> {
        let what = match &event {
            Event::Started { .. } if self.hang_on_started => {
                hang(&self.test, self.generation, "started");
                return Vec::new();
            }
            Event::Started { .. } => "started".to_string(),
            Event::WsFrame { text, .. } if text.as_str() == self.hang_on => {
                hang(&self.test, self.generation, text.as_str());
                return Vec::new();
            }
            Event::WsFrame { text, .. } if text.as_str() == "PANIC" => panic!("fake: told to panic"),
            Event::WsFrame { text, .. } => text.to_string(),
            Event::WsFrameSkipped { text, .. } => format!("skipped {text}"),
            _ => return Vec::new(),
        };
        journal().lock().unwrap().push((self.test.clone(), self.generation, what));
        Vec::new()
    }

    fn export_state(&mut self) -> StateBlob {
        StateBlob { format_version: 1, data: "{}".into() }
    }
}

fn fake_config(test: &str, extra: serde_json::Value) -> ChannelConfig {
    let mut adapter_config = serde_json::json!({ "test": test, "hang_on": "HANG" });
    if let (Some(table), serde_json::Value::Object(extra)) = (adapter_config.as_object_mut(), extra) {
        table.extend(extra);
    }
    ChannelConfig { plugin: "fake".into(), thread_sessions: false, ca_file: None, adapter_config }
}

fn shared(call_timeout: Duration) -> (Arc<Shared>, mpsc::Receiver<ControlMessage>) {
    let config = Config::parse("", Path::new("/nonexistent")).expect("the empty config is valid");
    let store = Arc::new(Store::in_memory().expect("an in-memory store opens"));
    let metrics = Arc::new(Metrics::new());
    let tls = crate::tls::client_config(&[]);
    let http = crate::tls::http_client(&tls).expect("an HTTP client builds");
    let writer = Arc::new(crate::store::StoreWriter::start(store, metrics.store_wal_sync_seconds.clone()));
    let router = Router::new(&config, Arc::new(MemorySessions::default()), writer, metrics.clone(), http.clone());
    let (supervisor, reports) = mpsc::channel(16);
    let shared = Shared {
        router,
        metrics,
        ledger: Ledger::default(),
        http: http.clone(),
        tls: crate::tls::ChannelTls { http, ws: tls },
        ws_max_message_bytes: 1 << 20,
        supervisor,
        adapter_restarts: (5, Duration::from_secs(60)),
        adapter_call_timeout: call_timeout,
        disconnected_grace: Duration::from_secs(30),
    };
    (Arc::new(shared), reports)
}

fn generation(number: u64, call_timeout: Duration) -> Prepared {
    // The panic hook the export installs is the test process's own here: put the default back.
    let module = root_module::<Fake>();
    let _ = std::panic::take_hook();
    prepare_in_process(module, number, call_timeout)
}

fn frame(text: &str) -> Event {
    Event::WsFrame { conn: 1, text: text.into() }
}

async fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !holds() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state_of(shared: &Shared, number: u64) -> Option<GenerationState> {
    shared.ledger.snapshot().into_iter().find(|r| r.channel == "fake" && r.generation == number).map(|r| r.state)
}

async fn start(
    test: &str,
    extra: serde_json::Value,
    call_timeout: Duration,
) -> (Arc<Shared>, mpsc::Receiver<ControlMessage>, InstanceHandle) {
    let (shared, reports) = shared(call_timeout);
    let handle = spawn("fake".into(), fake_config(test, extra), generation(1, call_timeout), shared.clone()).await;
    (shared, reports, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_does_not_return_abandons_the_generation_and_the_next_takes_up_the_rest() {
    let test = "abandon";
    let timeout = Duration::from_millis(300);
    let (shared, mut reports, handle) = start(test, serde_json::json!({}), timeout).await;
    for text in ["a", "HANG", "b"] {
        handle.events.send(frame(text)).unwrap();
    }
    let report = tokio::time::timeout(Duration::from_secs(10), reports.recv()).await.expect("the controller is told");
    assert!(matches!(report, Some(ControlMessage::GenerationAbandoned { ref channel }) if channel == "fake"));
    assert!(handle.is_vacant(), "no generation serves until the controller starts one");
    eventually("generation 1 abandoned", || state_of(&shared, 1) == Some(GenerationState::Abandoned)).await;
    let letters = shared.router.store().dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!((letters[0].event_kind.as_str(), letters[0].payload.as_str()), ("ws_frame", "HANG"));

    // What the controller does on the report: a new generation of the current build.
    handle.replace(generation(2, timeout), fake_config(test, serde_json::json!({}))).await.unwrap();
    assert!(!handle.is_vacant());
    handle.events.send(frame("c")).unwrap();
    eventually("generation 2 takes up the rest", || handled_by(test, 2).contains(&"c".to_string())).await;
    let second = handled_by(test, 2);
    let position = |what: &str| second.iter().position(|w| w == what);
    assert!(position("skipped HANG").is_some(), "told to move past the hung event: {second:?}");
    assert!(position("skipped HANG") < position("b") && position("b") < position("c"), "in order: {second:?}");
    assert_eq!(second.iter().filter(|w| w.contains("HANG")).count(), 1, "the hung event is not handed over again");
    assert!(state_of(&shared, 2) == Some(GenerationState::Running));
    released().lock().unwrap().insert(test.into());
    handle.stop(tokio::time::Instant::now() + Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_generation_that_hangs_when_started_is_abandoned_and_the_old_one_serves_on() {
    let test = "trial";
    let timeout = Duration::from_millis(300);
    let (shared, _reports, handle) = start(test, serde_json::json!({}), timeout).await;
    handle.events.send(frame("before")).unwrap();
    eventually("generation 1 serves", || handled_by(test, 1).contains(&"before".to_string())).await;

    let hanging = fake_config(test, serde_json::json!({ "hang_on_started": true }));
    let refused = handle.replace(generation(2, timeout), hanging).await.expect_err("rolled back");
    assert!(refused.contains("did not return"), "{refused}");
    handle.events.send(frame("after")).unwrap();
    eventually("generation 1 serves on", || handled_by(test, 1).contains(&"after".to_string())).await;
    eventually("generation 2 abandoned", || state_of(&shared, 2) == Some(GenerationState::Abandoned)).await;
    assert_eq!(state_of(&shared, 1), Some(GenerationState::Running));
    released().lock().unwrap().insert(test.into());
    handle.stop(tokio::time::Instant::now() + Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_constructor_that_hangs_is_refused_in_time() {
    let test = "construct";
    let timeout = Duration::from_millis(300);
    let (shared, _reports, handle) = start(test, serde_json::json!({}), timeout).await;
    let hanging = fake_config(test, serde_json::json!({ "hang_on_construct": true }));
    let asked = std::time::Instant::now();
    let refused = handle.replace(generation(2, timeout), hanging).await.expect_err("refused");
    assert!(asked.elapsed() < Duration::from_secs(3), "refused after {:?}", asked.elapsed());
    assert!(refused.contains("did not return"), "{refused}");
    handle.events.send(frame("still")).unwrap();
    eventually("generation 1 serves on", || handled_by(test, 1).contains(&"still".to_string())).await;
    eventually("generation 2 abandoned", || state_of(&shared, 2) == Some(GenerationState::Abandoned)).await;
    released().lock().unwrap().insert(test.into());
    handle.stop(tokio::time::Instant::now() + Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_ends_by_its_deadline_while_the_adapter_hangs() {
    let test = "stop";
    // A timeout far beyond the stop's deadline: the deadline must win.
    let (_shared, _reports, handle) = start(test, serde_json::json!({}), Duration::from_secs(60)).await;
    handle.events.send(frame("HANG")).unwrap();
    eventually("the adapter hangs", || handled_by(test, 1).contains(&"hanging on HANG".to_string())).await;
    let asked = std::time::Instant::now();
    handle.stop(tokio::time::Instant::now() + Duration::from_millis(500)).await;
    let took = asked.elapsed();
    released().lock().unwrap().insert(test.into());
    assert!(took < Duration::from_millis(1500), "the stop took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_adapter_panics_on_twice_is_dead_lettered_and_the_batch_goes_on() {
    let test = "panic";
    let (shared, _reports, handle) = start(test, serde_json::json!({}), Duration::from_secs(10)).await;
    for text in ["x", "PANIC", "y"] {
        handle.events.send(frame(text)).unwrap();
    }
    eventually("the rest is handled", || handled_by(test, 1).contains(&"y".to_string())).await;
    let handled = handled_by(test, 1);
    let after_restarts: Vec<&String> = handled.iter().skip_while(|w| *w != "skipped PANIC").collect();
    assert_eq!(after_restarts, ["skipped PANIC", "y"], "the stand-in, then the rest: {handled:?}");
    let letters = shared.router.store().dead_letters().unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].error.contains("told to panic"), "{letters:?}");
    assert_eq!(state_of(&shared, 1), Some(GenerationState::Running), "restarted in place, not abandoned");
    handle.stop(tokio::time::Instant::now() + Duration::from_secs(5)).await;
}
