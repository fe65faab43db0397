//! The Matrix adapter end to end: the real `switchboard` binary with the real matrix `.so`
//! against a real Synapse (`switchboard_tests::matrix`, one homeserver per test), the echo
//! agent answering `echo: <text>`. A message counts as answered once when exactly one bot
//! message `echo: <its text>` is in its own room (read back with `/messages`).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{json, Value};
use switchboard::session::session_key;
use switchboard_plugin_api::PeerKind;
use switchboard_tests::{
    assert_eventually,
    harness::{install_plugin, matrix_file_name, Artifacts, Gateway},
    matrix::{MatrixUser, Preset, Synapse},
};

use crate::rig::tail;

/// A Synapse with the bot, alice and bob, and a gateway directory that outlives gateway
/// processes (restarts, crashes, reloads).
struct MatrixRig {
    synapse: Synapse,
    bot: MatrixUser,
    alice: MatrixUser,
    bob: MatrixUser,
    artifacts: Artifacts,
    config_path: PathBuf,
    scratch: tempfile::TempDir,
}

impl MatrixRig {
    async fn new(chatmode: &str) -> Result<Self> {
        let artifacts = Artifacts::discover()?;
        let synapse = Synapse::start().await?;
        let bot = synapse.register("switchboard", false).await?;
        let alice = synapse.register("alice", false).await?;
        let bob = synapse.register("bob", false).await?;
        let scratch = tempfile::tempdir()?;
        install_plugin(&artifacts.matrix_plugin()?, &scratch.path().join("plugins"), &matrix_file_name())?;
        let rig =
            Self { config_path: scratch.path().join("switchboard.toml"), synapse, bot, alice, bob, artifacts, scratch };
        std::fs::write(&rig.config_path, rig.config(chatmode))?;
        Ok(rig)
    }

    fn plugin_dir(&self) -> PathBuf {
        self.scratch.path().join("plugins")
    }

    /// The gateway config: one `matrix` channel instance bound to the echo agent.
    fn config(&self, chatmode: &str) -> String {
        format!(
            r#"[gateway]
state_dir = "state"
admin_listen = "127.0.0.1:0"
max_concurrent_turns = 64

[plugins]
dir = "{plugins}"
settle_ms = 50

[channels.matrix]
plugin = "matrix"
thread_sessions = true
homeserver_url = "{homeserver}"
user_id = "{user_id}"
access_token_env = "MATRIX_ACCESS_TOKEN"
chatmode = "{chatmode}"
onchar_prefixes = [">", "!"]
dm_policy = "open"
group_policy = "open"
allow_from = []
rooms = []
auto_join = true

[agents.main]
kind = "echo"

[[bindings]]
channel = "matrix"
agent = "main"
"#,
            plugins = self.plugin_dir().display(),
            homeserver = self.synapse.base_url(),
            user_id = self.bot.user_id,
        )
    }

    /// Start the gateway and wait until the adapter has synced once in this process (after
    /// that, whatever is sent is after the sync position it holds).
    async fn start(&self) -> Result<Gateway> {
        let env = [("MATRIX_ACCESS_TOKEN", self.bot.access_token.as_str())];
        let gateway = Gateway::start(&self.artifacts.switchboard, self.scratch.path(), &self.config_path, &env).await?;
        assert_eventually!(
            @within Duration::from_secs(30),
            gateway.count(&["first sync: in"]) + gateway.count(&["resuming the sync from"]) > 0,
            "the adapter starts syncing\n--- gateway log ---\n{}",
            gateway.log_text()
        );
        Ok(gateway)
    }

    /// A room alice makes (`preset`) with the bot and `others` in it, joined through the API.
    async fn room(&self, preset: Preset, others: &[&MatrixUser]) -> Result<String> {
        let mut invite = vec![self.bot.user_id.as_str()];
        invite.extend(others.iter().map(|u| u.user_id.as_str()));
        let room = self.synapse.create_room(&self.alice, preset, &invite).await?;
        self.synapse.join(&self.bot, &room).await?;
        for user in others {
            self.synapse.join(user, &room).await?;
        }
        Ok(room)
    }

