//! The service manager's notifications (systemd's `sd_notify(3)` protocol): readiness, reloads,
//! stopping, a status line, and the watchdog.
//!
//! The protocol is one datagram of `KEY=value` lines to the Unix socket named by
//! `$NOTIFY_SOCKET` (a path, or an abstract name written `@…`); without that variable every
//! call here does nothing. What the gateway says, and when:
//!
//! - `READY=1` once every channel instance has reached its platform (a WebSocket open, or an
//!   HTTP-only adapter's first 2xx answer) or has failed clearly (its adapter reported a
//!   problem, it could not start, or it is still not connected `gateway.disconnected_grace_ms`
//!   after the start), with `STATUS=` naming those that are not ready;
//! - `RELOADING=1` with `MONOTONIC_USEC=` (systemd ≥ 253 checks it) when a reload begins —
//!   SIGUSR1, SIGHUP, `POST /reload` and a changed plugin file are all one control message —
//!   and `READY=1` when it is done, applied or rejected;
//! - `RELOADING=1` before a re-exec (SIGUSR2, `POST /restart`, the generation budget): the new
//!   binary runs in the same process (an exec keeps the PID, so the service manager's main PID
//!   stays right) and says `READY=1` (with `MAINPID=`, the same) once it is ready. `STOPPING=1`
//!   would not do: systemd then waits for the process to exit and ignores its `READY=1`;
//! - `STOPPING=1` when a stop begins (the last message; the watchdog stops with it);
//! - `WATCHDOG=1` every half of `$WATCHDOG_USEC` when it is set (and `$WATCHDOG_PID` is this
//!   process or unset), sent by a task on the async runtime — a stuck runtime sends none — and
//!   only while the reload controller and every channel instance's task answer a heartbeat
//!   (see [`spawn_watchdog`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::net::{SocketAddr, UnixDatagram},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock,
    },
    time::Duration,
};

use futures_util::FutureExt;
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{
    channel::InstanceHandle,
    gateway::{ControlMessage, ReloadOutcome},
    ledger::Ledger,
};

/// systemd ignores a longer status text (`STATUS_TEXT_MAX`, 4 KiB); a readable one is shorter.
const STATUS_MAX_CHARS: usize = 1000;

/// How long the reload controller may take to answer a heartbeat before the watchdog stops:
/// it answers between control messages, and one message may legitimately take long (a reload
/// probes every plugin file in a child process, a re-exec waits up to 60 s for the new binary's
/// config check, removed instances are stopped one after the other).
pub const CONTROLLER_ANSWER_LIMIT: Duration = Duration::from_secs(300);

/// How often start-up readiness is looked at until it is announced.
const READINESS_POLL: Duration = Duration::from_millis(100);

/// How often the status line is looked at after start-up (sent when it changed).
const STATUS_REFRESH: Duration = Duration::from_secs(10);

/// The service manager's end of the protocol, shared by the gateway's tasks (cheap to clone).
#[derive(Clone)]
pub struct Notifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when there is no service manager to tell (`$NOTIFY_SOCKET` unset or unusable).
    socket: Option<(UnixDatagram, SocketAddr)>,
    /// `READY=1` was sent for the start-up (reloads before it are not announced: systemd
    /// takes `RELOADING=1` only from a running service).
    announced: AtomicBool,
    /// `STOPPING=1` was sent: nothing else is (the watchdog ends).
    stopping: AtomicBool,
    /// The last status line sent (only changes are sent again).
    last_status: std::sync::Mutex<String>,
}

