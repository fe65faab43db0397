//! Apartments: one dedicated thread per adapter generation, which runs *all* of that
//! generation's code (ARCHITECTURE.md §2, §3.4).
//!
//! The thread opens the library, constructs the adapter, handles every event, drops every
//! plugin-made value and finally exits; only then is the library closed, so that no thread
//! that ever ran plugin code outlives the `dlclose` and the copy is really unmapped.
//! Host async code talks to the apartment through a job queue and awaits the results.
//! Plugin-made values are converted into host-owned types ([`Command`]) before they leave
//! the apartment (§3.7).
//!
//! Every call has a deadline (`gateway.adapter_call_timeout_ms`). Plugin code cannot be
//! stopped from outside, so an apartment whose call did not return in time is *hung*: it
//! takes no more jobs, and tearing it down abandons it — its thread and its library stay
//! as they are (closing a library that a thread still runs in would crash the process) and
//! the host goes on without them.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use abi_stable::std_types::RStr;
use switchboard_plugin_api::{
    Action, AdapterBox, AdapterModuleRef, Event, Framing, Handover, HostHandle, InboundMessage, LogLevel, Manifest,
    PeerKind, PluginError, ResponseBody,
};
#[cfg(test)]
use switchboard_plugin_api::{BuildFlags, ABI_MINOR};
use tokio::sync::oneshot;

use crate::{
    loader::{self, BuildOf, LoadError, OpenedAdapter},
    transport::StreamSpec,
};

type Job = Box<dyn FnOnce(&mut Resident) + Send>;

/// What lives on the apartment thread.
pub struct Resident {
    module: AdapterModuleRef,
    adapter: Option<AdapterBox>,
    /// The ABI minor the library was built against: events of later minors are turned into
    /// what it knows (or skipped) before they reach it.
    abi_minor: u32,
}

/// The host's end of an apartment. Dropping it tears the apartment down (blocking).
pub struct Apartment {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<Option<abi_stable::library::RawLibrary>>>,
    copy_path: PathBuf,
    pub manifest: Manifest,
    /// The ABI minor and build flags the library reported.
    pub build: BuildOf,
    /// How long one call may take before the apartment counts as hung.
    call_timeout: Duration,
    /// A call did not return in time: no more jobs, and tear-down abandons the thread.
    hung: AtomicBool,
}

/// Why a call on the apartment brought no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApartmentGone {
    #[error("the adapter's apartment thread is gone")]
    Gone,
    /// This call, or an earlier one, did not return within the call timeout.
    #[error("the adapter did not return within {0:?} (its apartment is abandoned)")]
    Hung(Duration),
}

/// How a tear-down ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TearDown {
    pub copy_path: PathBuf,
    /// `Some(false)` when `/proc/self/maps` no longer lists the copy.
    pub still_mapped: Option<bool>,
    /// The apartment was hung: its thread was left running and its library loaded.
    pub abandoned: bool,
}

/// An adapter action, copied into host-owned types on the apartment.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    WsOpen {
        conn: u64,
        url: String,
        headers: Vec<(String, String)>,
    },
    WsSend {
        conn: u64,
        text: String,
    },
    WsClose {
        conn: u64,
        code: u16,
        reason: String,
    },
    WsSendBinary {
        conn: u64,
        data: Vec<u8>,
    },
    StreamOpen(StreamSpec),
    StreamSend {
        conn: u64,
        data: Vec<u8>,
    },
    StreamClose {
        conn: u64,
    },
    /// `HttpRequest` (v1.0) and `HttpCall` (v1.1) alike.
    Http {
        request: u64,
        method: String,
        url: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        timeout_ms: u64,
        /// 0: the host's default.
        max_response_bytes: u64,
        /// Answer with `HttpBytesResponse` instead of text.
        bytes: bool,
    },
    SetTimer {
        timer: u64,
        after_ms: u64,
    },
    CancelTimer {
        timer: u64,
    },
    Inbound(Inbound),
    ReplyDelivered {
        reply_id: u64,
        platform_message_id: String,
    },
    ReplyFailed {
        reply_id: u64,
        error: String,
        retryable: bool,
        /// When to hand the reply back (0: the host's back-off).
        retry_after_ms: u64,
    },
    SaveState {
        format_version: u32,
        data: String,
    },
    Log {
        level: LogLevel,
        message: String,
    },
    Health {
        healthy: bool,
        detail: String,
    },
    /// A variant from a newer plugin than this host knows.
    Unknown,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    pub message_id: String,
    /// The session key's `<kind>` part: `channel`, `group`, `dm`, or a kind the adapter named
    /// (v1.1). Only `dm` is keyed by the sender.
    pub peer_kind: String,
    pub peer_id: String,
    pub thread_root_id: String,
    pub sender_id: String,
    pub sender_name: String,
    pub text: String,
    pub created_at_ms: i64,
}