    /// `count` public rooms of alice's with the bot in them.
    async fn public_rooms(&self, count: usize) -> Result<Vec<String>> {
        let mut rooms = Vec::new();
        for _ in 0..count {
            rooms.push(self.room(Preset::PublicChat, &[]).await?);
        }
        Ok(rooms)
    }

    /// Send `content` as `user` (any `m.room.message` content: threads, mentions).
    async fn send(&self, user: &MatrixUser, room: &str, content: Value) -> Result<String> {
        static TXN: AtomicUsize = AtomicUsize::new(0);
        let txn = format!("e2e-{}", TXN.fetch_add(1, Ordering::Relaxed));
        let path = ["_matrix", "client", "v3", "rooms", room, "send", "m.room.message", &txn];
        let answer = self.synapse.api_ok(Method::PUT, Some(user), &path, &[], Some(&content)).await?;
        Ok(answer["event_id"].as_str().context("no event_id")?.to_string())
    }

    /// The bot's messages in `room`, oldest first.
    async fn bot_events(&self, room: &str) -> Result<Vec<Value>> {
        let events = self.synapse.room_events(&self.alice, room).await?;
        Ok(events
            .into_iter()
            .filter(|e| e["type"] == "m.room.message" && e["sender"] == self.bot.user_id.as_str())
            .collect())
    }

    /// For every bot message body in `rooms`, the rooms it appeared in (once per message).
    async fn bot_bodies(&self, rooms: &[String]) -> Result<BTreeMap<String, Vec<String>>> {
        let mut bodies: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for room in rooms {
            for event in self.bot_events(room).await? {
                let body = event["content"]["body"].as_str().unwrap_or_default().to_string();
                bodies.entry(body).or_default().push(room.clone());
            }
        }
        Ok(bodies)
    }

