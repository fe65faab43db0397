//! Running under systemd, end to end: the test plays the service manager's notify socket (a
//! datagram socket in a scratch directory, named by `NOTIFY_SOCKET`, with `WATCHDOG_USEC` set)
//! and records what the real gateway tells it through a start against the simulator, a reload
//! by SIGUSR1, a re-exec by SIGUSR2 and a stop by SIGTERM; the watchdog goes quiet while host code is stuck; the unit
//! file in `dist/systemd/` passes `systemd-analyze verify`.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use switchboard_tests::{assert_eventually, harness::Gateway};

use crate::rig::{tail, Rig, RigOptions};

/// One datagram the gateway sent, and when it arrived.
#[derive(Clone)]
struct Notification {
    at: Instant,
    text: String,
}

impl Notification {
    fn has(&self, field: &str) -> bool {
        self.text.lines().any(|line| line == field)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }

    /// `READY`, `RELOADING` or `STOPPING` — what the service manager's state machine reads.
    fn state(&self) -> Option<&'static str> {
        ["READY", "RELOADING", "STOPPING"].into_iter().find(|key| self.has(&format!("{key}=1")))
    }
}

/// The service manager's end: a bound datagram socket and a thread recording what arrives.
struct NotifySocket {
    path: std::path::PathBuf,
    received: Arc<Mutex<Vec<Notification>>>,
    done: Arc<AtomicBool>,
    started: Instant,
}

