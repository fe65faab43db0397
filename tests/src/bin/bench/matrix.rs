//! The Matrix row of the bench: the real gateway with the Matrix `.so` against a real Synapse,
//! and a floor measured the same way in the same run.
//!
//! One Synapse, a bot, alice and bob, `rooms` private rooms of three (a room of two is a DM,
//! and DM sessions of one person share a lane). A burst of `messages` unique tokens from
//! alice, one sender task per room, counted from the first send until alice's own `/sync` has
//! seen every answer. The floor is a minimal bot in this process: `/sync` long-poll, then one
//! `PUT …/send` per message, all of a batch at once, no store, no agent. The gateway run
//! uses the same rooms and the same bot account after the floor has stopped. Both report
//! the CPU Synapse, the gateway and this process used during the run, which says where the
//! time goes; every answer is checked: once, in its own room.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use switchboard_tests::{
    harness::{cpu_ticks_of, install_plugin, Gateway},
    matrix::{matrix_seed_config, MatrixUser, Preset, Synapse, SyncResponse},
};

/// How long a burst may take before the run counts what it has.
const BURST_PATIENCE: Duration = Duration::from_secs(180);

/// What one burst saw.
struct Burst {
    elapsed: Duration,
    sent: usize,
    lost: usize,
    duplicated: usize,
    misrouted: usize,
    synapse_cpu_s: f64,
    gateway_cpu_s: f64,
    bench_cpu_s: f64,
}

impl Burst {
    fn per_second(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.misrouted == 0
    }