    /// Wait until the bot answered `echo: <text>` in `room`; the answer event.
    async fn answer_to(&self, room: &str, text: &str, gateway: &Gateway) -> Result<Value> {
        let wanted = format!("echo: {text}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) =
                self.bot_events(room).await?.into_iter().find(|e| e["content"]["body"] == wanted.as_str())
            {
                return Ok(found);
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} is not answered in {room}\n--- gateway log ---\n{}",
                tail(gateway, 60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every `(room, text)` answered `echo: <text>` exactly once, in its own room: counts of the
    /// messages not answered, answers beyond the first, and answers in another room.
    async fn answered_once(
        &self,
        expected: &[(String, String)],
        rooms: &[String],
        gateway: &Gateway,
    ) -> Result<(usize, usize, usize)> {
        let unanswered = |bodies: &BTreeMap<String, Vec<String>>| {
            expected.iter().filter(|(_, text)| !bodies.contains_key(&format!("echo: {text}"))).count()
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let bodies = self.bot_bodies(rooms).await?;
            if unanswered(&bodies) == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Duplicates would come late (a resend after a restart): give them time to show.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let bodies = self.bot_bodies(rooms).await?;
        let (mut lost, mut duplicated, mut misrouted) = (0, 0, 0);
        for (room, text) in expected {
            match bodies.get(&format!("echo: {text}")) {
                None => lost += 1,
                Some(places) => {
                    duplicated += places.len() - 1;
                    misrouted += places.iter().filter(|p| *p != room).count();
                }
            }
        }
        if lost + duplicated + misrouted > 0 {
            eprintln!("--- gateway log (tail) ---\n{}", tail(gateway, 80));
        }
        Ok((lost, duplicated, misrouted))
    }

    fn key(&self, kind: PeerKind, peer: &str, thread: Option<&str>) -> String {
        session_key("main", "matrix", kind, peer, thread)
    }
}

/// Post `<prefix>-<i>` round-robin over `rooms` as alice, every `every`, until `stop` is set
/// or `limit` are sent; everything sent goes into `sent` as (room, text).
async fn stream(
    rig: &MatrixRig,
    rooms: &[String],
    prefix: &str,
    every: Duration,
    limit: usize,
    stop: &AtomicBool,
    sent: &Mutex<Vec<(String, String)>>,
) -> Result<()> {
    let mut tick = tokio::time::interval(every);
    for i in 0..limit {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        tick.tick().await;
        let room = &rooms[i % rooms.len()];
        let text = format!("{prefix}-{i:04}");
        rig.send(&rig.alice, room, json!({"msgtype": "m.text", "body": text})).await?;
        sent.lock().unwrap().push((room.clone(), text));
    }
    Ok(())
}

/// A log line's session field: the key and the space after it (a key without its thread is a
/// prefix of the thread's key).
fn session_field(key: &str) -> String {
    format!("session={key} ")
}

fn text(body: &str) -> Value {
    json!({"msgtype": "m.text", "body": body})
}

/// A chatmode reload by SIGUSR1 is a warm handover: the `/sync` in flight is taken over by the
/// new generation, every reply stays in its room and session, and what was sent while the
/// reload went on is answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_chatmode_reload_keeps_rooms_sessions_and_the_sync() -> Result<()> {
    let rig = MatrixRig::new("oncall").await?;
    let ops = rig.room(Preset::PublicChat, &[]).await?;
    let team = rig.room(Preset::PrivateChat, &[&rig.bob]).await?;
    let gateway = rig.start().await?;
    let ops_key = rig.key(PeerKind::Channel, &ops, None);
    let team_key = rig.key(PeerKind::Group, &team, None);

    rig.send(&rig.alice, &ops, text("@switchboard:localhost what is the plan?")).await?;
    rig.send(&rig.alice, &ops, text("just chatting, no mention")).await?;
    rig.send(
        &rig.alice,
        &ops,
        json!({"msgtype": "m.text", "body": "Switchboard: still there?",
        "m.mentions": {"user_ids": [rig.bot.user_id]}}),
    )
    .await?;
    rig.answer_to(&ops, "what is the plan?", &gateway).await?;
    rig.answer_to(&ops, "still there?", &gateway).await?;
    rig.send(&rig.bob, &team, text("switchboard: morning")).await?;
    rig.answer_to(&team, "morning", &gateway).await?;
    assert!(
        rig.bot_bodies(std::slice::from_ref(&ops)).await?.keys().all(|b| !b.contains("no mention")),
        "oncall answered a plain message"
    );

    // Reload to onmessage while mentions keep coming in both rooms.
    let stop = AtomicBool::new(false);
    let sent = Mutex::new(Vec::new());
    let rooms = [ops.clone(), team.clone()];
    let reload = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        gateway.reload_with(&rig.config("onmessage"))?;
        assert_eventually!(
            gateway.count(&["generation started", "generation=2"]) == 1,
            "generation 2 starts after SIGUSR1\n{}",
            tail(&gateway, 40)
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
        stop.store(true, Ordering::SeqCst);
        anyhow::Ok(())
    };
    let during = stream(&rig, &rooms, "@switchboard:localhost during", Duration::from_millis(40), 200, &stop, &sent);
    let (streamed, reloaded) = tokio::join!(during, reload);
    streamed?;
    reloaded?;
    assert!(
        gateway.count(&["takes over the sync in flight"]) >= 1,
        "the new generation adopted the sync:\n{}",
        tail(&gateway, 40)
    );
    let during: Vec<(String, String)> = sent
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|(room, text)| (room, text.trim_start_matches("@switchboard:localhost ").to_string()))
        .collect();
    // After the reload a plain message is answered.
    rig.send(&rig.alice, &ops, text("no mention after the reload")).await?;
    rig.answer_to(&ops, "no mention after the reload", &gateway).await?;
    rig.send(&rig.bob, &team, text("also no mention here")).await?;
    rig.answer_to(&team, "also no mention here", &gateway).await?;

    let mut expected = during.clone();
    expected.extend([
        (ops.clone(), "what is the plan?".to_string()),
        (ops.clone(), "still there?".to_string()),
        (team.clone(), "morning".to_string()),
        (ops.clone(), "no mention after the reload".to_string()),
        (team.clone(), "also no mention here".to_string()),
    ]);
    let (lost, duplicated, misrouted) = rig.answered_once(&expected, &rooms, &gateway).await?;
    eprintln!(
        "matrix reload: {} messages during the reload, lost {lost}, duplicated {duplicated}, misrouted {misrouted}",
        during.len()
    );
    assert_eq!((lost, duplicated, misrouted), (0, 0, 0));
    let bot_total: usize = rig.bot_bodies(&rooms).await?.values().map(Vec::len).sum();
    assert_eq!(bot_total, expected.len(), "one reply per question, nothing else");

    // Each room stayed in its session, before and after the reload.
    let inbound_in = |key: &str| gateway.count(&["inbound", &session_field(key)]);
    assert_eq!(inbound_in(&ops_key), expected.iter().filter(|(r, _)| *r == ops).count(), "{ops_key}");
    assert_eq!(inbound_in(&team_key), expected.iter().filter(|(r, _)| *r == team).count(), "{team_key}");
    // One first sync ever: the reload resumed the position instead of starting over.
    assert_eq!(rig.synapse.access_lines(&["GET /_matrix/client/v3/sync?timeout=0"]).len(), 1);
    let status = gateway.stop().await?;
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    Ok(())
}

/// A DM (auto-joined from an `is_direct` invite) is answered in the DM without a mention; a
/// message in a thread is answered in that thread; each has its own session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_dms_and_threads_are_answered_where_they_were_asked() -> Result<()> {
    let rig = MatrixRig::new("oncall").await?;
    let group = rig.room(Preset::PrivateChat, &[&rig.bob]).await?;
    let gateway = rig.start().await?;

    let created = json!({"preset": "trusted_private_chat", "is_direct": true, "invite": [rig.bot.user_id]});
    let answer = rig
        .synapse
        .api_ok(Method::POST, Some(&rig.alice), &["_matrix", "client", "v3", "createRoom"], &[], Some(&created))
        .await?;
    let dm = answer["room_id"].as_str().context("a DM room id")?.to_string();
    assert_eventually!(
        gateway.count(&["joined", &dm]) == 1,
        "the adapter accepts the DM invite\n{}",
        tail(&gateway, 40)
    );
    rig.send(&rig.alice, &dm, text("hello in private")).await?;
    let reply = rig.answer_to(&dm, "hello in private", &gateway).await?;
    assert!(reply["content"].get("m.relates_to").is_none(), "a top-level answer: {reply}");
    assert_eq!(reply["content"]["msgtype"], "m.notice");
    // The host keys a DM session by the person (it follows them); the reply went to the room.
    let dm_key = rig.key(PeerKind::Dm, &rig.alice.user_id, None);
    assert_eventually!(
        gateway.count(&["inbound", &session_field(&dm_key)]) == 1,
        "DM under {dm_key}\n{}",
        tail(&gateway, 40)
    );
    assert_eventually!(
        gateway.count(&[&format!("delivered reply to channel:{dm}"), &session_field(&dm_key)]) == 1,
        "the DM reply went to the DM room under {dm_key}"
    );

    let root = rig.send(&rig.bob, &group, text("a thread about the release")).await?;
    let in_thread = rig
        .send(
            &rig.alice,
            &group,
            json!({"msgtype": "m.text", "body": "@switchboard:localhost summarise please",
                   "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": true,
                                    "m.in_reply_to": {"event_id": root}}}),
        )
        .await?;
    let reply = rig.answer_to(&group, "summarise please", &gateway).await?;
    let relation = &reply["content"]["m.relates_to"];
    assert_eq!(relation["rel_type"], "m.thread");
    assert_eq!(relation["event_id"], root.as_str(), "the answer is in the thread");
    assert_eq!(relation["m.in_reply_to"]["event_id"], in_thread.as_str(), "pointing at the question");
    rig.send(&rig.alice, &group, text("@switchboard:localhost top level")).await?;
    let top = rig.answer_to(&group, "top level", &gateway).await?;
    assert!(top["content"].get("m.relates_to").is_none());

