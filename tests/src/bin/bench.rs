//! `cargo xtask bench`: the real `switchboard` binary with the real Mattermost `.so` against
//! the simulator on loopback, `echo` agent, measured against a floor in the same run.
//!
//! Usage: `bench --switchboard <binary> --plugin <adapter .so> --build-b <second build>
//!         --out <results.json> [--matrix-plugin <matrix .so>] [--quick]
//!         [--only throughput,latency,reload,scale,matrix]`.
//!
//! - floor: the simulator's own round trip with a minimal client that answers each `posted`
//!   event directly (WebSocket in, REST post out), no gateway;
//! - throughput (1, 10, 100 channels, a burst of unique tokens) and its ratio to the floor;
//! - latency at a moderate fixed rate, and what the gateway adds to the floor's; under
//!   durability=full once more with a gateway at durability=normal, to tell the disk's sync
//!   before each reply from the rest. The latency runs come before the bursts;
//! - the share of CPU time the hypervisor took (steal) during the latency runs and bursts;
//! - reload: swap pause, file dropped → new build answering, lost/duplicated/misrouted during
//!   swaps under load;
//! - memory: RSS idle, under load, after many reloads; generations still mapped;
//! - scale: start-up, swap pause (the handover) and RSS with 1k … 1M stored sessions;
//!   registry load time, lookup cost and bytes per session in-process;
//! - start-up: process start to first reply delivered;
//! - idle: the gateway's context switches per second while connected with no traffic (each
//!   is a thread waking up: idle should mean idle);
//! - matrix: replies per second through the gateway with the Matrix `.so` against a real
//!   Synapse, beside a minimal bot's on the same server (`bench/matrix.rs`).
//!
//! `BENCH_GATEWAY_LOG` sets the gateways' log filter and `BENCH_GATEWAY_LOG_TO` a file the
//! main gateway's log is written to; `BENCH_DURABILITY` their `gateway.durability`.
//!
//! Every run checks that nothing was lost, duplicated or misrouted; `--quick` (CI) exits
//! non-zero if anything was.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};
use switchboard::{
    session::{DeliveryTarget, DurableSessions, Session, SessionStore},
    store::{Durability, Store},
};
use switchboard_tests::{
    harness::{install_plugin, mattermost_file_name, seed_config, Gateway},
    sim::{demo_world, ChannelType, DemoWorld, SimOptions, Simulator},
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

#[path = "bench/matrix.rs"]
mod matrix;

// The simulator and the floor client share this process: glibc's allocator was a fifth of
// its CPU time, which the floor (and the gateway beside it) paid for.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BUILD_B_TAG: &str = " [build b]";

struct Args {
    switchboard: PathBuf,
    plugin: PathBuf,
    /// The Matrix adapter; without it the Matrix row is left out.
    matrix_plugin: Option<PathBuf>,
    build_b: PathBuf,
    out: PathBuf,
    quick: bool,
    /// Parts to run (`--only throughput,latency`); all when empty. The floor always runs.
    only: Vec<String>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn parse_args() -> Result<Args> {
    let (mut switchboard, mut plugin, mut build_b, mut out, mut quick) = (None, None, None, None, false);
    let mut only = Vec::new();
    let mut matrix_plugin = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--switchboard" => switchboard = args.next().map(PathBuf::from),
            "--plugin" => plugin = args.next().map(PathBuf::from),
            "--matrix-plugin" => matrix_plugin = args.next().map(PathBuf::from),
            "--build-b" => build_b = args.next().map(PathBuf::from),
            "--out" => out = args.next().map(PathBuf::from),
            "--quick" => quick = true,
            "--only" => only = args.next().unwrap_or_default().split(',').map(str::to_string).collect(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Args {
        switchboard: switchboard.context("--switchboard <binary> is required")?,
        plugin: plugin.context("--plugin <file> is required")?,
        matrix_plugin,
        build_b: build_b.context("--build-b <file> is required")?,
        out: out.context("--out <file> is required")?,
        quick,
        only,
    })
}

/// How big each part of the run is.
struct Sizes {
    burst: usize,
    latency_rate: u64,
    latency_count: usize,
    swaps_under_load: usize,
    swap_load_rate: u64,
    reloads_total: usize,
    session_counts: Vec<usize>,
    /// The Matrix burst and the rooms it is spread over.
    matrix_messages: usize,
    matrix_rooms: usize,
}

impl Sizes {
    fn for_mode(quick: bool) -> Self {
        if quick {
            Self {
                burst: 1_000,
                latency_rate: 200,
                latency_count: 400,
                swaps_under_load: 6,
                swap_load_rate: 200,
                reloads_total: 20,
                session_counts: vec![1_000, 10_000],
                matrix_messages: 200,
                matrix_rooms: 10,
            }
        } else {
            Self {
                burst: 20_000,
                latency_rate: 500,
                latency_count: 5_000,
                swaps_under_load: 50,
                swap_load_rate: 300,
                reloads_total: 500,
                session_counts: vec![1_000, 100_000, 1_000_000],
                matrix_messages: 2_000,
                matrix_rooms: 10,
            }
        }
    }
}

/// What one load run saw.
#[derive(Debug, Default)]
struct Load {
    posted: usize,
    answered: usize,
    lost: usize,
    duplicated: usize,
    misrouted: usize,
    seconds: f64,
    latencies_us: Vec<u64>,
    /// A few of the tokens lost, duplicated or misrouted, to look up in the gateway's log.
    examples: Vec<String>,
}

/// Tokens of each kind kept in [`Load::examples`].
const EXAMPLES_KEPT: usize = 5;

impl Load {
    fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.answered as f64 / self.seconds
        } else {
            0.0
        }
    }

    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.misrouted == 0
    }

    fn json(&self) -> Value {
        json!({
            "posted": self.posted, "answered": self.answered, "lost": self.lost,
            "duplicated": self.duplicated, "misrouted": self.misrouted,
            "seconds": self.seconds, "per_second": self.per_second(),
            "latency_us": latency_json(&self.latencies_us),
            "examples": self.examples,
        })
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Write back everything written so far and give a gateway a moment to finish its
/// checkpoint, so a measurement that follows meets an idle disk.
async fn settle_disk() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A latency run beside the floor's at the same rate: both, and what the gateway added.
fn added_latency(latency: &Load, floor: &Load, rate: u64) -> Value {
    let added = |p: f64| percentile(&latency.latencies_us, p) as i64 - percentile(&floor.latencies_us, p) as i64;
    let max = |load: &Load| load.latencies_us.last().copied().unwrap_or(0) as i64;
    json!({
        "rate_per_second": rate,
        "gateway_us": latency_json(&latency.latencies_us),
        "floor_us": latency_json(&floor.latencies_us),
        "added_us": {"p50": added(0.5), "p99": added(0.99), "max": max(latency) - max(floor)},
        "load": latency.json(),
    })
}

fn latency_json(sorted: &[u64]) -> Value {
    json!({"p50": percentile(sorted, 0.5), "p99": percentile(sorted, 0.99), "max": sorted.last().copied().unwrap_or(0)})
}

struct Bench {
    args: Args,
    sizes: Sizes,
    sim: Simulator,
    world: DemoWorld,
    channels: Vec<String>,
    probe_channel: String,
    scratch: tempfile::TempDir,
    runs: std::sync::atomic::AtomicUsize,
    /// `gateway.durability` of the gateways started (`BENCH_DURABILITY`, default `full`).
    durability: String,
}

impl Bench {
    async fn new(args: Args) -> Result<Self> {
        // The bursts post in-process, thousands within a millisecond, far faster than a real
        // server can create posts (a database write each): its 256-event send queue per
        // connection would measure the injection, not the gateway, and close the socket.
        let options = SimOptions { send_queue: 1 << 20, ..SimOptions::default() };
        let sim = Simulator::start_with(options).await?;
        let world = demo_world(&sim);
        let open = |name: String| {
            let id = sim.add_channel(&world.team_id, &name, &name, ChannelType::Open);
            sim.add_member(&id, &world.bot.id);
            sim.add_member(&id, &world.alice.id);
            id
        };
        let channels = (0..100).map(|i| open(format!("bench-{i}"))).collect();
        let probe_channel = open("bench-probe".into());
        let sizes = Sizes::for_mode(args.quick);
        Ok(Self {
            args,
            sizes,
            sim,
            world,
            channels,
            probe_channel,
            scratch: tempfile::tempdir()?,
            runs: Default::default(),
            durability: std::env::var("BENCH_DURABILITY").unwrap_or_else(|_| "full".into()),
        })
    }

    /// Post `count` unique tokens round-robin over the first `channels` channels (as fast as
    /// possible, or at `rate` per second) and collect the bot's answers to them.
    async fn load(&self, channels: usize, count: usize, rate: Option<u64>) -> Load {
        let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let prefix = format!("r{run}-");
        let mut observer = self.sim.observe_posts();
        let targets = &self.channels[..channels];
        let poster = async {
            let mut tick = rate.map(|rate| {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                tick
            });
            for i in 0..count {
                match tick.as_mut() {
                    Some(tick) => {
                        tick.tick().await;
                    }
                    None if i % 64 == 0 => tokio::task::yield_now().await,
                    None => {}
                }
                self.sim.post_as(&self.world.alice.id, &targets[i % channels], &format!("{prefix}{i}"), None);
            }
        };
        let deadline = Duration::from_secs(60) + Duration::from_millis(count as u64 * 2);
        let collector = async {
            let mut sent: HashMap<String, (String, Instant)> = HashMap::with_capacity(count);
            let mut answered: HashMap<String, usize> = HashMap::with_capacity(count);
            let mut load = Load { posted: count, ..Load::default() };
            let (mut first, mut last) = (None, None);
            let started = Instant::now();
            let mut complete_at: Option<Instant> = None;
            loop {
                // After the last answer, wait a little for duplicates to show.
                let wait = match complete_at {
                    Some(at) => Duration::from_millis(300).saturating_sub(at.elapsed()),
                    None => deadline.saturating_sub(started.elapsed()),
                };
                let Ok(Some((post, at))) = tokio::time::timeout(wait, observer.recv()).await else { break };
                if post.user_id == self.world.alice.id {
                    if post.message.starts_with(&prefix) {
                        first.get_or_insert(at);
                        sent.insert(post.message, (post.channel_id, at));
                    }
                    continue;
                }
                if post.user_id != self.world.bot.id {
                    continue;
                }
                let text = post.message.strip_prefix("echo: ").unwrap_or("");
                let token = text.strip_suffix(BUILD_B_TAG).unwrap_or(text);
                let Some((channel, posted_at)) = sent.get(token) else { continue };
                let seen = answered.entry(token.to_string()).or_insert(0);
                *seen += 1;
                if *seen > 1 {
                    load.duplicated += 1;
                    if load.duplicated <= EXAMPLES_KEPT {
                        load.examples.push(format!("duplicated {token}"));
                    }
                    continue;
                }
                if *channel != post.channel_id {
                    load.misrouted += 1;
                    if load.misrouted <= EXAMPLES_KEPT {
                        load.examples.push(format!("misrouted {token} to {}", post.channel_id));
                    }
                }
                load.latencies_us.push(at.duration_since(*posted_at).as_micros() as u64);
                last = Some(at);
                if answered.len() == count {
                    complete_at = Some(Instant::now());
                }
            }
            load.answered = answered.len();
            load.lost = count - load.answered;
            let unanswered = (0..count).map(|i| format!("{prefix}{i}")).filter(|token| !answered.contains_key(token));
            load.examples.extend(unanswered.take(EXAMPLES_KEPT).map(|token| format!("lost {token}")));
            if let (Some(first), Some(last)) = (first, last) {
                load.seconds = last.duration_since(first).as_secs_f64();
            }
            load.latencies_us.sort_unstable();
            load
        };
        let ((), load) = tokio::join!(poster, collector);
        load
    }

    fn plugin_dir(&self) -> PathBuf {
        self.scratch.path().join("plugins")
    }

    fn write_config(&self, name: &str, state_dir: &Path) -> Result<PathBuf> {
        self.write_config_with(name, state_dir, &self.durability)
    }

    fn write_config_with(&self, name: &str, state_dir: &Path, durability: &str) -> Result<PathBuf> {
        let config = seed_config(&self.sim.base_url(), &self.plugin_dir(), "onmessage", "kind = \"echo\"")
            .replacen(
                "state_dir = \"state\"\n",
                &format!(
                    "state_dir = \"{}\"\nmax_concurrent_turns = 256\nlane_capacity = 1000000\ndurability = \"{}\"\n",
                    state_dir.display(),
                    durability
                ),
                1,
            )
            .replacen("[plugins]\n", "[plugins]\nsettle_ms = 20\n", 1)
            .replace("typing_interval_ms = 200", "typing_interval_ms = 3000");
        let path = self.scratch.path().join(name);
        std::fs::write(&path, config)?;
        Ok(path)
    }

    async fn start_gateway(&self, config: &Path) -> Result<Gateway> {
        let gateway = Gateway::start(
            &self.args.switchboard,
            self.scratch.path(),
            config,
            &[
                ("MM_BOT_TOKEN", &self.world.bot.token),
                (
                    "SWITCHBOARD_LOG",
                    std::env::var("BENCH_GATEWAY_LOG").as_deref().unwrap_or("warn,switchboard::gateway=info"),
                ),
            ],
        )
        .await?;
        Ok(gateway)
    }

    /// Wait until a gateway just started has opened its WebSocket (and said hello).
    async fn wait_for_connection(&self, opened_before: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sim.ws_connections_opened() == opened_before {
            if Instant::now() > deadline {
                bail!("the gateway did not connect within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(())
    }

    /// Post a probe in the probe channel and wait for its answer (the answer's text). Watches
    /// the simulator's new posts rather than polling its post list, which would cost the
    /// machine's CPU (shared with the gateway) more the longer the run.
    async fn ask(&self, text: &str) -> Result<String> {
        let mut observer = self.sim.observe_posts();
        self.sim.post_as(&self.world.alice.id, &self.probe_channel, text, None);
        let wanted = format!("echo: {text}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match tokio::time::timeout_at(deadline, observer.recv()).await {
                Ok(Some((post, _))) => {
                    if post.channel_id == self.probe_channel
                        && post.user_id == self.world.bot.id
                        && post.message.strip_suffix(BUILD_B_TAG).unwrap_or(&post.message) == wanted
                    {
                        return Ok(post.message);
                    }
                }
                Ok(None) => bail!("the simulator stopped"),
                Err(_) => {
                    let tail: Vec<String> = self
                        .sim
                        .posts_in(&self.probe_channel)
                        .iter()
                        .rev()
                        .take(4)
                        .map(|p| format!("{} {}: {}", p.channel_id, p.user_id, p.message))
                        .collect();
                    bail!("no answer to {text:?} within 30 s; last posts in {}: {tail:?}", self.probe_channel);
                }
            }
        }
    }

    /// Drop build B (or A) into the plugin directory and wait until it answers; the time it took.
    async fn swap(&self, to_b: bool, round: usize) -> Result<Duration> {
        let build = if to_b { &self.args.build_b } else { &self.args.plugin };
        let dropped = Instant::now();
        install_plugin(build, &self.plugin_dir(), &mattermost_file_name())?;
        for attempt in 0.. {
            let answer = self.ask(&format!("probe-{round}-{attempt}")).await?;
            if answer.ends_with(BUILD_B_TAG) == to_b {
                return Ok(dropped.elapsed());
            }
            if dropped.elapsed() > Duration::from_secs(30) {
                bail!("swap {round} did not take effect within 30 s");
            }
        }
        unreachable!()
    }

    /// Whichever build is in the plugin directory, make it build A.
    fn reset_plugin_dir(&self) -> Result<()> {
        install_plugin(&self.args.plugin, &self.plugin_dir(), &mattermost_file_name())?;
        Ok(())
    }
}

/// Posts the floor client has in flight at most: the gateway's delivery window per instance.
const FLOOR_IN_FLIGHT: usize = 64;

/// Attempts the floor client makes at each reply before counting it failed.
const FLOOR_POST_ATTEMPTS: u32 = 5;

/// The floor client: its task, and the replies it gave up on after every attempt failed.
struct Floor {
    task: tokio::task::JoinHandle<()>,
    posts_failed: Arc<std::sync::atomic::AtomicU64>,
}

/// A minimal Mattermost client that answers each `posted` event directly: the floor. Like any
/// real client it retries a reply whose request failed (a pooled connection the server closed
/// just then), with the inbound post's id as `pending_post_id` so a retry is never posted twice.
async fn floor_client(sim: &Simulator, world: &DemoWorld) -> Result<Floor> {
    let base = sim.base_url();
    let mut request = format!("{}/api/v4/websocket", base.replacen("http", "ws", 1)).into_client_request()?;
    request.headers_mut().insert("Authorization", format!("Bearer {}", world.bot.token).parse()?);
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
    let http = reqwest::Client::new();
    let (token, bot) = (world.bot.token.clone(), world.bot.id.clone());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(FLOOR_IN_FLIGHT));
    let posts_failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let failures = posts_failed.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else { continue };
            let Ok(event) = serde_json::from_str::<Value>(text.as_str()) else { continue };
            if event["event"] != "posted" {
                continue;
            }
            let Some(post) = event["data"]["post"].as_str().and_then(|p| serde_json::from_str::<Value>(p).ok()) else {
                continue;
            };
            if post["user_id"] == bot.as_str() {
                continue;
            }
            let body = json!({
                "channel_id": post["channel_id"],
                "message": format!("echo: {}", post["message"].as_str().unwrap_or("")),
                "pending_post_id": post["id"],
            });
            let (http, url, token, failures) =
                (http.clone(), format!("{base}/api/v4/posts"), token.clone(), failures.clone());
            // As many posts in flight as the gateway allows itself (its delivery window): an
            // unbounded client opens a connection per post once events arrive in bursts.
            let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
            tokio::spawn(async move {
                let mut last_error = String::new();
                for attempt in 1..=FLOOR_POST_ATTEMPTS {
                    match http.post(&url).bearer_auth(&token).json(&body).send().await {
                        Ok(response) if response.status().is_success() => {
                            drop(permit);
                            return;
                        }
                        Ok(response) => last_error = format!("HTTP {}", response.status()),
                        Err(error) => last_error = error.to_string(),
                    }
                    tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
                }
                eprintln!("bench: the floor client gave up on a reply: {last_error}");
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
            });
        }
    });
    Ok(Floor { task, posts_failed })
}