    fn json(&self) -> Value {
        let seconds = self.elapsed.as_secs_f64().max(1e-9);
        json!({
            "messages": self.sent,
            "seconds": seconds,
            "per_second": self.per_second(),
            "lost": self.lost,
            "duplicated": self.duplicated,
            "misrouted": self.misrouted,
            "cpu_percent_of_one_core": {
                "synapse": 100.0 * self.synapse_cpu_s / seconds,
                "gateway": 100.0 * self.gateway_cpu_s / seconds,
                "bench_process": 100.0 * self.bench_cpu_s / seconds,
            },
        })
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

fn own_cpu_ticks() -> u64 {
    cpu_ticks_of(std::process::id()).unwrap_or(0)
}

/// Run the Matrix row: `messages` over `rooms`, floor then gateway; the results and whether
/// both runs answered everything once, in its room.
pub async fn run(switchboard: &Path, plugin: &Path, messages: usize, rooms: usize) -> Result<(Value, bool)> {
    let synapse = Synapse::start().await.context("starting Synapse (cargo xtask real-servers synapse)")?;
    let bot = synapse.register("switchboard", false).await?;
    let alice = synapse.register("alice", false).await?;
    let bob = synapse.register("bob", false).await?;
    let mut room_ids = Vec::new();
    for _ in 0..rooms {
        let room = synapse.create_room(&alice, Preset::PrivateChat, &[&bot.user_id, &bob.user_id]).await?;
        synapse.join(&bob, &room).await?;
        synapse.join(&bot, &room).await?;
        room_ids.push(room);
    }

    eprintln!("bench: matrix floor ({messages} messages over {rooms} rooms)");
    let floor_task = tokio::spawn(floor_bot(synapse.base_url(), bot.clone(), alice.user_id.clone()));
    // The floor bot is syncing once its first (initial) sync is back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let floor = burst(&synapse, &alice, &bot, &room_ids, messages, "floor", None).await?;
    floor_task.abort();

    eprintln!("bench: matrix gateway");
    let workdir = tempfile::tempdir()?;
    let plugin_dir = workdir.path().join("plugins");
    install_plugin(plugin, &plugin_dir, plugin.file_name().and_then(|n| n.to_str()).unwrap_or("matrix.so"))?;
    let config_path = workdir.path().join("switchboard.toml");
    std::fs::write(
        &config_path,
        matrix_seed_config(&synapse.base_url(), &bot.user_id, &plugin_dir, "onmessage", "kind = \"echo\""),
    )?;
    let gateway =
        Gateway::start(switchboard, workdir.path(), &config_path, &[("MATRIX_ACCESS_TOKEN", &bot.access_token)])
            .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while gateway.count(&["first sync"]) == 0 {
        if Instant::now() > deadline {
            bail!("the Matrix adapter did not finish its first sync:\n{}", gateway.log_text());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its first long-poll is out once the first sync is handled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let through_gateway = burst(&synapse, &alice, &bot, &room_ids, messages, "gateway", Some(&gateway)).await?;
    gateway.stop().await?;
    synapse.stop().await?;

    let clean = floor.clean() && through_gateway.clean();
    let ratio = through_gateway.per_second() / floor.per_second().max(1e-9);
    Ok((
        json!({
            "rooms": rooms,
            "floor": floor.json(),
            "gateway": through_gateway.json(),
            "ratio_to_floor": ratio,
        }),
        clean,
    ))
}

/// Alice sends `messages` tokens over `rooms` (one sender per room, in order); wait until her
/// `/sync` has seen the bot answer each, or [`BURST_PATIENCE`]; count what went wrong.
async fn burst(
    synapse: &Synapse,
    alice: &MatrixUser,
    bot: &MatrixUser,
    rooms: &[String],
    messages: usize,
    label: &str,
    gateway: Option<&Gateway>,
) -> Result<Burst> {
    let mut since = synapse.sync(alice, None).await?.next_batch;
    let mut expected: HashMap<String, String> = HashMap::new();
    let mut per_room: Vec<Vec<String>> = vec![Vec::new(); rooms.len()];
    for i in 0..messages {
        let token = format!("{label}-{i}");
        expected.insert(format!("echo: {token}"), rooms[i % rooms.len()].clone());
        per_room[i % rooms.len()].push(token);
    }
    let cpu_before = (synapse.pid().and_then(cpu_ticks_of), gateway.and_then(Gateway::cpu_ticks), own_cpu_ticks());
    let started = Instant::now();
    let senders = rooms.iter().zip(per_room).map(|(room, tokens)| async move {
        for token in tokens {
            synapse.send_text(alice, room, &token).await?;
        }
        anyhow::Ok(())
    });
    let sending = futures_util::future::try_join_all(senders);
    let watching = async {
        // Every bot answer alice sees: its text → the rooms it appeared in.
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut answered = 0;
        while answered < messages && started.elapsed() < BURST_PATIENCE {
            let sync: SyncResponse = synapse.sync_wait(alice, Some(&since), Duration::from_millis(1000)).await?;
            for room in sync.joined_rooms() {
                for message in sync.texts(&room).into_iter().filter(|m| m.sender == bot.user_id) {
                    if expected.contains_key(&message.body) {
                        answered += usize::from(!seen.contains_key(&message.body));
                    }
                    seen.entry(message.body).or_default().push(room.clone());
                }
            }
            since = sync.next_batch;
        }
        anyhow::Ok((seen, started.elapsed()))
    };
    let (sent, watched) = tokio::join!(sending, watching);
    sent?;
    let (seen, elapsed) = watched?;
    let ticks = ticks_per_second();
    let used = |before: Option<u64>, after: Option<u64>| match (before, after) {
        (Some(before), Some(after)) => after.saturating_sub(before) as f64 / ticks,
        _ => 0.0,
    };
    let synapse_cpu_s = used(cpu_before.0, synapse.pid().and_then(cpu_ticks_of));
    let gateway_cpu_s = used(cpu_before.1, gateway.and_then(Gateway::cpu_ticks));
    let bench_cpu_s = used(Some(cpu_before.2), Some(own_cpu_ticks()));
    let (mut lost, mut duplicated, mut misrouted) = (0, 0, 0);
    for (answer, room) in &expected {
        match seen.get(answer) {
            None => lost += 1,
            Some(rooms_seen) => {
                duplicated += rooms_seen.len().saturating_sub(1);
                misrouted += rooms_seen.iter().filter(|r| *r != room).count();
            }
        }
    }
    Ok(Burst { elapsed, sent: messages, lost, duplicated, misrouted, synapse_cpu_s, gateway_cpu_s, bench_cpu_s })
}

/// The floor: a bot with no gateway. Each `/sync` batch's messages from `from` are answered
/// `echo: <body>` at once, one `PUT …/send` each, with the event id as the transaction id.
async fn floor_bot(base_url: String, bot: MatrixUser, from: String) -> Result<()> {
    let http = reqwest::Client::new();
    let sync_url = format!("{base_url}/_matrix/client/v3/sync");
    let first: Value =
        http.get(&sync_url).bearer_auth(&bot.access_token).query(&[("timeout", "0")]).send().await?.json().await?;
    let mut since = first["next_batch"].as_str().context("no next_batch")?.to_string();
    loop {
        let answer: Value = http
            .get(&sync_url)
            .bearer_auth(&bot.access_token)
            .query(&[("timeout", "30000"), ("since", since.as_str())])
            .send()
            .await?
            .json()
            .await?;
        let mut replies = Vec::new();
        for (room, joined) in answer["rooms"]["join"].as_object().into_iter().flatten() {
            for event in joined["timeline"]["events"].as_array().into_iter().flatten() {
                if event["type"] != "m.room.message" || event["sender"] != from.as_str() {
                    continue;
                }
                let (Some(body), Some(event_id)) = (event["content"]["body"].as_str(), event["event_id"].as_str())
                else {
                    continue;
                };
                let url = format!(
                    "{base_url}/_matrix/client/v3/rooms/{}/send/m.room.message/floor-{}",
                    urlencoding(room),
                    urlencoding(event_id)
                );
                let content = json!({"msgtype": "m.notice", "body": format!("echo: {body}")});
                let request = http.request(Method::PUT, url).bearer_auth(&bot.access_token).json(&content);
                replies.push(async move { request.send().await });
            }
        }
        for reply in futures_util::future::join_all(replies).await {
            if let Err(e) = reply {
                eprintln!("bench: the matrix floor bot could not answer: {e}");
            }
        }
        since = answer["next_batch"].as_str().context("no next_batch")?.to_string();
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
fn urlencoding(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