    let thread_key = rig.key(PeerKind::Group, &group, Some(&root));
    let group_key = rig.key(PeerKind::Group, &group, None);
    assert_eventually!(gateway.count(&["inbound", &session_field(&thread_key)]) == 1, "thread under {thread_key}");
    assert_eventually!(gateway.count(&["inbound", &session_field(&group_key)]) == 1, "top level under {group_key}");
    assert_eq!(gateway.count(&["inbound", &session_field(&dm_key)]), 1);
    assert!(
        !rig.bot_bodies(std::slice::from_ref(&group)).await?.contains_key("echo: a thread about the release"),
        "oncall"
    );
    Ok(())
}

/// Rooms the bot is invited to while it runs take their kind from the room: a public one is a
/// channel, one with three members a group. A person who writes from two rooms of two (each a
/// DM by its member count, so one session keyed by the person) is answered in each room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_rooms_joined_while_running_keep_their_kind_and_replies_stay_in_their_room() -> Result<()> {
    let rig = MatrixRig::new("onmessage").await?;
    let gateway = rig.start().await?;
    let three = [rig.bot.user_id.as_str(), rig.bob.user_id.as_str()];
    let public = rig.synapse.create_room(&rig.alice, Preset::PublicChat, &three).await?;
    let private = rig.synapse.create_room(&rig.alice, Preset::PrivateChat, &three).await?;
    let first_pair = rig.synapse.create_room(&rig.alice, Preset::PrivateChat, &[&rig.bot.user_id]).await?;
    let second_pair = rig.synapse.create_room(&rig.alice, Preset::PrivateChat, &[&rig.bot.user_id]).await?;
    for room in [&public, &private] {
        rig.synapse.join(&rig.bob, room).await?;
    }
    for room in [&public, &private, &first_pair, &second_pair] {
        assert_eventually!(
            gateway.count(&["joined", room]) == 1,
            "the bot joins {room}
{}",
            tail(&gateway, 40)
        );
    }

    for (room, said) in [(&public, "in the public room"), (&private, "in the private room")] {
        rig.send(&rig.alice, room, text(said)).await?;
        rig.answer_to(room, said, &gateway).await?;
    }
    let channel_key = rig.key(PeerKind::Channel, &public, None);
    let group_key = rig.key(PeerKind::Group, &private, None);
    assert_eventually!(
        gateway.count(&["inbound", &session_field(&channel_key)]) == 1,
        "a public room is a channel: {channel_key}
{}",
        tail(&gateway, 40)
    );
    assert_eventually!(gateway.count(&["inbound", &session_field(&group_key)]) == 1, "a room of three is a group");

    for (room, said) in [(&first_pair, "from the first pair"), (&second_pair, "from the second pair")] {
        rig.send(&rig.alice, room, text(said)).await?;
        rig.answer_to(room, said, &gateway).await?;
    }
    let dm_key = rig.key(PeerKind::Dm, &rig.alice.user_id, None);
    assert_eventually!(gateway.count(&["inbound", &session_field(&dm_key)]) == 2, "both under {dm_key}");
    let rooms = [public.clone(), private.clone(), first_pair.clone(), second_pair.clone()];
    let bodies = rig.bot_bodies(&rooms).await?;
    assert_eq!(bodies["echo: from the first pair"], vec![first_pair.clone()], "answered in its own room");
    assert_eq!(bodies["echo: from the second pair"], vec![second_pair.clone()], "not in the session's first room");
    Ok(())
}