impl Notifier {
    /// The service manager `$NOTIFY_SOCKET` names, if any. A socket that cannot be used is
    /// logged once and treated as none.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|name| match connect(&name.to_string_lossy()) {
            Ok(socket) => Some(socket),
            Err(e) => {
                tracing::warn!(notify_socket = %name.to_string_lossy(), "cannot use the service manager's notify socket: {e}");
                None
            }
        });
        Self::with_socket(socket)
    }

    fn with_socket(socket: Option<(UnixDatagram, SocketAddr)>) -> Self {
        Self {
            inner: Arc::new(Inner {
                socket,
                announced: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                last_status: std::sync::Mutex::new(String::new()),
            }),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.socket.is_some()
    }

    /// Whether the start-up's `READY=1` has been sent.
    pub fn announced(&self) -> bool {
        self.inner.announced.load(Ordering::SeqCst)
    }

    /// `READY=1`: started, or a reload or re-exec is done.
    pub fn ready(&self, status: &str) {
        self.inner.announced.store(true, Ordering::SeqCst);
        let pid = std::process::id().to_string();
        self.send(&[("READY", "1"), ("MAINPID", &pid)], Some(status));
    }

    /// `RELOADING=1` with the monotonic clock's time, as systemd ≥ 253 wants it. Only once the
    /// start-up was announced (before, the status line says what happens).
    pub fn reloading(&self, status: &str) {
        if !self.announced() {
            self.status(status);
            return;
        }
        let now = monotonic_usec().to_string();
        self.send(&[("RELOADING", "1"), ("MONOTONIC_USEC", &now)], Some(status));
    }

    /// The end of a reload that [`Notifier::reloading`] announced.
    pub fn reloaded(&self, status: &str) {
        if self.announced() {
            self.ready(status);
        } else {
            self.status(status);
        }
    }

    /// `STOPPING=1`: the last message; the watchdog stops pinging.
    pub fn stopping(&self, status: &str) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.send(&[("STOPPING", "1")], Some(status));
    }

    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// A new status line (sent only when it changed).
    pub fn status(&self, status: &str) {
        self.send(&[], Some(status));
    }

    fn watchdog(&self) {
        if !self.is_stopping() {
            self.send(&[("WATCHDOG", "1")], None);
        }
    }

    fn send(&self, fields: &[(&str, &str)], status: Option<&str>) {
        let Some((socket, address)) = &self.inner.socket else { return };
        let mut message = String::new();
        for (key, value) in fields {
            message.push_str(&format!("{key}={value}\n"));
        }
        if let Some(status) = status {
            let status = one_line(status);
            let mut last = self.inner.last_status.lock().unwrap();
            // A state change always carries its status; a bare status only when it changed.
            if !fields.is_empty() || *last != status {
                message.push_str(&format!("STATUS={status}\n"));
                *last = status;
            }
        }
        if message.is_empty() {
            return;
        }
        // Non-blocking: a full queue at the service manager must not stall an async worker.
        if let Err(e) = socket.send_to_addr(message.as_bytes(), address) {
            tracing::warn!("cannot notify the service manager ({}): {e}", message.trim_end().replace('\n', " "));
        }
    }
}

/// An unbound datagram socket and the address of `$NOTIFY_SOCKET` (`@name`: abstract).
fn connect(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let address = match name.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        }
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        Some(_) => return Err(std::io::Error::new(std::io::ErrorKind::Unsupported, "abstract sockets are Linux only")),
        None if name.starts_with('/') => SocketAddr::from_pathname(name)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name (@…)",
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, address))
}