/// CPU time this process has used (user + system), in clock ticks.
/// Run `load`, and tell what share of the machine's CPU time the hypervisor took meanwhile
/// (`steal` in /proc/stat): on a shared VM it explains runs that are slower for no reason
/// of their own.
async fn stolen_during(load: impl std::future::Future<Output = Load>) -> (Load, f64) {
    let before = cpu_times();
    let load = load.await;
    let after = cpu_times();
    let total = after.1.saturating_sub(before.1);
    let stolen = if total == 0 { 0.0 } else { after.0.saturating_sub(before.0) as f64 * 100.0 / total as f64 };
    (load, (stolen * 10.0).round() / 10.0)
}

/// What the gateway process has spent so far.
#[derive(Clone, Copy)]
struct Usage {
    cpu_ticks: u64,
    context_switches: u64,
}

impl Usage {
    fn of(gateway: &Gateway) -> Self {
        Self { cpu_ticks: gateway.cpu_ticks().unwrap_or(0), context_switches: gateway.context_switches().unwrap_or(0) }
    }

    /// Gateway CPU and context switches per reply since `before`. At a moderate rate few
    /// events share a batch, so every hand-off between threads wakes one: this is what a
    /// reply costs when the gateway is not busy.
    fn per_reply_since(self, before: Usage, replies: usize) -> Value {
        let replies = replies.max(1) as f64;
        let cpu_us = self.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 * 1e6 / clock_ticks_per_second();
        json!({
            "gateway_cpu_us_per_reply": cpu_us / replies,
            "gateway_context_switches_per_reply": self.context_switches.saturating_sub(before.context_switches) as f64 / replies,
        })
    }
}