/// `kill -9` mid-stream: 200 messages over 10 rooms, the gateway killed after about a third
/// and started again; every message is answered exactly once, in its own room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_kill_9_mid_stream_loses_and_duplicates_nothing() -> Result<()> {
    let rig = MatrixRig::new("onmessage").await?;
    let rooms = rig.public_rooms(10).await?;
    let gateway = rig.start().await?;
    let started = Instant::now();
    let stop = AtomicBool::new(false);
    let sent = Mutex::new(Vec::new());
    let crash = async {
        while sent.lock().unwrap().len() < 70 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let answered_before: usize = rig.bot_bodies(&rooms).await?.values().map(Vec::len).sum();
        gateway.kill_hard()?;
        let restarted = rig.start().await?;
        anyhow::Ok((answered_before, restarted))
    };
    let (streamed, crashed) =
        tokio::join!(stream(&rig, &rooms, "crash", Duration::from_millis(15), 200, &stop, &sent), crash);
    streamed?;
    let (answered_before, gateway) = crashed?;
    let expected = sent.into_inner().unwrap();
    assert_eq!(expected.len(), 200);
    assert!(answered_before > 0 && answered_before < 200, "killed mid-stream ({answered_before} answered before)");
    let (lost, duplicated, misrouted) = rig.answered_once(&expected, &rooms, &gateway).await?;
    let total: usize = rig.bot_bodies(&rooms).await?.values().map(Vec::len).sum();
    eprintln!(
        "matrix kill -9: 200 messages over 10 rooms, {answered_before} answered before the kill; lost {lost}, \
         duplicated {duplicated}, misrouted {misrouted}; {total} replies; {:?} in all",
        started.elapsed()
    );
    assert_eq!((lost, duplicated, misrouted), (0, 0, 0));
    assert_eq!(total, 200, "200 messages, 200 replies");
    Ok(())
}