impl Inbound {
    fn copy_of(message: &InboundMessage, kind: &str) -> Self {
        Inbound {
            message_id: message.message_id.as_str().to_owned(),
            peer_kind: kind.to_owned(),
            peer_id: message.peer_id.as_str().to_owned(),
            thread_root_id: message.thread_root_id.as_str().to_owned(),
            sender_id: message.sender_id.as_str().to_owned(),
            sender_name: message.sender_name.as_str().to_owned(),
            text: message.text.as_str().to_owned(),
            created_at_ms: message.created_at_ms,
        }
    }

    /// Whether the session is the sender's (a DM) rather than the conversation's.
    pub fn is_dm(&self) -> bool {
        self.peer_kind == PeerKind::Dm.as_str()
    }
}

/// The result of handing one event to the adapter.
pub type Handled = Result<Vec<Command>, PluginError>;

impl Apartment {
    /// Start an apartment thread and open the staged copy on it. Blocking: call it from
    /// `spawn_blocking` in async code.
    pub fn open(copy_path: &Path, thread_name: String, call_timeout: Duration) -> Result<Apartment, LoadError> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(Manifest, BuildOf), LoadError>>();
        let path = copy_path.to_path_buf();
        let spawned = thread::Builder::new().name(thread_name).spawn(move || {
            let OpenedAdapter { library, module, manifest, build } = match loader::open_adapter(&path) {
                Ok(opened) => opened,
                Err((error, library)) => {
                    let _ = ready_tx.send(Err(error));
                    return library;
                }
            };
            // Strings the plugin made carry its vtable: hand the host a copy made here, so
            // nothing that outlives the library points into it.
            let _ = ready_tx.send(Ok((host_copy(&manifest), build)));
            drop(manifest);
            serve(Resident { module, adapter: None, abi_minor: build.abi_minor }, jobs_rx);
            Some(library)
        });
        let thread = spawned.map_err(|e| LoadError::Stage {
            file: copy_path.to_path_buf(),
            reason: format!("cannot start the apartment thread: {e}"),
        })?;
        let mut hung = false;
        let outcome = ready_rx.recv_timeout(call_timeout).unwrap_or_else(|error| {
            hung = matches!(error, mpsc::RecvTimeoutError::Timeout);
            let reason = if hung {
                format!("loading did not finish within {call_timeout:?} (the library's initialisation hangs)")
            } else {
                "the apartment thread died while loading".into()
            };
            Err(LoadError::InitFailed { file: copy_path.to_path_buf(), reason })
        });
        let mut apartment = Apartment {
            jobs: Some(jobs_tx),
            thread: Some(thread),
            copy_path: copy_path.to_path_buf(),
            manifest: placeholder_manifest(),
            build: BuildOf { abi_minor: 0, flags: None },
            call_timeout,
            hung: AtomicBool::new(hung),
        };
        match outcome {
            Ok((manifest, build)) => {
                apartment.manifest = manifest;
                apartment.build = build;
                Ok(apartment)
            }
            Err(error) => {
                apartment.tear_down();
                Err(error)
            }
        }
    }

    /// An apartment for an adapter linked into this process (no library): the channel's
    /// unit tests run its logic on one.
    #[cfg(test)]
    pub fn in_process(module: AdapterModuleRef, name: &str, call_timeout: Duration) -> Apartment {
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let manifest =
            (module.manifest())().into_result().map(|m| host_copy(&m)).unwrap_or_else(|_| placeholder_manifest());
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                serve(Resident { module, adapter: None, abi_minor: ABI_MINOR }, jobs_rx);
                None
            })
            .expect("a test can start a thread");
        Apartment {
            jobs: Some(jobs_tx),
            thread: Some(thread),
            copy_path: PathBuf::from(format!("/nonexistent/in-process/{name}")),
            manifest,
            build: BuildOf { abi_minor: ABI_MINOR, flags: Some(BuildFlags::of_this_build()) },
            call_timeout,
            hung: AtomicBool::new(false),
        }
    }

    pub fn copy_path(&self) -> &Path {
        &self.copy_path
    }

    /// Run `job` on the apartment and wait for its result, at most the call timeout.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Resident) -> R + Send + 'static,
    ) -> Result<R, ApartmentGone> {
        self.run_within(self.call_timeout, job).await
    }

    /// [`Self::run`] with a shorter deadline (a stop that must end in time); past it the
    /// apartment is hung all the same.
    pub async fn run_within<R: Send + 'static>(
        &self,
        timeout: Duration,
        job: impl FnOnce(&mut Resident) -> R + Send + 'static,
    ) -> Result<R, ApartmentGone> {
        if self.is_hung() {
            return Err(ApartmentGone::Hung(self.call_timeout));
        }
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or(ApartmentGone::Gone)?;
        jobs.send(Box::new(move |resident| {
            let _ = tx.send(job(resident));
        }))
        .map_err(|_| ApartmentGone::Gone)?;
        match tokio::time::timeout(timeout.min(self.call_timeout), rx).await {
            Ok(result) => result.map_err(|_| ApartmentGone::Gone),
            Err(_) => {
                self.hung.store(true, Ordering::SeqCst);
                Err(ApartmentGone::Hung(timeout.min(self.call_timeout)))
            }
        }
    }

    /// A call did not return in time (see the module docs).
    pub fn is_hung(&self) -> bool {
        self.hung.load(Ordering::SeqCst)
    }

    /// Stop the thread, wait for it to exit, close the library and check that the copy is no
    /// longer mapped. Blocking. Idempotent. A hung apartment is abandoned instead: its thread
    /// is left to itself (should its call ever return, it finds no more jobs, drops the
    /// adapter and closes the library on its own) and nothing waits for it.
    pub fn tear_down(&mut self) -> TearDown {
        drop(self.jobs.take());
        let abandoned = self.is_hung();
        if let Some(thread) = self.thread.take() {
            if abandoned {
                drop(thread);
            } else {
                let library = thread.join().ok().flatten();
                // dlclose, now that no thread that ran plugin code is alive.
                drop(library);
            }
        }
        let still_mapped = loader::is_mapped(&self.copy_path);
        TearDown { copy_path: self.copy_path.clone(), still_mapped, abandoned }
    }
}