/// Run `load` against `gateway`: what it saw, the hypervisor's steal (%) and what the
/// gateway spent per reply.
async fn measured_on(gateway: &Gateway, load: impl std::future::Future<Output = Load>) -> (Load, f64, Value) {
    let before = Usage::of(gateway);
    let (load, stolen) = stolen_during(load).await;
    let spent = Usage::of(gateway).per_reply_since(before, load.answered);
    (load, stolen, spent)
}

/// Copy the fields of `from` (an object) into `into`.
fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// (steal, all) jiffies of the whole machine since boot.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    (fields.get(7).copied().unwrap_or(0), fields.iter().sum())
}

fn cpu_ticks_of_self() -> u64 {
    // SAFETY: `tms` is plain data that times(2) fills in.
    let mut tms: libc::tms = unsafe { std::mem::zeroed() };
    unsafe { libc::times(&mut tms) };
    (tms.tms_utime + tms.tms_stime) as u64
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

fn rss_kib_of_self() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `field` (µs) of the generations after the first, from `/status`, sorted: `swap_pause_us`
/// (events held until the new generation handled them) or `swap_settled_us` (until that
/// first batch was also stored and acted on).
async fn swap_pauses(gateway: &Gateway, field: &str) -> Result<Vec<u64>> {
    let status = gateway.status().await?;
    let mut pauses: Vec<u64> = status["generations"]
        .as_array()
        .map(|g| g.iter().filter(|g| g["generation"].as_u64() > Some(1)).filter_map(|g| g[field].as_u64()).collect())
        .unwrap_or_default();
    pauses.sort_unstable();
    Ok(pauses)
}

async fn generations_still_mapped(gateway: &Gateway) -> Result<usize> {
    let status = gateway.status().await?;
    Ok(status["generations"]
        .as_array()
        .map(|g| g.iter().filter(|g| g["state"] != "running" && g["mapped"] == true).count())
        .unwrap_or(0))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = parse_args()?;
    // The release build just wrote hundreds of megabytes: let the kernel write them back now,
    // not during the measurements (it made the gateway's fdatasync calls take 100+ ms).
    settle_disk().await;
    let bench = Bench::new(args).await?;
    let mut results = json!({
        "mode": if bench.args.quick { "quick" } else { "full" },
        "machine": machine(),
    });
    let mut clean = true;
    let sizes = &bench.sizes;

    // 1. The floor.
    eprintln!("bench: floor");
    // The floor is the baseline, not the system under test: what it loses (its client gave
    // up after every retry) is reported, and leaves `clean`, which is the gateway's, alone.
    let floor = floor_client(&bench.sim, &bench.world).await?;
    let (floor_latency, floor_stolen) =
        stolen_during(bench.load(10, sizes.latency_count, Some(sizes.latency_rate))).await;
    let mut floor_throughput = serde_json::Map::new();
    for channels in [1, 10, 100].into_iter().filter(|_| bench.args.wants("throughput")) {
        let (load, stolen) = stolen_during(bench.load(channels, sizes.burst, None)).await;
        let mut entry = load.json();
        entry["cpu_stolen_percent"] = json!(stolen);
        floor_throughput.insert(channels.to_string(), entry);
    }
    floor.task.abort();
    results["floor"] = json!({
        "throughput": floor_throughput,
        "latency": floor_latency.json(),
        "latency_cpu_stolen_percent": floor_stolen,
        "posts_failed": floor.posts_failed.load(std::sync::atomic::Ordering::Relaxed),
    });

    std::fs::create_dir_all(bench.plugin_dir())?;
    bench.reset_plugin_dir()?;

    // 1b. Latency through a gateway whose commits do not wait for the disk: what the gateway
    // adds apart from the sync each reply waits for under durability=full. Both latency runs
    // come before the gateway's bursts, close to the floor's: after minutes of full load this
    // machine's hypervisor takes a share of the CPU (steal), which lengthens every hop.
    if bench.args.wants("latency") && bench.durability == "full" {
        eprintln!("bench: latency, durability=normal");
        let config =
            bench.write_config_with("bench-normal.toml", &bench.scratch.path().join("state-normal"), "normal")?;
        let opened_before = bench.sim.ws_connections_opened();
        let gateway = bench.start_gateway(&config).await?;
        bench.wait_for_connection(opened_before).await?;
        bench.ask("first").await?;
        settle_disk().await;
        let (latency, stolen, spent) =
            measured_on(&gateway, bench.load(10, sizes.latency_count, Some(sizes.latency_rate))).await;
        clean &= latency.clean();
        results["latency_durability_normal"] = added_latency(&latency, &floor_latency, sizes.latency_rate);
        results["latency_durability_normal"]["cpu_stolen_percent"] = json!(stolen);
        merge(&mut results["latency_durability_normal"], spent);
        gateway.stop().await?;
    }

    // 2. Start-up and idle memory.
    eprintln!("bench: start-up");
    let config = bench.write_config("bench.toml", &bench.scratch.path().join("state"))?;
    let opened_before = bench.sim.ws_connections_opened();
    let spawned = Instant::now();
    let gateway = bench.start_gateway(&config).await?;
    bench.wait_for_connection(opened_before).await?;
    bench.ask("first").await?;
    let start_up_ms = spawned.elapsed().as_secs_f64() * 1000.0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = gateway.rss_kib().unwrap_or(0);
    results["start_up_ms"] = json!(start_up_ms);
    let idle_for = Duration::from_secs(if bench.args.quick { 3 } else { 10 });
    let switches_before = gateway.context_switches().unwrap_or(0);
    tokio::time::sleep(idle_for).await;
    let idle_switches = gateway.context_switches().unwrap_or(0).saturating_sub(switches_before);
    results["idle_wakeups_per_s"] = json!(idle_switches as f64 / idle_for.as_secs_f64());

    // 3. Latency and throughput through the gateway.
    if bench.args.wants("latency") {
        eprintln!("bench: latency");
        settle_disk().await;
        let (latency, stolen, spent) =
            measured_on(&gateway, bench.load(10, sizes.latency_count, Some(sizes.latency_rate))).await;
        clean &= latency.clean();
        results["latency"] = added_latency(&latency, &floor_latency, sizes.latency_rate);
        results["latency"]["cpu_stolen_percent"] = json!(stolen);
        merge(&mut results["latency"], spent);
    }

    eprintln!("bench: throughput");
    let mut throughput = serde_json::Map::new();
    let mut rss_under_load = 0;
    for channels in [1, 10, 100].into_iter().filter(|_| bench.args.wants("throughput")) {
        let peak = std::sync::atomic::AtomicU64::new(0);
        let sampling = async {
            loop {
                peak.fetch_max(gateway.rss_kib().unwrap_or(0), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let bench_before = cpu_ticks_of_self();
        let (load, stolen, spent) = tokio::select! {
            measured = measured_on(&gateway, bench.load(channels, sizes.burst, None)) => measured,
            () = sampling => unreachable!("sampling never ends"),
        };
        let bench_ticks = cpu_ticks_of_self().saturating_sub(bench_before);
        rss_under_load = rss_under_load.max(peak.load(std::sync::atomic::Ordering::Relaxed));
        clean &= load.clean();
        let floor_rate = results["floor"]["throughput"][channels.to_string()]["per_second"].as_f64().unwrap_or(0.0);
        let mut entry = load.json();
        entry["ratio_to_floor"] = json!(if floor_rate > 0.0 { load.per_second() / floor_rate } else { 0.0 });
        entry["cpu_stolen_percent"] = json!(stolen);
        // CPU per reply is steadier than replies per second on a shared, noisy machine; the
        // bench process (simulator and collector) shares the two cores with the gateway.
        merge(&mut entry, spent);
        entry["bench_process_cpu_us_per_reply"] =
            json!(bench_ticks as f64 * 1e6 / clock_ticks_per_second() / load.answered.max(1) as f64);
        throughput.insert(channels.to_string(), entry);
    }
    results["throughput"] = Value::Object(throughput);
    // RSS once the load has passed: the base the reloads' growth is measured from.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before_reloads = gateway.rss_kib().unwrap_or(0);

    // 4. Reload under load.
    if bench.args.wants("reload") {
        eprintln!("bench: reload under load");
        // About as long as the swaps take (each roughly a quarter of a second).
        let count = (sizes.swaps_under_load as u64 * sizes.swap_load_rate / 4).max(200) as usize;
        let swaps = async {
            let mut to_answer = Vec::new();
            for round in 1..=sizes.swaps_under_load {
                to_answer.push(bench.swap(round % 2 == 1, round).await?.as_millis() as u64);
            }
            anyhow::Ok(to_answer)
        };
        let (load, to_answer) = tokio::join!(bench.load(20, count, Some(sizes.swap_load_rate)), swaps);
        let mut to_answer = to_answer?;
        to_answer.sort_unstable();
        clean &= load.clean();
        let pauses = swap_pauses(&gateway, "swap_pause_us").await?;
        let settled = swap_pauses(&gateway, "swap_settled_us").await?;
        results["reload"] = json!({
            "swaps": sizes.swaps_under_load,
            "swap_pause_us": latency_json(&pauses),
            "swap_settled_us": latency_json(&settled),
            "file_to_answer_ms": latency_json(&to_answer),
            "load": load.json(),
        });
    }
    // 5. Memory after many reloads.
    if bench.args.wants("reload") {
        eprintln!("bench: {} reloads", sizes.reloads_total);
        for round in sizes.swaps_under_load + 1..=sizes.reloads_total {
            bench.swap(round % 2 == 1, round).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after_reloads = gateway.rss_kib().unwrap_or(0);
        let still_mapped = generations_still_mapped(&gateway).await?;
        results["memory_kib"] = json!({
            "idle": rss_idle,
            "under_load": rss_under_load,
            "before_reloads": rss_before_reloads,
        "after_reloads": rss_after_reloads,
        "growth_over_reloads": rss_after_reloads as i64 - rss_before_reloads as i64,
            "reloads": sizes.reloads_total,
            "generations_still_mapped": still_mapped,
        });
    }
    if let Ok(path) = std::env::var("BENCH_GATEWAY_LOG_TO") {
        // For finding where the time goes: `BENCH_GATEWAY_LOG=switchboard=trace`.
        std::fs::write(path, gateway.log_text())?;
    }
    gateway.stop().await?;

    // 6. Scale.
    if bench.args.wants("scale") {
        eprintln!("bench: scale");
        let mut scale = serde_json::Map::new();
        for &sessions in &sizes.session_counts {
            let mut point = bench_scale(&bench, sessions).await?;
            // What a session costs the gateway itself (its allocator, not this process's).
            let grown = point["gateway_rss_kib"].as_u64().unwrap_or(0).saturating_sub(rss_idle);
            point["gateway_bytes_per_session"] = json!((grown * 1024) as f64 / sessions as f64);
            scale.insert(sessions.to_string(), point);
        }
        results["scale"] = Value::Object(scale);
    }
    // 7. Matrix, against a real Synapse.
    match &bench.args.matrix_plugin {
        Some(plugin) if bench.args.wants("matrix") => {
            let (row, matrix_clean) =
                matrix::run(&bench.args.switchboard, plugin, sizes.matrix_messages, sizes.matrix_rooms).await?;
            clean &= matrix_clean;
            results["matrix"] = row;
        }
        _ => {}
    }
    results["clean"] = json!(clean);

    if let Some(dir) = bench.args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&bench.args.out, serde_json::to_string_pretty(&results)?)?;
    print_table(&results);
    eprintln!("bench: results in {}", bench.args.out.display());
    if !clean {
        bail!("messages were lost, duplicated or misrouted (see {})", bench.args.out.display());
    }
    Ok(())
}

/// `sessions` stored sessions: registry load, lookup and memory in-process; start-up, RSS and
/// swap pause (the handover of the registry to a new generation) with the real gateway.
async fn bench_scale(bench: &Bench, sessions: usize) -> Result<Value> {
    eprintln!("bench: scale {sessions}");
    let state_dir = bench.scratch.path().join(format!("state-{sessions}"));
    std::fs::create_dir_all(&state_dir)?;
    let store = Arc::new(Store::open(&state_dir, Durability::Normal)?);
    let now = switchboard::session::now_ms();
    let keys: Vec<String> = (0..sessions).map(|i| format!("agent:main:mattermost:channel:c{i:026}")).collect();
    for chunk in keys.chunks(50_000) {
        let batch: Vec<Session> = chunk
            .iter()
            .map(|key| Session {
                key: key.clone(),
                agent_id: "main".into(),
                target: DeliveryTarget {
                    channel_instance: "mattermost".into(),
                    conversation_id: key.rsplit(':').next().unwrap_or_default().into(),
                    thread_root_id: String::new(),
                },
                created_at_ms: now,
                last_active_ms: now,
            })
            .collect();
        store.insert_sessions(&batch)?;
    }
    let rss_before = rss_kib_of_self();
    let loading = Instant::now();
    let registry = DurableSessions::load(store.clone())?;
    let load_ms = loading.elapsed().as_secs_f64() * 1000.0;
    let bytes_per_session = (rss_kib_of_self().saturating_sub(rss_before) * 1024) as f64 / sessions as f64;
    let lookups = 200_000;
    let looking = Instant::now();
    let mut found = 0;
    for i in 0..lookups {
        let key = &keys[(i * 7919) % sessions];
        found += usize::from(registry.get(key).is_some());
    }
    let lookup_ns = looking.elapsed().as_nanos() as f64 / lookups as f64;
    if found != lookups {
        bail!("registry lookups failed");
    }
    drop(registry);
    drop(store);

    bench.reset_plugin_dir()?;
    let config = bench.write_config(&format!("scale-{sessions}.toml"), &state_dir)?;
    let opened_before = bench.sim.ws_connections_opened();
    let spawned = Instant::now();
    let gateway = bench.start_gateway(&config).await?;
    bench.wait_for_connection(opened_before).await?;
    if let Err(e) = bench.ask(&format!("scale-{sessions}")).await {
        let log = gateway.log();
        bail!("{e}\n--- gateway log (tail) ---\n{}", log[log.len().saturating_sub(30)..].join("\n"));
    }
    let start_up_ms = spawned.elapsed().as_secs_f64() * 1000.0;
    let rss = gateway.rss_kib().unwrap_or(0);
    for round in 1..=5 {
        bench.swap(round % 2 == 1, 10_000 + sessions + round).await?;
    }
    let pauses = swap_pauses(&gateway, "swap_pause_us").await?;
    gateway.stop().await?;
    Ok(json!({
        "registry_load_ms": load_ms,
        "lookup_ns": lookup_ns,
        "bytes_per_session_in_bench": bytes_per_session,
        "gateway_start_up_ms": start_up_ms,
        "gateway_rss_kib": rss,
        "swap_pause_us": latency_json(&pauses),
    }))
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name"))?.split(':').nth(1).map(|m| m.trim().to_string()))
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string()))
        .unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "memory_kib": memory,
        "os": std::env::consts::OS,
    })
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    println!(
        "\nswitchboard bench ({} mode) on {} × {}",
        r["mode"].as_str().unwrap_or(""),
        u(&r["machine"]["cpus"]),
        r["machine"]["cpu"].as_str().unwrap_or("")
    );
    println!("{:<58} {:>14} {:>14}", "", "gateway", "floor");
    for channels in ["1", "10", "100"] {
        let g = &r["throughput"][channels];
        println!(
            "{:<58} {:>14.0} {:>14.0}   ({:.0}% of floor; lost {} dup {} misrouted {})",
            format!("throughput, {channels} channel(s) (replies/s)"),
            f(&g["per_second"]),
            f(&r["floor"]["throughput"][channels]["per_second"]),
            f(&g["ratio_to_floor"]) * 100.0,
            u(&g["lost"]),
            u(&g["duplicated"]),
            u(&g["misrouted"]),
        );
    }
    if r["matrix"].is_object() {
        let (g, floor) = (&r["matrix"]["gateway"], &r["matrix"]["floor"]);
        println!(
            "{:<58} {:>14.0} {:>14.0}   ({:.0}% of floor; lost {} dup {} misrouted {})",
            format!("Matrix on Synapse, {} room(s) (replies/s)", u(&r["matrix"]["rooms"])),
            f(&g["per_second"]),
            f(&floor["per_second"]),
            f(&r["matrix"]["ratio_to_floor"]) * 100.0,
            u(&g["lost"]),
            u(&g["duplicated"]),
            u(&g["misrouted"]),
        );
        let cpu = |run: &Value, who: &str| f(&run["cpu_percent_of_one_core"][who]);
        println!(
            "{:<58} {:>14} {:>14}",
            "  CPU of one core: Synapse / gateway / bench process (%)",
            format!("{:.0}/{:.0}/{:.0}", cpu(g, "synapse"), cpu(g, "gateway"), cpu(g, "bench_process")),
            format!("{:.0}/-/{:.0}", cpu(floor, "synapse"), cpu(floor, "bench_process")),
        );
    }
    let spent = |run: &Value| {
        format!("{:.0} ({:.1})", f(&run["gateway_cpu_us_per_reply"]), f(&run["gateway_context_switches_per_reply"]))
    };
    for channels in ["1", "10", "100"] {
        let g = &r["throughput"][channels];
        println!(
            "{:<58} {:>14} {:>14.0}",
            format!("CPU per reply, {channels} ch: gateway µs (context switches) / bench µs"),
            spent(g),
            f(&g["bench_process_cpu_us_per_reply"]),
        );
    }
    let l = &r["latency"];
    println!(
        "{:<58} {:>14} {:>14}",
        format!("latency at {}/s, p50 / p99 / max (µs)", u(&l["rate_per_second"])),
        format!("{}/{}/{}", u(&l["gateway_us"]["p50"]), u(&l["gateway_us"]["p99"]), u(&l["gateway_us"]["max"])),
        format!("{}/{}/{}", u(&l["floor_us"]["p50"]), u(&l["floor_us"]["p99"]), u(&l["floor_us"]["max"])),
    );
    println!(
        "{:<58} {:>14}",
        "added latency p50 / p99 / max (µs)",
        format!("{}/{}/{}", l["added_us"]["p50"], l["added_us"]["p99"], l["added_us"]["max"])
    );
    let n = &r["latency_durability_normal"];
    if !n.is_null() {
        println!(
            "{:<58} {:>14}",
            "… with durability=normal (no sync before a reply)",
            format!("{}/{}/{}", n["added_us"]["p50"], n["added_us"]["p99"], n["added_us"]["max"])
        );
    }
    println!(
        "{:<58} {:>14}",
        format!("CPU per reply at {}/s: µs (context switches), full/normal", u(&l["rate_per_second"])),
        format!("{} / {}", spent(l), spent(n))
    );
    println!(
        "{:<58} {:>14}",
        "CPU stolen by the hypervisor: latency full/normal/floor, 100 ch (%)",
        format!(
            "{}/{}/{}, {}",
            l["cpu_stolen_percent"],
            n["cpu_stolen_percent"],
            r["floor"]["latency_cpu_stolen_percent"],
            r["throughput"]["100"]["cpu_stolen_percent"]
        )
    );
    let re = &r["reload"];
    println!(
        "{:<58} {:>14}",
        format!("swap pause over {} swaps under load, p50 / p99 (µs)", u(&re["swaps"])),
        format!("{}/{}", u(&re["swap_pause_us"]["p50"]), u(&re["swap_pause_us"]["p99"]))
    );
    println!(
        "{:<58} {:>14}",
        "… until that first batch was stored and acted on, p50 / p99 (µs)",
        format!("{}/{}", u(&re["swap_settled_us"]["p50"]), u(&re["swap_settled_us"]["p99"]))
    );
    println!(
        "{:<58} {:>14}",
        "file dropped → new build answering, p50 / p99 (ms)",
        format!("{}/{}", u(&re["file_to_answer_ms"]["p50"]), u(&re["file_to_answer_ms"]["p99"]))
    );
    println!(
        "{:<58} {:>14}",
        "lost / duplicated / misrouted during the swaps",
        format!("{}/{}/{}", u(&re["load"]["lost"]), u(&re["load"]["duplicated"]), u(&re["load"]["misrouted"]))
    );
    let m = &r["memory_kib"];
    println!(
        "{:<58} {:>14}",
        "RSS idle / under load (MiB)",
        format!("{:.1}/{:.1}", f(&m["idle"]) / 1024.0, f(&m["under_load"]) / 1024.0)
    );
    println!(
        "{:<58} {:>14}",
        format!("RSS before → after {} reloads (MiB); still mapped", u(&m["reloads"])),
        format!(
            "{:.1} → {:.1}; {}",
            f(&m["before_reloads"]) / 1024.0,
            f(&m["after_reloads"]) / 1024.0,
            u(&m["generations_still_mapped"])
        )
    );
    println!("{:<58} {:>14.0}", "start-up: process start → first reply (ms)", f(&r["start_up_ms"]));
    println!("{:<58} {:>14.1}", "idle, connected: gateway wake-ups per second", f(&r["idle_wakeups_per_s"]));
    if let Some(scale) = r["scale"].as_object() {
        for (sessions, s) in scale {
            println!(
                "{:<58} {:>14}",
                format!("{sessions} sessions: swap pause p50, lookup, gateway bytes/session"),
                format!(
                    "{} µs, {:.0} ns, {:.0} B",
                    u(&s["swap_pause_us"]["p50"]),
                    f(&s["lookup_ns"]),
                    f(&s["gateway_bytes_per_session"])
                )
            );
            println!(
                "{:<58} {:>14}",
                format!("{sessions} sessions: gateway start-up, RSS, registry load"),
                format!(
                    "{:.0} ms, {:.1} MiB, {:.0} ms",
                    f(&s["gateway_start_up_ms"]),
                    f(&s["gateway_rss_kib"]) / 1024.0,
                    f(&s["registry_load_ms"])
                )
            );
        }
    }
    // Which run it was, so a failure in CI can be told apart without the results file.
    let mut unclean = Vec::new();
    runs_with_losses(r, "", &mut unclean);
    for (run, counts) in unclean {
        println!("{:<58} {:>14}", format!("lost / duplicated / misrouted in {run}"), counts);
    }
    if u(&r["floor"]["posts_failed"]) > 0 {
        println!("{:<58} {:>14}", "floor client: replies given up after every retry", u(&r["floor"]["posts_failed"]));
    }
    println!("nothing lost, duplicated or misrouted: {}", r["clean"]);
}

/// Every load run in the results (by its path, e.g. `floor.latency`) that lost, duplicated or
/// misrouted anything, with those counts.
fn runs_with_losses(value: &Value, path: &str, found: &mut Vec<(String, String)>) {
    let Some(object) = value.as_object() else { return };
    let count = |key: &str| object.get(key).and_then(Value::as_u64);
    if let (Some(lost), Some(duplicated), Some(misrouted)) = (count("lost"), count("duplicated"), count("misrouted")) {
        if lost + duplicated + misrouted > 0 {
            let examples = object.get("examples").map(Value::to_string).unwrap_or_default();
            found.push((path.to_string(), format!("{lost}/{duplicated}/{misrouted} e.g. {examples}")));
        }
        return;
    }
    for (key, inner) in object {
        let inner_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        runs_with_losses(inner, &inner_path, found);
    }
}