/// Builds of the matrix adapter dropped into the plugin directory under load: each swap hands
/// the `/sync` in flight to the new generation; nothing is lost, answered twice or misrouted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_live_swaps_under_load_lose_duplicate_and_misroute_nothing() -> Result<()> {
    let rig = MatrixRig::new("onmessage").await?;
    let rooms = rig.public_rooms(5).await?;
    let gateway = rig.start().await?;
    let build = std::fs::read(rig.artifacts.matrix_plugin()?)?;
    let stop = AtomicBool::new(false);
    let sent = Mutex::new(Vec::new());
    const SWAPS: u64 = 10;
    let swaps = async {
        let mut took = Vec::new();
        for round in 1..=SWAPS {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // Another build: the same library with bytes after its end (the host swaps by
            // content; the loader ignores what follows the ELF's sections).
            let staged = rig.scratch.path().join(format!("build-{round}.so"));
            let mut bytes = build.clone();
            bytes.extend_from_slice(format!("\nswap round {round}\n").as_bytes());
            std::fs::write(&staged, bytes)?;
            let dropped = Instant::now();
            install_plugin(&staged, &rig.plugin_dir(), &matrix_file_name())?;
            assert_eventually!(
                @within Duration::from_secs(30),
                gateway.count(&["generation started", &format!("generation={}", round + 1)]) == 1,
                "swap {round} takes effect\n{}",
                tail(&gateway, 40)
            );
            took.push(dropped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, Ordering::SeqCst);
        anyhow::Ok(took)
    };
    // Two senders at once, so swaps meet syncs that carry messages.
    let (streamed_a, streamed_b, took) = tokio::join!(
        stream(&rig, &rooms, "swap-a", Duration::from_millis(20), 100_000, &stop, &sent),
        stream(&rig, &rooms[1..], "swap-b", Duration::from_millis(20), 100_000, &stop, &sent),
        swaps
    );
    streamed_a?;
    streamed_b?;
    let took = took?;
    let expected = sent.into_inner().unwrap();
    let (lost, duplicated, misrouted) = rig.answered_once(&expected, &rooms, &gateway).await?;
    let total: usize = rig.bot_bodies(&rooms).await?.values().map(Vec::len).sum();
    eprintln!(
        "matrix live swap: {} messages over {} rooms, {SWAPS} swaps (file dropped → generation started: {:?}); \
         lost {lost}, duplicated {duplicated}, misrouted {misrouted}",
        expected.len(),
        rooms.len(),
        took
    );
    assert_eq!((lost, duplicated, misrouted), (0, 0, 0));
    assert_eq!(total, expected.len(), "one reply per message, no strays");
    assert_eq!(gateway.count(&["generation started"]), SWAPS as usize + 1);
    assert!(gateway.count(&["takes over the sync in flight"]) >= 1, "{}", tail(&gateway, 40));
    assert_eq!(rig.synapse.access_lines(&["GET /_matrix/client/v3/sync?timeout=0"]).len(), 1, "one first sync ever");
    Ok(())
}