impl NotifySocket {
    fn bind(dir: &Path) -> Result<Self> {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (sink, stop) = (received.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buffer = vec![0u8; 8192];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = socket.recv(&mut buffer) {
                    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
                    sink.lock().unwrap().push(Notification { at: Instant::now(), text });
                }
            }
        });
        Ok(Self { path, received, done, started: Instant::now() })
    }

    fn env(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    fn received(&self) -> Vec<Notification> {
        self.received.lock().unwrap().clone()
    }

    fn states(&self) -> Vec<&'static str> {
        self.received().iter().filter_map(Notification::state).collect()
    }

    fn pings(&self) -> Vec<Instant> {
        self.received().iter().filter(|n| n.has("WATCHDOG=1")).map(|n| n.at).collect()
    }

    /// The recorded sequence, one message a line with its time since the socket was bound;
    /// watchdog pings in a row are folded into one line with their count and times, unless
    /// more than `gap` lies between two (then a new line starts: the gap shows).
    fn transcript(&self, gap: Duration) -> String {
        let mut lines: Vec<String> = Vec::new();
        let mut pings: Vec<Duration> = Vec::new();
        let fold = |pings: &mut Vec<Duration>, lines: &mut Vec<String>| {
            if let (Some(first), Some(last)) = (pings.first(), pings.last()) {
                let (first, last) = (first.as_secs_f64(), last.as_secs_f64());
                lines.push(format!("{first:>7.3}s  WATCHDOG=1 ×{} (the last at {last:.3}s)", pings.len()));
            }
            pings.clear();
        };
        for notification in self.received() {
            let at = notification.at.duration_since(self.started);
            if notification.text == "WATCHDOG=1\n" {
                if pings.last().is_some_and(|last| at - *last > gap) {
                    fold(&mut pings, &mut lines);
                }
                pings.push(at);
                continue;
            }
            fold(&mut pings, &mut lines);
            lines.push(format!("{:>7.3}s  {}", at.as_secs_f64(), notification.text.trim_end().replace('\n', " | ")));
        }
        fold(&mut pings, &mut lines);
        lines.join("\n")
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// `CLOCK_MONOTONIC` in µs, the clock of `MONOTONIC_USEC=`.
fn monotonic_usec() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

/// Gaps between consecutive pings.
fn gaps(pings: &[Instant]) -> Vec<Duration> {
    pings.windows(2).map(|pair| pair[1] - pair[0]).collect()
}

async fn start_under_notify(
    rig: &Rig,
    notify: &NotifySocket,
    watchdog_usec: &str,
    env: &[(&str, &str)],
) -> Result<Gateway> {
    let socket = notify.env();
    let mut all = vec![
        ("MM_BOT_TOKEN", rig.world.bot.token.as_str()),
        ("NOTIFY_SOCKET", socket.as_str()),
        ("WATCHDOG_USEC", watchdog_usec),
    ];
    all.extend_from_slice(env);
    Gateway::start(&rig.artifacts.switchboard, rig.scratch.path(), &rig.config_path, &all).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_manager_hears_ready_after_connecting_reloads_a_re_exec_watchdog_pings_and_stopping_last(
) -> Result<()> {
    // A first connection attempt that fails: READY=1 must wait for the one that works.
    let rig = Rig::with(RigOptions { channel_keys: "reconnect_initial_ms = 2000", ..RigOptions::default() }).await?;
    let notify = NotifySocket::bind(rig.scratch.path())?;
    rig.sim.refuse_websockets_for(Duration::from_millis(1500));
    // Pings every 1 s.
    let gateway = start_under_notify(&rig, &notify, "2000000", &[]).await?;
    let gap = Duration::from_millis(1500);
    assert_eventually!(
        @within Duration::from_secs(30),
        {
            let ready = notify.states().contains(&"READY");
            let connected = rig.sim.ws_connections_opened();
            assert!(!(ready && connected == 0), "READY=1 before any WebSocket was open:\n{}", notify.transcript(gap));
            ready
        },
        "READY=1 once connected:\n{}\n--- gateway log ---\n{}",
        notify.transcript(gap),
        tail(&gateway, 40)
    );
    let ready = notify.received().into_iter().find(|n| n.state() == Some("READY")).unwrap();
    assert_eq!(ready.value("STATUS"), Some("ready: 1 of 1 channel instance(s) connected"), "{}", ready.text);
    assert_eq!(ready.value("MAINPID"), Some(gateway.pid().to_string().as_str()));
    rig.ask(&rig.world.office_general, "hello under systemd", &gateway).await;

    let before_reload = monotonic_usec();
    gateway.signal(libc::SIGUSR1);
    assert_eventually!(
        notify.states() == ["READY", "RELOADING", "READY"],
        "RELOADING=1, then READY=1 around the reload:\n{}",
        notify.transcript(gap)
    );
    let after_reload = monotonic_usec();
    let states: Vec<Notification> = notify.received().into_iter().filter(|n| n.state().is_some()).collect();
    let reloading = &states[1];
    let stamp: u64 = reloading.value("MONOTONIC_USEC").context("RELOADING=1 carries MONOTONIC_USEC=")?.parse()?;
    assert!((before_reload..=after_reload).contains(&stamp), "MONOTONIC_USEC={stamp} is the reload's time");
    assert_eq!(reloading.value("STATUS"), Some("reloading (SIGUSR1)"));
    assert_eq!(states[2].value("STATUS"), Some("reload (SIGUSR1) applied"), "{}", states[2].text);
    rig.ask(&rig.world.office_general, "hello after the reload", &gateway).await;

    // SIGUSR2: the binary is executed again in the same process. The service manager hears a
    // reload (STOPPING=1 would make it wait for an exit and ignore the new READY=1), and the
    // new binary's READY=1 names the same main PID.
    gateway.signal(libc::SIGUSR2);
    assert_eventually!(
        @within Duration::from_secs(60),
        notify.states() == ["READY", "RELOADING", "READY", "RELOADING", "READY"],
        "RELOADING=1 before the re-exec, READY=1 from the new binary:\n{}\n--- gateway log ---\n{}",
        notify.transcript(gap),
        tail(&gateway, 30)
    );
    assert_eq!(gateway.count(&["state loaded"]), 2, "it started again");
    let states: Vec<Notification> = notify.received().into_iter().filter(|n| n.state().is_some()).collect();
    assert!(states[3].value("STATUS").is_some_and(|s| s.starts_with("restarting")), "{}", states[3].text);
    assert_eq!(states[4].value("MAINPID"), Some(gateway.pid().to_string().as_str()), "an exec keeps the PID");
    assert_eq!(states[4].value("STATUS"), Some("ready: 1 of 1 channel instance(s) connected"));
    rig.ask(&rig.world.office_general, "hello after the re-exec", &gateway).await;

    // Watch the pings for a while: every 1 s (half of WATCHDOG_USEC), never 2 s apart.
    let watched_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = gateway.stop().await?;
    assert!(status.success(), "{status}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("--- what the service manager heard ---\n{}", notify.transcript(gap));

    assert_eq!(
        notify.states(),
        ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"],
        "{}",
        notify.transcript(gap)
    );
    let received = notify.received();
    let last = received.last().unwrap();
    assert_eq!(last.state(), Some("STOPPING"), "STOPPING=1 is the last message:\n{}", notify.transcript(gap));
    assert_eq!(last.value("STATUS"), Some("stopping: finishing running turns and queued replies"));
    let pings = notify.pings();
    let watched: Vec<Instant> = pings.iter().copied().filter(|at| *at >= watched_from).collect();
    assert!(watched.len() >= 4, "about 5 pings in 5 s: {}\n{}", watched.len(), notify.transcript(gap));
    let all_gaps = gaps(&pings);
    let longest = all_gaps.iter().max().copied().unwrap_or_default();
    assert!(
        longest < Duration::from_millis(1900),
        "a ping gap of {longest:?} (WATCHDOG_USEC is 2 s), the re-exec included"
    );
    let watched_gaps = gaps(&watched);
    let mean = watched_gaps.iter().sum::<Duration>() / watched_gaps.len() as u32;
    assert!(
        (Duration::from_millis(800)..=Duration::from_millis(1300)).contains(&mean),
        "pings every half of WATCHDOG_USEC (1 s): mean gap {mean:?}"
    );
    Ok(())
}

/// Host code stuck: first the async runtime (its one worker blocked), then a channel
/// instance's task waiting in an `.await` that does not end while the runtime runs on. No ping
/// goes out while either lasts (for the instance, once its answer is later than
/// `3 × adapter_call_timeout_ms + 1 s`: 2.5 s here), and the pings come back after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_goes_quiet_while_the_runtime_or_an_instance_task_is_stuck() -> Result<()> {
    const STALL: &str = "STALL-THE-TASK";
    let blocked_runtime = ("io_threads = 1", None, 3000, Duration::from_millis(2700));
    let stuck_instance =
        ("io_threads = 2", Some(("SWITCHBOARD_FAULT_TASK_STALL_AWAIT", "1")), 6000, Duration::from_millis(3000));
    for (io_threads, mode, stall_ms, quiet_at_least) in [blocked_runtime, stuck_instance] {
        let gateway_keys = format!("{io_threads}\nadapter_call_timeout_ms = 500");
        let rig = Rig::with(RigOptions { gateway_keys: &gateway_keys, ..RigOptions::default() }).await?;
        let notify = NotifySocket::bind(rig.scratch.path())?;
        let stall_ms_text = stall_ms.to_string();
        let mut env =
            vec![("SWITCHBOARD_FAULT_TASK_STALL", STALL), ("SWITCHBOARD_FAULT_TASK_STALL_MS", stall_ms_text.as_str())];
        env.extend(mode);
        // Pings every 250 ms.
        let gateway = start_under_notify(&rig, &notify, "500000", &env).await?;
        let gap = Duration::from_millis(400);
        assert_eventually!(notify.states().contains(&"READY"), "READY=1:\n{}", notify.transcript(gap));
        rig.ask(&rig.world.office_general, "before the stall", &gateway).await;
        let stalled_at = Instant::now();
        rig.sim.post_as(&rig.world.alice.id, &rig.world.office_general, STALL, None);
        assert_eventually!(gateway.count(&["fault injected: the instance task"]) == 1, "the stall begins");
        // The stall ends and the pings come back.
        assert_eventually!(
            notify.pings().iter().any(|at| *at > stalled_at + Duration::from_millis(stall_ms)),
            "pings resume after the stall:\n{}",
            notify.transcript(gap)
        );
        let pings = notify.pings();
        let longest = gaps(&pings).into_iter().max().unwrap_or_default();
        println!(
            "--- {io_threads}, a {stall_ms} ms stall ({}): the longest ping gap was {longest:?} ---\n{}",
            if mode.is_some() { "an instance task waits" } else { "the worker is blocked" },
            notify.transcript(gap)
        );
        assert!(
            longest >= quiet_at_least,
            "no ping for at least {quiet_at_least:?} while stuck, got a gap of {longest:?}"
        );
        assert!(longest < Duration::from_millis(stall_ms + 1000), "pings resume once the task answers: {longest:?}");
        if mode.is_some() {
            assert_eq!(
                gateway.count(&["not answering the watchdog", "channel instance mattermost"]),
                1,
                "the late instance is named:\n{}",
                tail(&gateway, 30)
            );
        }
        gateway.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn the_unit_file_passes_systemd_analyze_verify() -> Result<()> {
    let artifacts = switchboard_tests::harness::Artifacts::discover()?;
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/switchboard.service");
    let text = std::fs::read_to_string(&unit).with_context(|| format!("read {}", unit.display()))?;
    assert!(text.contains("ExecStart=/usr/bin/switchboard run"), "the unit starts /usr/bin/switchboard");
    // verify wants the ExecStart binary to exist: the built one stands in for /usr/bin's.
    let binary = std::fs::canonicalize(&artifacts.switchboard)?;
    let scratch = tempfile::tempdir()?;
    let copy = scratch.path().join("switchboard.service");
    std::fs::write(&copy, text.replace("/usr/bin/switchboard", &binary.to_string_lossy()))?;
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("systemd-analyze (the systemd package) must be installed")?;
    let said = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "systemd-analyze verify failed:\n{said}");
    // It warns about unknown keys and bad values without failing: any output is a finding.
    assert!(said.trim().is_empty(), "systemd-analyze verify has findings:\n{said}");
    let security = std::process::Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()?;
    let security = String::from_utf8_lossy(&security.stdout);
    let exposure = security.lines().find(|line| line.contains("Overall exposure level")).unwrap_or("");
    println!("systemd-analyze security --offline=yes: {}", exposure.trim());
    Ok(())
}