impl Drop for Apartment {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.tear_down();
        }
    }
}

/// The apartment's loop: run jobs until the host's end is dropped.
fn serve(mut resident: Resident, jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        // A host bug in a job must not kill the thread that owns the library.
        let _ = catch_unwind(AssertUnwindSafe(|| job(&mut resident)));
    }
    // Plugin-made objects are dropped here, on the apartment, before it exits.
    drop(resident);
}

fn host_copy(manifest: &Manifest) -> Manifest {
    Manifest {
        adapter_name: manifest.adapter_name.as_str().into(),
        adapter_version: manifest.adapter_version.as_str().into(),
        abi_version: manifest.abi_version,
        build: manifest.build.as_str().into(),
    }
}

/// A plugin's error rebuilt with host-made strings (the plugin's may outlive its library).
fn host_owned(error: PluginError) -> PluginError {
    match error {
        PluginError::Panicked(message) => PluginError::Panicked(message.as_str().into()),
        PluginError::Failed(message) => PluginError::Failed(message.as_str().into()),
    }
}

fn placeholder_manifest() -> Manifest {
    Manifest { adapter_name: "".into(), adapter_version: "".into(), abi_version: 0, build: "".into() }
}

impl Resident {
    /// Validate an adapter config (pure, plugin code).
    pub fn validate_config(&self, config_json: &str) -> Result<Vec<(String, String)>, PluginError> {
        let problems =
            (self.module.validate_config())(RStr::from_str(config_json)).into_result().map_err(host_owned)?;
        Ok(problems.iter().map(|p| (p.key_path.to_string(), p.message.to_string())).collect())
    }