/// A restart (SIGTERM, start again) resumes from the saved `since`: what was sent while the
/// gateway was down (more than one sync carries) is answered once, and what was answered
/// before is not answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_restart_resumes_from_the_saved_since() -> Result<()> {
    let rig = MatrixRig::new("onmessage").await?;
    let room = rig.room(Preset::PublicChat, &[]).await?;
    // History from before the first start is not answered.
    rig.send(&rig.alice, &room, text("history before the bot ran")).await?;
    let gateway = rig.start().await?;
    rig.send(&rig.alice, &room, text("before the restart")).await?;
    rig.answer_to(&room, "before the restart", &gateway).await?;
    let status = gateway.stop().await?;
    assert!(status.success(), "clean exit after SIGTERM: {status}");

    // More than one sync carries for a room (its timeline limit is 100): the rest is fetched
    // from /messages before the position moves.
    let down: Vec<(String, String)> = (0..130).map(|i| (room.clone(), format!("while down {i}"))).collect();
    for (room, body) in &down {
        rig.send(&rig.alice, room, text(body)).await?;
    }
    let gateway = rig.start().await?;
    let resumed_from = gateway
        .lines_with(&["resuming the sync from"])
        .first()
        .and_then(|line| line.split("resuming the sync from ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or_default().trim_matches('"').to_string())
        .context("the restart says where it resumes")?;
    let mut expected = down.clone();
    expected.push((room.clone(), "before the restart".to_string()));
    let rooms = [room.clone()];
    let (lost, duplicated, misrouted) = rig.answered_once(&expected, &rooms, &gateway).await?;
    assert_eq!((lost, duplicated, misrouted), (0, 0, 0));
    let bodies = rig.bot_bodies(&rooms).await?;
    assert!(!bodies.contains_key("echo: history before the bot ran"), "history was answered: {bodies:?}");
    assert_eq!(bodies.values().map(Vec::len).sum::<usize>(), down.len() + 1);
    assert_eq!(gateway.count(&["had more new events than one sync carries"]), 1, "{}", tail(&gateway, 30));
    // The server saw the resumed position asked for, and only one first sync ever.
    let encoded: String = resumed_from
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    assert!(
        !rig.synapse.access_lines(&["GET /_matrix/client/v3/sync?", &format!("since={encoded}")]).is_empty(),
        "a sync from {resumed_from}:\n{}",
        rig.synapse.log_tail(20)
    );
    assert_eq!(rig.synapse.access_lines(&["GET /_matrix/client/v3/sync?timeout=0"]).len(), 1);
    eprintln!("matrix restart: resumed from {resumed_from}; {} sent while down, each answered once", down.len());
    gateway.stop().await?;
    Ok(())
}