/// Status lines are one line of text.
fn one_line(status: &str) -> String {
    let line: String = status.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match line.char_indices().nth(STATUS_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// `CLOCK_MONOTONIC` in µs, the clock systemd compares `MONOTONIC_USEC=` with.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// How often to ping the watchdog: half of `$WATCHDOG_USEC`, when it is set for this process
/// (`$WATCHDOG_PID` unset or ours — an exec keeps the PID, so a re-exec still matches).
pub fn watchdog_interval() -> Option<Duration> {
    interval_of(std::env::var("WATCHDOG_USEC").ok(), std::env::var("WATCHDOG_PID").ok(), std::process::id())
}

fn interval_of(watchdog_usec: Option<String>, watchdog_pid: Option<String>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = watchdog_usec?.trim().parse().ok().filter(|&usec| usec > 0)?;
    if watchdog_pid.is_some_and(|pid| pid.trim().parse::<u32>().ok() != Some(own_pid)) {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// What start-up readiness sees: instances connected, failed (with why) and still waited for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct StartUp {
    pub connected: Vec<String>,
    pub failed: BTreeMap<String, String>,
    pub waiting: Vec<String>,
}

impl StartUp {
    /// Every instance is connected or has failed clearly.
    pub fn settled(&self) -> bool {
        self.waiting.is_empty()
    }

    pub fn status(&self) -> String {
        let mut parts = Vec::new();
        let total = self.connected.len() + self.failed.len() + self.waiting.len();
        if self.settled() {
            parts.push(format!("ready: {} of {total} channel instance(s) connected", self.connected.len()));
        } else {
            parts.push(format!("starting: waiting for {} to connect", self.waiting.join(", ")));
        }
        if !self.failed.is_empty() {
            let failed: Vec<String> = self.failed.iter().map(|(id, why)| format!("{id}: {why}")).collect();
            parts.push(format!("not ready: {}", failed.join("; ")));
        }
        parts.join("; ")
    }
}

/// Where each `expected` instance stands, `elapsed` after the instances were started.
pub fn start_up(ledger: &Ledger, expected: &BTreeSet<String>, elapsed: Duration, grace: Duration) -> StartUp {
    let problems = ledger.problems();
    let mut start_up = StartUp::default();
    for id in expected {
        if let Some(problem) = problems.get(id) {
            start_up.failed.insert(id.clone(), problem.clone());
        } else if ledger.reached(id) {
            start_up.connected.push(id.clone());
        } else if elapsed >= grace {
            start_up.failed.insert(id.clone(), format!("not connected {} s after the start", elapsed.as_secs()));
        } else {
            start_up.waiting.push(id.clone());
        }
    }
    start_up
}

/// The status line of a running gateway: how many instances, and which are not ready and why
/// (what `/readyz` says).
pub fn running_status(ledger: &Ledger, expected: &BTreeSet<String>, grace: Duration) -> String {
    let not_ready = ledger.not_ready(expected, grace, crate::session::now_ms());
    if not_ready.is_empty() {
        format!("ready: {} channel instance(s) running", expected.len())
    } else {
        format!("running {} channel instance(s); not ready: {}", expected.len(), not_ready.reasons())
    }
}

/// The status line after a reload.
pub fn reload_status(trigger: &str, outcome: &ReloadOutcome) -> String {
    match outcome {
        ReloadOutcome::Applied { changed, added, removed, failed, .. } => {
            let mut parts = vec![format!("reload ({trigger}) applied")];
            for (what, ids) in [("changed", changed), ("added", added), ("removed", removed), ("failed", failed)] {
                if !ids.is_empty() {
                    parts.push(format!("{what}: {}", ids.join(", ")));
                }
            }
            parts.join("; ")
        }
        ReloadOutcome::Rejected { errors } => {
            format!("reload ({trigger}) rejected: {} problem(s); the running config stays in force", errors.len())
        }
    }
}

/// Announce `READY=1` once every expected instance is connected or has failed clearly (at the
/// latest `grace` after now), then keep the status line current.
pub fn spawn_readiness(notifier: Notifier, ledger: Ledger, expected: Arc<RwLock<BTreeSet<String>>>, grace: Duration) {
    if !notifier.is_enabled() {
        return;
    }
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            if notifier.announced() || notifier.is_stopping() {
                break;
            }
            let snapshot = expected.read().unwrap().clone();
            let start_up = start_up(&ledger, &snapshot, started.elapsed(), grace);
            if start_up.settled() {
                tracing::info!(status = %start_up.status(), "told the service manager the gateway is ready");
                notifier.ready(&start_up.status());
                break;
            }
            notifier.status(&start_up.status());
            tokio::time::sleep(READINESS_POLL).await;
        }
        while !notifier.is_stopping() {
            tokio::time::sleep(STATUS_REFRESH).await;
            let snapshot = expected.read().unwrap().clone();
            if !notifier.is_stopping() {
                notifier.status(&running_status(&ledger, &snapshot, grace));
            }
        }
    });
}