    /// Construct the adapter of this generation.
    pub fn construct(&mut self, host: HostHandle, config_json: &str, handover: Handover) -> Result<(), PluginError> {
        let adapter = (self.module.new_adapter())(host, RStr::from_str(config_json), handover)
            .into_result()
            .map_err(host_owned)?;
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Hand each event to the adapter in order, stopping at the first one it fails on: after
    /// a panic the adapter's state is suspect, so it gets nothing more. The result has one
    /// entry per event handled; when it is shorter than `events` (or its last entry is an
    /// error) the batch did not go through.
    pub fn handle_all(&mut self, events: Vec<Event>) -> Vec<Handled> {
        self.handle_all_noting(events, &AtomicUsize::new(0))
    }

    /// [`Self::handle_all`], noting in `reached` the index of the event being handled, so
    /// that a caller that gave up waiting knows which event the adapter hangs on.
    pub fn handle_all_noting(&mut self, events: Vec<Event>, reached: &AtomicUsize) -> Vec<Handled> {
        let Some(adapter) = self.adapter.as_mut() else {
            return vec![Err(PluginError::Failed("the adapter is not constructed".into()))];
        };
        let mut handled = Vec::with_capacity(events.len());
        for (index, event) in events.into_iter().enumerate() {
            reached.store(index, Ordering::SeqCst);
            let Some(event) = known_to(self.abi_minor, event) else {
                handled.push(Ok(Vec::new()));
                continue;
            };
            match adapter.handle(event.into_ne()).into_result() {
                // `actions` is plugin-made: copy it into host types, then drop it here.
                Ok(actions) => handled.push(Ok(actions
                    .iter()
                    .map(|action| action.as_enum().map(Command::from_action).unwrap_or(Command::Unknown))
                    .collect())),
                Err(error) => {
                    handled.push(Err(host_owned(error)));
                    break;
                }
            }
        }
        handled
    }

    /// Replace the adapter object with a new one built from `handover` (same library): how a
    /// generation is restarted from its last good state after a panic.
    pub fn reconstruct(&mut self, host: HostHandle, config_json: &str, handover: Handover) -> Result<(), PluginError> {
        // The old object may be inconsistent; dropping it is still the plugin's business.
        let old = self.adapter.take();
        let _ = catch_unwind(AssertUnwindSafe(move || drop(old)));
        self.construct(host, config_json, handover)
    }

    /// Which platform conversation `event` concerns, as far as the adapter can tell.
    pub fn conversation_of(&self, event: &Event) -> Option<String> {
        let adapter = self.adapter.as_ref()?;
        let event = event.clone().into_ne();
        match adapter.conversation_of(&event).into_result() {
            Ok(found) => found.into_option().map(|c| c.as_str().to_owned()),
            Err(_) => None,
        }
    }

    /// Export the adapter's state for the next generation (owned copy).
    pub fn export_state(&mut self) -> Result<(u32, String), PluginError> {
        let adapter =
            self.adapter.as_mut().ok_or_else(|| PluginError::Failed("the adapter is not constructed".into()))?;
        let blob = adapter.export_state().into_result().map_err(host_owned)?;
        Ok((blob.format_version, blob.data.as_str().to_owned()))
    }

    /// Drop the adapter object (on the apartment).
    pub fn discard_adapter(&mut self) {
        self.adapter = None;
    }
}

/// The ABI minor that brought host-owned streams.
const ABI_MINOR_STREAMS: u32 = 2;

/// `event` as an adapter of ABI minor `minor` can take it: v1.1 events become their v1.0
/// counterparts for a v1.0 adapter, or nothing (`None`: skipped, it never asked for them).
/// A replayed frame (v1.2) has no older counterpart: the host refuses a replay to an older
/// adapter before it queues one, so one reaching this point is skipped.
fn known_to(minor: u32, event: Event) -> Option<Event> {
    if minor >= ABI_MINOR_STREAMS {
        return Some(event);
    }
    if matches!(event, Event::WsFrameReplayed { .. }) {
        return None;
    }
    match event {
        // Streams are v1.2: an older adapter never opened one.
        Event::StreamOpened { .. }
        | Event::StreamData { .. }
        | Event::StreamLine { .. }
        | Event::StreamClosed { .. } => None,
        event if minor >= 1 => Some(event),
        // A v1.0 adapter never had binary frames (the host dropped them before v1.1).
        Event::WsBinaryFrame { .. } => None,
        Event::HttpResponseSkipped { request, status, .. } => Some(Event::HttpFailed {
            request,
            error: format!("the response (HTTP {status}) was dead-lettered: the adapter failed on it twice").into(),
        }),
        // Only an answer to a v1.1 `HttpCall`, which a v1.0 adapter cannot ask for.
        Event::HttpBytesResponse { request, .. } => {
            Some(Event::HttpFailed { request, error: "a bytes response for an adapter of ABI v1.0".into() })
        }
        event => Some(event),
    }
}

fn pairs(headers: &[switchboard_plugin_api::Header]) -> Vec<(String, String)> {
    headers.iter().map(|h| (h.name.as_str().to_owned(), h.value.as_str().to_owned())).collect()
}

impl Command {
    fn from_action(action: &Action) -> Command {
        match action {
            Action::WsOpen { conn, url, headers } => {
                Command::WsOpen { conn: *conn, url: url.as_str().to_owned(), headers: pairs(headers) }
            }
            Action::WsSend { conn, text } => Command::WsSend { conn: *conn, text: text.as_str().to_owned() },
            Action::WsClose { conn, code, reason } => {
                Command::WsClose { conn: *conn, code: *code, reason: reason.as_str().to_owned() }
            }
            Action::HttpRequest { request, method, url, headers, body, timeout_ms } => Command::Http {
                request: *request,
                method: method.as_str().to_owned(),
                url: url.as_str().to_owned(),
                headers: pairs(headers),
                body: body.as_bytes().to_vec(),
                timeout_ms: *timeout_ms,
                max_response_bytes: 0,
                bytes: false,
            },
            Action::HttpCall(call) => Command::Http {
                request: call.request,
                method: call.method.as_str().to_owned(),
                url: call.url.as_str().to_owned(),
                headers: pairs(&call.headers),
                body: call.body.to_vec(),
                timeout_ms: call.timeout_ms,
                max_response_bytes: call.max_response_bytes,
                bytes: call.response_body == ResponseBody::BYTES,
            },
            Action::WsSendBinary { conn, data } => Command::WsSendBinary { conn: *conn, data: data.to_vec() },
            Action::StreamOpen(open) => Command::StreamOpen(StreamSpec {
                conn: open.conn,
                host: open.host.as_str().to_owned(),
                port: open.port,
                tls: open.tls,
                server_name: open.server_name.as_str().to_owned(),
                lines: open.framing == Framing::LINES,
                max_line_bytes: open.max_line_bytes,
                connect_timeout_ms: open.connect_timeout_ms,
            }),
            Action::StreamSend { conn, data } => Command::StreamSend { conn: *conn, data: data.to_vec() },
            Action::StreamClose { conn } => Command::StreamClose { conn: *conn },
            Action::SetTimer { timer, after_ms } => Command::SetTimer { timer: *timer, after_ms: *after_ms },
            Action::CancelTimer { timer } => Command::CancelTimer { timer: *timer },
            Action::Inbound(message) => Command::Inbound(Inbound::copy_of(message, message.peer_kind.as_str())),
            Action::InboundOfKind { message, kind } if kind.is_valid() => {
                Command::Inbound(Inbound::copy_of(message, kind.0.as_str()))
            }
            Action::InboundOfKind { message, kind } => Command::Log {
                level: LogLevel::Error,
                message: format!(
                    "the adapter named the conversation kind {:?} (not 1-32 of a-z, 0-9, _ starting with a letter) \
                     for message {} in conversation {}; the message is not answered",
                    kind.0.as_str(),
                    message.message_id.as_str(),
                    message.peer_id.as_str()
                ),
            },
            Action::ReplyDelivered { reply_id, platform_message_id } => Command::ReplyDelivered {
                reply_id: *reply_id,
                platform_message_id: platform_message_id.as_str().to_owned(),
            },
            Action::ReplyFailed { reply_id, error, retryable } => Command::ReplyFailed {
                reply_id: *reply_id,
                error: error.as_str().to_owned(),
                retryable: *retryable,
                retry_after_ms: 0,
            },
            Action::ReplyFailedWith { reply_id, error, kind, retry_after_ms } => Command::ReplyFailed {
                reply_id: *reply_id,
                error: format!("{} ({})", error.as_str(), kind.as_str()),
                retryable: kind.is_retryable(),
                retry_after_ms: *retry_after_ms,
            },
            Action::SaveState { state } => {
                Command::SaveState { format_version: state.format_version, data: state.data.as_str().to_owned() }
            }
            Action::Log { level, message } => Command::Log { level: *level, message: message.as_str().to_owned() },
            Action::Health { healthy, detail } => {
                Command::Health { healthy: *healthy, detail: detail.as_str().to_owned() }
            }
            _ => Command::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_plugin_api::{ErrorKind, HttpCall, InboundMessage, PeerKind, PeerKindName};

    use super::*;

    fn message() -> InboundMessage {
        InboundMessage {
            message_id: "m1".into(),
            peer_kind: PeerKind::Channel,
            peer_id: "c1".into(),
            thread_root_id: "".into(),
            sender_id: "u1".into(),
            sender_name: "alice".into(),
            text: "hi".into(),
            created_at_ms: 1,
        }
    }

    #[test]
    fn a_v1_0_adapter_is_sent_only_events_it_knows() {
        let binary = Event::WsBinaryFrame { conn: 1, data: vec![1, 2].into() };
        assert_eq!(known_to(1, binary.clone()), Some(binary.clone()));
        assert_eq!(known_to(0, binary), None, "v1.0 never had binary frames");
        let skipped = Event::HttpResponseSkipped {
            request: 9,
            status: 200,
            headers: Vec::new().into(),
            body: b"{}".to_vec().into(),
        };
        match known_to(0, skipped) {
            Some(Event::HttpFailed { request: 9, error }) => assert!(error.contains("dead-lettered"), "{error}"),
            other => panic!("a v1.0 adapter learns its request failed: {other:?}"),
        }
        let frame = Event::WsFrame { conn: 1, text: "x".into() };
        assert_eq!(known_to(0, frame.clone()), Some(frame), "v1.0 events pass as they are");
    }

    #[test]
    fn only_a_v1_2_adapter_is_sent_a_replayed_frame() {
        let replayed = Event::WsFrameReplayed { text: "x".into() };
        assert_eq!(known_to(2, replayed.clone()), Some(replayed.clone()));
        assert_eq!(known_to(1, replayed.clone()), None);
        assert_eq!(known_to(0, replayed), None);
    }

    #[test]
    fn v1_1_actions_become_host_commands() {
        let named = Action::InboundOfKind { message: message(), kind: PeerKindName::new("forum_topic") };
        match Command::from_action(&named) {
            Command::Inbound(inbound) => {
                assert_eq!(inbound.peer_kind, "forum_topic");
                assert!(!inbound.is_dm());
            }
            other => panic!("a named kind is routed: {other:?}"),
        }
        let dm = Action::InboundOfKind { message: message(), kind: PeerKind::Dm.into() };
        assert!(matches!(Command::from_action(&dm), Command::Inbound(inbound) if inbound.is_dm()));
        let bad = Action::InboundOfKind { message: message(), kind: PeerKindName::new("Has:Colon") };
        match Command::from_action(&bad) {
            Command::Log { level: LogLevel::Error, message } => assert!(message.contains("m1"), "{message}"),
            other => panic!("an invalid kind is refused, loudly: {other:?}"),
        }

        let limited = Action::ReplyFailedWith {
            reply_id: 3,
            error: "slow down".into(),
            kind: ErrorKind::RATE_LIMITED,
            retry_after_ms: 1500,
        };
        assert!(matches!(
            Command::from_action(&limited),
            Command::ReplyFailed { reply_id: 3, retryable: true, retry_after_ms: 1500, .. }
        ));
        let gone = Action::ReplyFailedWith {
            reply_id: 4,
            error: "no room".into(),
            kind: ErrorKind::NOT_FOUND,
            retry_after_ms: 0,
        };
        assert!(matches!(Command::from_action(&gone), Command::ReplyFailed { retryable: false, .. }));
        let future =
            Action::ReplyFailedWith { reply_id: 5, error: "?".into(), kind: ErrorKind(200), retry_after_ms: 0 };
        assert!(
            matches!(Command::from_action(&future), Command::ReplyFailed { retryable: true, .. }),
            "an unknown kind never loses a reply"
        );

        let mut call = HttpCall::text(8, "PUT", "http://x/y", Vec::new(), "body", 1000);
        call.max_response_bytes = 64;
        call.response_body = ResponseBody::BYTES;
        assert!(matches!(
            Command::from_action(&Action::HttpCall(call)),
            Command::Http { request: 8, max_response_bytes: 64, bytes: true, ref body, .. } if body == b"body"
        ));
    }
}