/// One heartbeat in flight: when it was asked, and the task waiting for its answer.
struct Heartbeat<T> {
    asked: Instant,
    answer: JoinHandle<T>,
}

impl<T: Send + 'static> Heartbeat<T> {
    fn ask(answer: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        Self { asked: Instant::now(), answer: tokio::spawn(answer) }
    }

    fn late(&self, limit: Duration) -> bool {
        !self.answer.is_finished() && self.asked.elapsed() > limit
    }
}

/// How long a channel instance's task may take to answer a heartbeat: its loop waits for at
/// most one adapter call at a time (a swap makes three: export, construct, first batch), each
/// within `gateway.adapter_call_timeout_ms`.
pub fn instance_answer_limit(adapter_call_timeout: Duration) -> Duration {
    adapter_call_timeout * 3 + Duration::from_secs(1)
}

/// Ping the watchdog every `interval` from a task on the async runtime (a stuck runtime sends
/// nothing), as long as the reload controller (its messages go to `control`) answers
/// heartbeats within [`CONTROLLER_ANSWER_LIMIT`] and every channel instance's task within
/// `instance_answer_limit`. A heartbeat is asked of each at most once at a time; one that is
/// late stops the pings (logged) until it is answered, so the service manager restarts a
/// gateway whose host code is stuck. Started before the channel instances are, so that a slow
/// start-up (or a re-exec's) is covered too.
pub fn spawn_watchdog(
    notifier: Notifier,
    interval: Duration,
    control: mpsc::Sender<ControlMessage>,
    instance_answer_limit: Duration,
) {
    if !notifier.is_enabled() {
        return;
    }
    tokio::spawn(async move {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut controller: Option<Heartbeat<Option<Vec<InstanceHandle>>>> = None;
        let mut instances: Vec<InstanceHandle> = Vec::new();
        let mut asked: BTreeMap<String, Heartbeat<()>> = BTreeMap::new();
        let mut late_before: Vec<String> = Vec::new();
        loop {
            every.tick().await;
            if notifier.is_stopping() {
                return;
            }
            if let Some(answered) = controller.take_if(|h| h.answer.is_finished()) {
                // The controller lists the instances it runs (none when it is gone).
                if let Some(Ok(Some(listed))) = answered.answer.now_or_never() {
                    instances = listed;
                }
            }
            if controller.is_none() {
                let control = control.clone();
                controller = Some(Heartbeat::ask(async move {
                    let (answer, listed) = tokio::sync::oneshot::channel();
                    control.send(ControlMessage::Heartbeat { answer }).await.ok()?;
                    listed.await.ok()
                }));
            }
            asked.retain(|id, heartbeat| instances.iter().any(|i| &i.id == id) && !heartbeat.answer.is_finished());
            for instance in &instances {
                if !asked.contains_key(&instance.id) {
                    let handle = instance.clone();
                    asked.insert(instance.id.clone(), Heartbeat::ask(async move { handle.heartbeat().await }));
                }
            }
            let mut late: Vec<String> = Vec::new();
            if controller.as_ref().is_some_and(|h| h.late(CONTROLLER_ANSWER_LIMIT)) {
                late.push("the reload controller".into());
            }
            late.extend(
                asked
                    .iter()
                    .filter(|(_, h)| h.late(instance_answer_limit))
                    .map(|(id, _)| format!("channel instance {id}")),
            );
            if late.is_empty() {
                notifier.watchdog();
                if !late_before.is_empty() {
                    tracing::info!("every task answers the watchdog again");
                    notifier.status("running: every task answers the watchdog again");
                }
            } else {
                if late != late_before {
                    tracing::error!(
                        late = ?late,
                        "not answering the watchdog: these tasks do not answer; the service manager restarts the gateway unless they do"
                    );
                }
                notifier.status(&format!("stuck: {} not answering", late.join(", ")));
            }
            late_before = late;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_one_line_and_bounded() {
        assert_eq!(one_line("a\nb\tc"), "a b c");
        let long = "x".repeat(STATUS_MAX_CHARS + 10);
        assert_eq!(one_line(&long).chars().count(), STATUS_MAX_CHARS + 1);
    }

    #[test]
    fn abstract_and_path_sockets_are_understood_and_others_refused() {
        assert!(connect("@switchboard-test-notify").is_ok());
        assert!(connect("/run/systemd/notify").is_ok());
        assert!(connect("relative/notify").is_err());
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("switchboard-notify-test-{}", std::process::id());
        let receiver = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        let notifier = Notifier::with_socket(Some(connect(&format!("@{name}")).unwrap()));
        notifier.reloading("before the start-up is announced");
        notifier.ready("ready: 1 of 1 channel instance(s) connected");
        notifier.status("ready: 1 of 1 channel instance(s) connected");
        notifier.reloading("reload (SIGUSR1) begins");
        notifier.stopping("stopping");
        notifier.watchdog();
        receiver.set_nonblocking(true).unwrap();
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        while let Ok(n) = receiver.recv(&mut buffer) {
            received.push(String::from_utf8_lossy(&buffer[..n]).to_string());
        }
        assert_eq!(received.len(), 4, "{received:?}");
        assert_eq!(received[0], "STATUS=before the start-up is announced\n");
        assert!(received[1].starts_with("READY=1\nMAINPID="), "{received:?}");
        assert!(received[2].starts_with("RELOADING=1\nMONOTONIC_USEC="), "{received:?}");
        assert_eq!(received[3], "STOPPING=1\nSTATUS=stopping\n", "nothing after STOPPING=1, no repeated status");
    }

    #[test]
    fn start_up_waits_for_every_instance_until_the_grace() {
        let ledger = Ledger::default();
        let expected: BTreeSet<String> = ["a", "b", "c"].into_iter().map(String::from).collect();
        let grace = Duration::from_secs(30);
        ledger.mark_reached("a");
        ledger.set_problem("b", Some("the server refused the bot token from MM_BOT_TOKEN".into()));
        let early = start_up(&ledger, &expected, Duration::from_secs(1), grace);
        assert!(!early.settled());
        assert_eq!(early.waiting, vec!["c".to_string()]);
        assert!(early.status().starts_with("starting: waiting for c to connect"), "{}", early.status());
        let late = start_up(&ledger, &expected, grace, grace);
        assert!(late.settled());
        assert_eq!(late.connected, vec!["a".to_string()]);
        assert_eq!(late.failed.len(), 2);
        assert!(
            late.status().starts_with("ready: 1 of 3 channel instance(s) connected; not ready: b: "),
            "{}",
            late.status()
        );
    }

    #[test]
    fn the_watchdog_interval_is_half_of_watchdog_usec_for_this_process() {
        let usec = || Some("3000000".to_string());
        assert_eq!(interval_of(usec(), None, 42), Some(Duration::from_millis(1500)));
        assert_eq!(interval_of(usec(), Some("42".into()), 42), Some(Duration::from_millis(1500)));
        assert_eq!(interval_of(usec(), Some("1".into()), 42), None, "another process's watchdog");
        assert_eq!(interval_of(None, None, 42), None);
        assert_eq!(interval_of(Some("0".into()), None, 42), None);
        assert_eq!(interval_of(Some("soon".into()), None, 42), None);
    }
}
