//! The adapter through the shared conformance harness (in-process, through the guarded ABI
//! wrapper), then its Mattermost protocol behaviour event by event.

mod common;

use common::{config, host, signed_in, BOT, TOKEN};
use serde_json::{json, Value};
use switchboard_mattermost::MattermostAdapter;
use switchboard_plugin_api::{
    conformance::{check_contract, opened_connections, Harness, TestHost},
    Action, Event, Handover, Header, OutboundReply, PeerKind, ReplyTarget,
};

fn posted(
    post_id: &str,
    user: &str,
    channel: &str,
    kind: &str,
    message: &str,
    root: &str,
    mentions_bot: bool,
) -> Event {
    let post = json!({"id": post_id, "user_id": user, "channel_id": channel, "root_id": root, "message": message,
                      "type": "", "create_at": 1});
    let mut data = json!({"post": post.to_string(), "channel_type": kind, "sender_name": "@alice",
                          "channel_name": "town-square", "team_id": ""});
    if mentions_bot {
        data["mentions"] = json!(json!([BOT]).to_string());
    }
    Event::WsFrame {
        conn: 1,
        text: json!({"event": "posted", "data": data, "broadcast": {}, "seq": 1}).to_string().into(),
    }
}

fn inbound(actions: &[Action]) -> Vec<(String, PeerKind, String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Inbound(m) => {
                Some((m.text.to_string(), m.peer_kind, m.peer_id.to_string(), m.thread_root_id.to_string()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn keeps_the_adapter_contract() {
    let bad = [
        (r#"{"bot_token_env":"MM_BOT_TOKEN"}"#, "base_url"),
        (r#"{"base_url":"http://x","bot_token_env":"MM_BOT_TOKEN","chatmode":"sometimes"}"#, "chatmode"),
        (r#"{"base_url":"http://x","bot_token_env":"MM_BOT_TOKEN","onchar_prefixes":[">",""]}"#, "onchar_prefixes[1]"),
        (r#"{"base_url":"http://x","bot_token_env":"MM_BOT_TOKEN","colour":"blue"}"#, "colour"),
        (r#"{"base_url":"http://x","bot_token_env":"MM_BOT_TOKEN","max_post_chars":20000}"#, "max_post_chars"),
        (r#"{"base_url":"http://x","bot_token_env":"MM_BOT_TOKEN","dm_policy":"allowlist"}"#, "allow_from"),
    ];
    check_contract::<MattermostAdapter>(host(), &config("oncall"), &bad).unwrap();
}

#[test]
fn connects_with_a_bearer_header_and_resume_parameters() {
    let (_, actions) = Harness::start::<MattermostAdapter>(host(), &config("oncall")).unwrap();
    let Some(Action::WsOpen { url, headers, .. }) = actions.iter().find(|a| matches!(a, Action::WsOpen { .. })) else {
        panic!("no WsOpen in {actions:?}")
    };
    assert_eq!(url.as_str(), "ws://127.0.0.1:8065/api/v4/websocket?connection_id=&sequence_number=0");
    assert!(headers.contains(&Header { name: "Authorization".into(), value: format!("Bearer {TOKEN}").into() }));
}

#[test]
fn chatmodes_decide_what_is_answered_and_mentions_are_stripped() {
    let mut oncall = signed_in("oncall");
    let actions = oncall.feed(posted("p1", "alice", "c1", "O", "@switchboard-bot hello", "", true)).unwrap();
    assert_eq!(inbound(&actions), vec![("hello".to_string(), PeerKind::Channel, "c1".to_string(), String::new())]);
    let mut next = posted("p2", "alice", "c1", "O", "no mention", "", false);
    if let Event::WsFrame { text, .. } = &mut next {
        *text = text.replace("\"seq\":1", "\"seq\":2").into();
    }
    assert!(inbound(&oncall.feed(next).unwrap()).is_empty());

    let mut onmessage = signed_in("onmessage");
    assert_eq!(
        inbound(&onmessage.feed(posted("p3", "alice", "c1", "O", "no mention", "r1", false)).unwrap())[0].3,
        "r1"
    );

    let mut onchar = signed_in("onchar");
    assert_eq!(inbound(&onchar.feed(posted("p4", "alice", "c1", "O", "> do it", "", false)).unwrap())[0].0, "do it");
}

#[test]
fn own_posts_and_repeats_are_ignored_and_dms_are_always_answered() {
    let mut harness = signed_in("oncall");
    assert!(inbound(&harness.feed(posted("p1", BOT, "c1", "O", "@switchboard-bot me", "", true)).unwrap()).is_empty());
    let mut harness = signed_in("oncall");
    let dm = inbound(&harness.feed(posted("p2", "alice", "d1", "D", "hi there", "", true)).unwrap());
    assert_eq!(dm, vec![("hi there".to_string(), PeerKind::Dm, "d1".to_string(), String::new())]);
}

#[test]
fn a_seq_gap_closes_with_4001_and_reconnects_with_resume_parameters() {
    let mut harness = signed_in("onmessage");
    let gap = json!({"event": "posted", "data": {}, "broadcast": {}, "seq": 5});
    let actions = harness.feed(Event::WsFrame { conn: 1, text: gap.to_string().into() }).unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::WsClose { conn: 1, code: 4001, .. })), "{actions:?}");
    let actions = harness.feed(Event::WsClosed { conn: 1, code: 4001, reason: "".into() }).unwrap();
    let timer = actions
        .iter()
        .find_map(|a| match a {
            Action::SetTimer { timer, .. } => Some(*timer),
            _ => None,
        })
        .expect("a reconnect timer");
    let actions = harness.feed(Event::TimerFired { timer }).unwrap();
    let opened = opened_connections(&actions);
    assert_eq!(opened.len(), 1);
    assert!(opened[0].url.as_str().ends_with("?connection_id=conn1&sequence_number=1"), "{}", opened[0].url);
}

fn posts(actions: &[Action]) -> Vec<(u64, Value)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::HttpRequest { request, url, body, .. } if url.ends_with("/api/v4/posts") => {
                Some((*request, serde_json::from_str(body.as_str()).unwrap()))
            }
            _ => None,
        })
        .collect()
}

fn reply(text: &str, root: &str) -> Event {
    Event::DeliverReply(OutboundReply {
        reply_id: 7,
        session_key: "agent:main:mattermost:channel:c1".into(),
        target: ReplyTarget::new("c1", root),
        text: text.into(),
    })
}

fn created(request: u64, id: &str) -> Event {
    Event::HttpResponse {
        request,
        status: 201,
        headers: Default::default(),
        body: json!({"id": id}).to_string().into(),
    }
}

#[test]
fn long_replies_go_out_in_order_in_the_thread_and_429_is_retried() {
    let mut harness = signed_in("oncall");
    let text = format!("{}\n\n{}", "a".repeat(16000), "b".repeat(16000));
    let sent = posts(&harness.feed(reply(&text, "root1")).unwrap());
    assert_eq!(sent.len(), 1, "one part at a time");
    assert_eq!(sent[0].1["root_id"], "root1");
    assert_eq!(sent[0].1["message"].as_str().unwrap().len(), 16000);

    let limited = Event::HttpResponse {
        request: sent[0].0,
        status: 429,
        headers: vec![Header { name: "Retry-After".into(), value: "2".into() }].into(),
        body: "limit exceeded\n".into(),
    };
    let actions = harness.feed(limited).unwrap();
    let Some(Action::SetTimer { timer, after_ms }) = actions.iter().find(|a| matches!(a, Action::SetTimer { .. }))
    else {
        panic!("no retry timer: {actions:?}")
    };
    assert!((2000..2250).contains(after_ms), "Retry-After 2 s, plus a little jitter: {after_ms}");
    harness.host.advance(*after_ms as i64);
    let retried = posts(&harness.feed(Event::TimerFired { timer: *timer }).unwrap());
    assert_eq!(
        retried[0].1["pending_post_id"], sent[0].1["pending_post_id"],
        "a retry is recognisable as the same post"
    );

    let second = posts(&harness.feed(created(retried[0].0, "post-a")).unwrap());
    assert_eq!(second[0].1["message"].as_str().unwrap(), "b".repeat(16000));
    let done = harness.feed(created(second[0].0, "post-b")).unwrap();
    assert!(done.iter().any(|a| matches!(a, Action::ReplyDelivered { reply_id: 7, platform_message_id } if platform_message_id.as_str() == "post-a")));
}

#[test]
fn a_handover_mid_delivery_finishes_the_reply_on_the_same_connection() {
    let mut first = signed_in("oncall");
    let sent = posts(&first.feed(reply("hello", "")).unwrap());
    let host = first.host.clone();
    let (state, shutdown) = first.hand_over().unwrap();
    assert!(shutdown.iter().all(|a| !matches!(a, Action::WsClose { .. })));
    let handover = Handover {
        generation: 2,
        previous_state: Some(state).into(),
        connections: vec![switchboard_plugin_api::OpenConnection { conn: 1, url: "ws://x".into() }].into(),
        cold: false,
    };
    let (mut second, started) = Harness::start_with::<MattermostAdapter>(host, &config("onmessage"), handover).unwrap();
    assert!(opened_connections(&started).is_empty(), "generation 2 adopts the socket");
    // The response to generation 1's request reaches generation 2, which completes the reply.
    let done = second.feed(created(sent[0].0, "post-1")).unwrap();
    assert!(done.iter().any(|a| matches!(a, Action::ReplyDelivered { reply_id: 7, .. })), "{done:?}");
    // And the new chatmode applies, on the same seq stream.
    let next = posted("p9", "alice", "c1", "O", "unmentioned", "", false);
    assert_eq!(inbound(&second.feed(next).unwrap()).len(), 1);
}

#[test]
fn the_token_never_appears_in_a_log() {
    let mut harness = signed_in("oncall");
    let mut actions = harness.feed(posted("p1", "alice", "c1", "O", "not for the bot", "", false)).unwrap();
    actions.extend(harness.feed(Event::WsFrame { conn: 1, text: "garbage".into() }).unwrap());
    actions.extend(harness.feed(Event::WsClosed { conn: 1, code: 1006, reason: "gone".into() }).unwrap());
    let logs: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Log { message, .. } => Some(message.to_string()),
            _ => None,
        })
        .collect();
    assert!(logs.len() >= 2, "{logs:?}");
    assert!(logs.iter().all(|line| !line.contains(TOKEN)), "{logs:?}");
}

fn gets(actions: &[Action], path_contains: &str) -> Vec<(u64, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::HttpRequest { request, method, url, .. } if method == "GET" && url.contains(path_contains) => {
                Some((*request, url.to_string()))
            }
            _ => None,
        })
        .collect()
}

fn restart_cold(state: switchboard_plugin_api::StateBlob, host: TestHost) -> (Harness, Vec<Action>) {
    let handover =
        Handover { generation: 1, previous_state: Some(state).into(), connections: vec![].into(), cold: true };
    Harness::start_with::<MattermostAdapter>(host, &config("onmessage"), handover).unwrap()
}

#[test]
fn after_a_crash_a_reply_that_may_have_gone_out_is_looked_for_before_it_is_sent_again() {
    let mut first = signed_in("onmessage");
    let text = format!("{}\n\n{}", "a".repeat(16300), "b".repeat(100));
    let sent = posts(&first.feed(reply(&text, "")).unwrap());
    let mark = sent[0].1["props"]["switchboard_reply"].as_str().unwrap_or_default().to_string();
    // bot : nonce of this gateway's state : reply id : part
    let fields: Vec<&str> = mark.split(':').collect();
    assert!(fields.len() == 4 && fields[0] == BOT && !fields[1].is_empty() && fields[2..] == ["7", "0"], "{mark}");
    assert_eq!(sent[0].1["pending_post_id"], mark.as_str(), "the mark is also the pending_post_id");
    // The process dies with part 0 in flight; the state stored after that batch is what remains.
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let url = started.iter().find_map(|a| match a {
        Action::WsOpen { url, .. } => Some(url.to_string()),
        _ => None,
    });
    assert!(url.unwrap().contains("connection_id=conn1&sequence_number=1"), "resumes where it was");
    assert!(posts(&started).is_empty(), "nothing is posted before looking");
    let (look, look_url) = gets(&started, "/channels/c1/posts?since=").pop().expect("a look at the channel");
    assert!(look_url.contains("since="), "{look_url}");
    // Part 0 did reach the server: it is found by its mark and not sent again.
    let found = json!({"order": ["x1"], "posts": {"x1": {"id": "x1", "user_id": BOT, "channel_id": "c1",
        "message": "a", "props": {"switchboard_reply": mark}, "create_at": 5}}});
    let actions = second
        .feed(Event::HttpResponse {
            request: look,
            status: 200,
            headers: Default::default(),
            body: found.to_string().into(),
        })
        .unwrap();
    let next = posts(&actions);
    assert_eq!(next.len(), 1, "{actions:?}");
    assert_eq!(next[0].1["message"], "b".repeat(100), "only the missing part goes out");
    let done = second.feed(created(next[0].0, "x2")).unwrap();
    assert!(
        done.iter().any(
            |a| matches!(a, Action::ReplyDelivered { reply_id: 7, platform_message_id } if platform_message_id == "x1")
        ),
        "{done:?}"
    );
    // The host hands the same reply again (it was queued): nothing more is sent.
    assert!(posts(&second.feed(reply(&text, "")).unwrap()).len() == 1, "an unknown id is a new delivery");
}

fn answer(harness: &mut Harness, request: u64, status: u16, body: Value) -> Vec<Action> {
    harness
        .feed(Event::HttpResponse { request, status, headers: Default::default(), body: body.to_string().into() })
        .unwrap()
}

fn post_json(id: &str, user: &str, channel: &str, message: &str, create_at: i64) -> Value {
    json!({"id": id, "user_id": user, "channel_id": channel, "root_id": "", "message": message, "type": "",
           "create_at": create_at, "update_at": create_at, "delete_at": 0, "props": {}})
}

fn live_post(post: &Value, kind: &str, seq: i64) -> Event {
    let frame = json!({"event": "posted", "data": {"post": post.to_string(), "channel_type": kind,
        "sender_name": "@alice"}, "broadcast": {}, "seq": seq});
    Event::WsFrame { conn: 1, text: frame.to_string().into() }
}

#[test]
fn a_new_connection_id_after_a_gap_finds_unseen_conversations_and_only_new_posts() {
    let mut first = signed_in("onmessage");
    let seen = first.feed(live_post(&post_json("p1", "alice", "c1", "before the gap", 1_000_000), "O", 1)).unwrap();
    assert_eq!(inbound(&seen).len(), 1);
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let conn = opened_connections(&started)[0].conn;
    second.feed(Event::WsOpened { conn }).unwrap();
    // The server could not resume: a new connection id, seq 0.
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (teams, _) = gets(&actions, "/users/me/teams").pop().expect("the bot's teams are listed");
    // A live post arrives while the gap's conversations are being found: it waits.
    let live = post_json("p4", "alice", "c1", "live", 1_040_000);
    let frame = json!({"event": "posted", "data": {"post": live.to_string(), "channel_type": "O",
        "sender_name": "@alice"}, "broadcast": {}, "seq": 1});
    assert!(inbound(&second.feed(Event::WsFrame { conn, text: frame.to_string().into() }).unwrap()).is_empty());
    let actions = answer(&mut second, teams, 200, json!([{"id": "t1", "name": "office"}]));
    let (listing, _) = gets(&actions, "/users/me/teams/t1/channels").pop().expect("the team's channels");
    let actions = answer(
        &mut second,
        listing,
        200,
        json!([
            {"id": "c1", "type": "O", "name": "town-square", "last_post_at": 1_040_000},
            {"id": "quiet", "type": "O", "name": "quiet", "last_post_at": 900_000},
            {"id": "d9", "type": "D", "name": "bot__carol", "last_post_at": 1_050_000},
        ]),
    );
    let fetches = gets(&actions, "/posts?since=");
    assert_eq!(fetches.len(), 2, "c1 and the DM never seen, not the quiet channel: {fetches:?}");
    let (c1, c1_url) = fetches.iter().find(|(_, url)| url.contains("/channels/c1/")).cloned().unwrap();
    assert!(c1_url.ends_with("since=995000"), "since the last post seen, less a margin: {c1_url}");
    let (d9, d9_url) = fetches.iter().find(|(_, url)| url.contains("/channels/d9/")).cloned().unwrap();
    assert!(d9_url.ends_with("since=995000"), "since the gap began, less a margin: {d9_url}");

    // UpdateAt semantics: an old post edited in the gap, a deleted one, the root of a reply
    // (in `posts`, not in `order`), and the post already answered all come back.
    let mut edited = post_json("old", "alice", "c1", "edited long ago", 500_000);
    edited["update_at"] = json!(1_020_000);
    let mut deleted = post_json("gone", "alice", "c1", "deleted", 1_010_000);
    deleted["delete_at"] = json!(1_015_000);
    let root = post_json("root", "alice", "c1", "a root from before", 400_000);
    let mut reply_in_thread = post_json("p3", "alice", "c1", "second", 1_030_000);
    reply_in_thread["root_id"] = json!("root");
    let missed = json!({"order": ["p3", "gone", "p2", "p1", "old"], "posts": {
        "p1": post_json("p1", "alice", "c1", "before the gap", 1_000_000), "p2": post_json("p2", "alice", "c1", "first", 1_020_000),
        "p3": reply_in_thread, "gone": deleted, "old": edited, "root": root}});
    let texts: Vec<String> = inbound(&answer(&mut second, c1, 200, missed)).into_iter().map(|(t, ..)| t).collect();
    assert_eq!(texts, ["first", "second", "live"], "new posts in order, then the held live one");

    // The first DM's sender is unknown: looked up before the post is handled.
    let dm = json!({"order": ["dm1"], "posts": {"dm1": post_json("dm1", "carol", "d9", "hello bot", 1_050_000)}});
    let actions = answer(&mut second, d9, 200, dm);
    assert!(inbound(&actions).is_empty(), "waits for the sender's name");
    let (lookup, _) = gets(&actions, "/users/carol").pop().expect("the sender is looked up");
    let actions = answer(&mut second, lookup, 200, json!({"id": "carol", "username": "carol"}));
    let dm: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Inbound(m) => Some((m.peer_kind, m.sender_name.to_string(), m.text.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(dm, vec![(PeerKind::Dm, "carol".to_string(), "hello bot".to_string())]);
}

#[test]
fn a_catch_up_cut_at_its_limit_walks_the_channel_page_by_page() {
    let mut first = signed_in("onmessage");
    first.feed(live_post(&post_json("p0", "alice", "c1", "seen", 1_000_000), "O", 1)).unwrap();
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let conn = opened_connections(&started)[0].conn;
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (teams, _) = gets(&actions, "/users/me/teams").pop().unwrap();
    let actions = answer(&mut second, teams, 200, json!([]));
    let (mine, _) = gets(&actions, "/users/me/channels").pop().expect("no team: all the bot's channels");
    let actions =
        answer(&mut second, mine, 200, json!([{"id": "c1", "type": "O", "name": "c", "last_post_at": 2_000_000}]));
    let (since, _) = gets(&actions, "/channels/c1/posts?since=").pop().unwrap();
    // 1000 rows: the server's limit, an arbitrary subset.
    let mut posts = serde_json::Map::new();
    let mut order = Vec::new();
    for i in 0..1000 {
        let id = format!("s{i:04}");
        posts.insert(id.clone(), post_json(&id, "alice", "c1", &format!("m{i}"), 1_001_000 + i * 2));
        order.push(id);
    }
    let actions = answer(&mut second, since, 200, json!({"order": order, "posts": posts}));
    assert!(inbound(&actions).is_empty(), "not all in yet");
    let (page0, url) = gets(&actions, "/channels/c1/posts?page=0").pop().expect("walks pages");
    assert!(url.contains("per_page=200"), "{url}");
    // Newest first; the second page reaches back past the gap's start.
    let page = |from: i64, count: i64| {
        let ids: Vec<String> = (0..count).map(|i| format!("w{}", from - i)).collect();
        let posts: serde_json::Map<String, Value> = (0..count)
            .map(|i| (format!("w{}", from - i), post_json(&format!("w{}", from - i), "alice", "c1", "x", from - i)))
            .collect();
        json!({"order": ids, "posts": posts})
    };
    let actions = answer(&mut second, page0, 200, page(1_001_500, 200));
    let (page1, _) = gets(&actions, "/channels/c1/posts?page=1").pop().expect("a second page");
    let actions = answer(&mut second, page1, 200, page(995_100, 200));
    assert!(gets(&actions, "page=2").is_empty(), "the page reached the gap's start");
    let answered = inbound(&actions).len();
    // Posts created after the floor (1_000_000 less the margin), each once: 1000 + 200 + 100.
    assert_eq!(answered, 1300, "every new post once");
}

#[test]
fn a_frame_the_host_gave_up_on_moves_the_sequence_and_is_never_answered() {
    let mut harness = signed_in("onmessage");
    let poisoned = posted("p1", "alice", "c1", "O", "poison", "", false);
    assert_eq!(harness.conversation_of(&poisoned).unwrap().as_deref(), Some("c1"), "the dead letter can name c1");
    let Event::WsFrame { conn, text } = poisoned else { unreachable!("posted() makes a frame") };
    let actions = harness.feed(Event::WsFrameSkipped { conn, text: text.clone() }).unwrap();
    assert!(inbound(&actions).is_empty(), "a skipped post is not answered: {actions:?}");
    // The sequence moved past it: the next frame is in order (no 4001), and the same post
    // coming back (a catch-up) is recognised and not answered.
    let again = text.as_str().replace("\"seq\":1", "\"seq\":2");
    let actions = harness.feed(Event::WsFrame { conn, text: again.into() }).unwrap();
    assert!(!actions.iter().any(|a| matches!(a, Action::WsClose { .. })), "{actions:?}");
    assert!(inbound(&actions).is_empty(), "the skipped post stays unanswered: {actions:?}");
}

fn timers(actions: &[Action]) -> Vec<(u64, u64)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetTimer { timer, after_ms } => Some((*timer, *after_ms)),
            _ => None,
        })
        .collect()
}

fn sent_frames(actions: &[Action]) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::WsSend { text, .. } => serde_json::from_str(text.as_str()).ok(),
            _ => None,
        })
        .collect()
}

fn logs(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Log { message, .. } => Some(message.to_string()),
            _ => None,
        })
        .collect()
}

/// A resume sends no `hello`: the answer to the ping sent on open proves the connection, so
/// drop after resumed drop reconnects at the initial delay instead of backing off to a minute.
#[test]
fn resumed_drops_reconnect_without_growing_backoff() {
    let mut harness = signed_in("onmessage");
    let mut conn = 1;
    let mut longest = 0;
    for _ in 0..8 {
        let actions = harness.feed(Event::WsClosed { conn, code: 1006, reason: "dropped".into() }).unwrap();
        let (timer, delay) = timers(&actions)[0];
        longest = longest.max(delay);
        let actions = harness.feed(Event::TimerFired { timer }).unwrap();
        conn = opened_connections(&actions)[0].conn;
        let actions = harness.feed(Event::WsOpened { conn }).unwrap();
        let ping = sent_frames(&actions).into_iter().find(|f| f["action"] == "ping").expect("a ping on open");
        let pong = json!({"status": "OK", "seq_reply": ping["seq"], "data": {"text": "pong", "server_time": 5}});
        harness.feed(Event::WsFrame { conn, text: pong.to_string().into() }).unwrap();
    }
    assert!(longest <= 1200, "initial delay plus jitter at most, got {longest} ms");
    // Without a proof (the server closes at once, again and again), it backs off.
    let mut delays = Vec::new();
    for _ in 0..4 {
        let actions = harness.feed(Event::WsClosed { conn, code: 1006, reason: "refused".into() }).unwrap();
        let (timer, delay) = timers(&actions)[0];
        delays.push(delay);
        conn = opened_connections(&harness.feed(Event::TimerFired { timer }).unwrap())[0].conn;
    }
    assert!(delays[3] >= 8000, "unproven connections back off: {delays:?}");
}

#[test]
fn a_refused_token_on_the_socket_is_one_clear_error_and_never_the_token() {
    let mut harness = signed_in("onmessage");
    let mut all = Vec::new();
    let mut conn = 1;
    for _ in 0..3 {
        let actions = harness.feed(Event::WsClosed { conn, code: 1006, reason: "gone".into() }).unwrap();
        all.extend(actions.clone());
        conn = opened_connections(&harness.feed(Event::TimerFired { timer: timers(&actions)[0].0 }).unwrap())[0].conn;
        let opened = harness.feed(Event::WsOpened { conn }).unwrap();
        let ping = sent_frames(&opened).into_iter().find(|f| f["action"] == "ping").unwrap();
        let refused = json!({"status": "FAIL", "seq_reply": ping["seq"], "error": {"id": "api.web_socket_router.not_authenticated.app_error", "message": "You are not authenticated.", "status_code": 401}});
        let actions = harness.feed(Event::WsFrame { conn, text: refused.to_string().into() }).unwrap();
        assert!(actions.iter().any(|a| matches!(a, Action::WsClose { .. })), "an unauthenticated socket is closed");
        all.extend(actions);
    }
    let errors: Vec<String> = logs(&all).into_iter().filter(|l| l.contains("refused the bot token")).collect();
    assert_eq!(errors.len(), 1, "one error per streak: {errors:?}");
    assert!(errors[0].contains("MM_BOT_TOKEN") && !errors[0].contains(TOKEN), "{errors:?}");
    let health: Vec<bool> =
        all.iter().filter_map(|a| if let Action::Health { healthy, .. } = a { Some(*healthy) } else { None }).collect();
    assert_eq!(health, [false], "reported unhealthy once, for the host's readiness check");
}

fn posted_with(post: Value, kind: &str, sender: &str, mentions_bot: bool, seq: i64) -> Event {
    let mut data =
        json!({"post": post.to_string(), "channel_type": kind, "sender_name": sender, "channel_name": "town-square"});
    if mentions_bot {
        data["mentions"] = json!(json!([BOT]).to_string());
    }
    Event::WsFrame {
        conn: 1,
        text: json!({"event": "posted", "data": data, "broadcast": {}, "seq": seq}).to_string().into(),
    }
}

#[test]
fn bots_webhooks_system_posts_and_announcements_are_not_answered() {
    let mut harness = signed_in("oncall");
    let mut bot_post = post_json("b1", "otherbot", "c1", "@switchboard-bot ping", 10);
    bot_post["props"] = json!({"from_bot": "true"});
    let mut hook = post_json("h1", "hookowner", "c1", "@switchboard-bot deploy done", 11);
    hook["props"] = json!({"from_webhook": "true", "override_username": "ci"});
    let mut system = post_json("s1", "alice", "c1", "alice joined the channel", 12);
    system["type"] = json!("system_join_channel");
    let announcement = post_json("a1", "alice", "c1", "@channel lunch is here", 13);
    let mut me = post_json("m1", "alice", "c1", "*waves at @switchboard-bot*", 14);
    me["type"] = json!("me");
    let full_stop = post_json("f1", "alice", "c1", "could you check this, @switchboard-bot.", 15);
    let mut answered = Vec::new();
    for (seq, (post, mentions)) in
        [(bot_post, true), (hook, true), (system, false), (announcement, true), (me, true), (full_stop, true)]
            .into_iter()
            .enumerate()
    {
        let actions = harness.feed(posted_with(post, "O", "@alice", mentions, seq as i64 + 1)).unwrap();
        answered.extend(inbound(&actions).into_iter().map(|(text, ..)| text));
    }
    assert_eq!(answered, ["*waves at *", "could you check this, ."], "only the /me post and the full-stop mention");

    // The operator may let bots in, and add mention words.
    let config = json!({"base_url": "http://127.0.0.1:8065", "bot_token_env": "MM_BOT_TOKEN", "chatmode": "oncall",
                        "allow_bots": true, "mention_words": ["jarvis"]})
    .to_string();
    let (mut harness, actions) = Harness::start::<MattermostAdapter>(host(), &config).unwrap();
    let (me_request, _) = gets(&actions, "/users/me").pop().unwrap();
    answer(&mut harness, me_request, 200, json!({"id": BOT, "username": "switchboard-bot"}));
    let hello = json!({"event": "hello", "data": {"connection_id": "conn1"}, "broadcast": {"user_id": BOT}, "seq": 0});
    harness.feed(Event::WsFrame { conn: 1, text: hello.to_string().into() }).unwrap();
    let mut bot_post = post_json("b2", "otherbot", "c1", "@switchboard-bot ping", 10);
    bot_post["props"] = json!({"from_bot": "true"});
    assert_eq!(inbound(&harness.feed(posted_with(bot_post, "O", "@otherbot", true, 1)).unwrap()).len(), 1);
    let word = post_json("j1", "alice", "c1", "Jarvis, what is the status?", 11);
    assert_eq!(inbound(&harness.feed(posted_with(word, "O", "@alice", false, 2)).unwrap()).len(), 1);
}

fn reply_to(reply_id: u64, channel: &str, root: &str, text: &str) -> Event {
    Event::DeliverReply(OutboundReply {
        reply_id,
        session_key: format!("agent:main:mattermost:channel:{channel}").into(),
        target: ReplyTarget::new(channel, root),
        text: text.into(),
    })
}

#[test]
fn replies_to_one_conversation_leave_in_order_across_rate_limits_and_others_go_alongside() {
    let mut harness = signed_in("onmessage");
    let first = posts(&harness.feed(reply_to(1, "c1", "", "one")).unwrap());
    assert_eq!(first.len(), 1);
    assert!(posts(&harness.feed(reply_to(2, "c1", "", "two")).unwrap()).is_empty(), "waits for reply 1");
    assert!(posts(&harness.feed(reply_to(3, "c1", "", "three")).unwrap()).is_empty(), "waits too");
    assert_eq!(posts(&harness.feed(reply_to(4, "c2", "", "elsewhere")).unwrap()).len(), 1, "c2 goes alongside");
    assert_eq!(posts(&harness.feed(reply_to(5, "c1", "t1", "in a thread")).unwrap()).len(), 1, "a thread is its own");
    let limited = Event::HttpResponse {
        request: first[0].0,
        status: 429,
        headers: vec![Header { name: "Retry-After".into(), value: "1".into() }].into(),
        body: "limit exceeded\n".into(),
    };
    let actions = harness.feed(limited).unwrap();
    assert!(posts(&actions).is_empty());
    let (timer, after) = timers(&actions)[0];
    harness.host.advance(after as i64);
    let again = posts(&harness.feed(Event::TimerFired { timer }).unwrap());
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1["message"], "one", "the limited reply goes first");
    let mut order = vec![again[0].1["message"].as_str().unwrap().to_string()];
    let mut next = posts(&harness.feed(created(again[0].0, "x1")).unwrap());
    while let Some((request, body)) = next.pop() {
        order.push(body["message"].as_str().unwrap().to_string());
        next = posts(&harness.feed(created(request, &format!("x{}", order.len()))).unwrap());
    }
    assert_eq!(order, ["one", "two", "three"]);
}

#[test]
fn a_reply_to_a_deleted_thread_goes_to_the_channel_saying_so() {
    let mut harness = signed_in("onmessage");
    let sent = posts(&harness.feed(reply_to(1, "c1", "gone-root", "the answer")).unwrap());
    let refused = Event::HttpResponse {
        request: sent[0].0,
        status: 400,
        headers: Default::default(),
        body: json!({"id": "api.post.create_post.root_id.app_error", "message": "Invalid RootId parameter.", "status_code": 400}).to_string().into(),
    };
    let again = posts(&harness.feed(refused).unwrap());
    assert_eq!(again.len(), 1, "posted again at once");
    assert!(again[0].1.get("root_id").is_none(), "top level: {}", again[0].1);
    let message = again[0].1["message"].as_str().unwrap();
    assert!(message.starts_with("(In reply to a thread") && message.ends_with("the answer"), "{message}");
    let done = harness.feed(created(again[0].0, "x1")).unwrap();
    assert!(done.iter().any(|a| matches!(a, Action::ReplyDelivered { reply_id: 1, .. })));
}

/// A reply handed out after the state was last saved is unknown to the restarted adapter; the
/// host says it may have gone out, and the adapter looks before posting it.
#[test]
fn a_reply_the_host_says_may_have_gone_out_is_looked_for_first() {
    let first = signed_in("onmessage");
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, _) = restart_cold(state, host);
    second.feed(Event::ReplyMayHaveGoneOut { reply_id: 9 }).unwrap();
    let actions = second.feed(reply_to(9, "c1", "", "maybe posted")).unwrap();
    assert!(posts(&actions).is_empty(), "nothing posted before looking: {actions:?}");
    let (look, _) = gets(&actions, "/channels/c1/posts?since=").pop().expect("a look");
    // Not found: posted now. A reply without the hint goes at once.
    let actions = answer(&mut second, look, 200, json!({"order": [], "posts": {}}));
    assert_eq!(posts(&actions).len(), 1);
    assert_eq!(posts(&second.feed(reply_to(10, "c2", "", "new")).unwrap()).len(), 1);
}

/// The process died before a state with its connection id was stored: the first `hello`
/// after the restart is a gap too (what was posted meanwhile is fetched), from the time the
/// state was saved.
#[test]
fn a_state_saved_before_its_first_hello_makes_the_first_hello_after_a_restart_a_gap() {
    let (first, _) = Harness::start::<MattermostAdapter>(host(), &config("onmessage")).unwrap();
    let same_host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, same_host);
    let conn = opened_connections(&started)[0].conn;
    let hello = json!({"event": "hello", "data": {"connection_id": "conn9"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    assert!(!gets(&actions, "/users/me/teams").is_empty(), "the gap's conversations are looked for: {actions:?}");
    // A fresh start with no state before it has nothing to catch up.
    let (mut fresh, started) = Harness::start::<MattermostAdapter>(host(), &config("onmessage")).unwrap();
    let conn = opened_connections(&started)[0].conn;
    let actions = fresh.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    assert!(gets(&actions, "/users/me/teams").is_empty());
}

/// c1 as the server holds it, oldest first: posts from before the gap, `p0` (the last one the
/// adapter saw, at 1_000_000), then the gap's posts `g00000`… ten ms apart.
struct Channel {
    posts: Vec<Value>,
}

impl Channel {
    fn with_gap(gap_posts: usize) -> Self {
        let mut posts: Vec<Value> =
            (0..300).map(|i| post_json(&format!("old{i:03}"), "alice", "c1", "before", 990_000 + i)).collect();
        posts.push(post_json("p0", "alice", "c1", "seen", 1_000_000));
        posts.extend((0..gap_posts).map(|i| gap_post(i, "x")));
        Self { posts }
    }

    /// Answers as store/sqlstore/post_store.go does: `since` filters on UpdateAt and returns
    /// at most 1000 rows (the oldest here: not the newest ones), pages go newest first.
    fn answer(&self, url: &str) -> Value {
        let query = url.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let param = |name: &str| {
            query.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}="))).map(|v| v.parse::<i64>().unwrap())
        };
        let chosen: Vec<&Value> = match param("since") {
            Some(since) => self.posts.iter().filter(|p| p["update_at"].as_i64().unwrap() > since).take(1000).collect(),
            None => {
                let (page, per_page) = (param("page").unwrap() as usize, param("per_page").unwrap() as usize);
                self.posts.iter().rev().skip(page * per_page).take(per_page).collect()
            }
        };
        let order: Vec<&str> = chosen.iter().map(|p| p["id"].as_str().unwrap()).collect();
        let posts: serde_json::Map<String, Value> =
            chosen.iter().map(|p| (p["id"].as_str().unwrap().to_string(), (*p).clone())).collect();
        json!({"order": order, "posts": posts})
    }
}

fn gap_post(i: usize, message: &str) -> Value {
    post_json(&format!("g{i:05}"), "alice", "c1", message, 1_000_000 + 10 * (i as i64 + 1))
}

/// c1's catch-up requests not answered yet, and the ids of the messages handed to the host.
#[derive(Default)]
struct Run {
    pending: std::collections::VecDeque<(u64, String)>,
    handed: Vec<String>,
}

impl Run {
    fn absorb(&mut self, actions: &[Action]) {
        self.pending.extend(gets(actions, "/channels/c1/posts?"));
        self.handed.extend(actions.iter().filter_map(|a| match a {
            Action::Inbound(m) => Some(m.message_id.to_string()),
            _ => None,
        }));
    }

    /// Answer the oldest request; false when none is left.
    fn step(&mut self, harness: &mut Harness, channel: &Channel) -> bool {
        let Some((request, url)) = self.pending.pop_front() else { return false };
        let actions = answer(harness, request, 200, channel.answer(&url));
        self.absorb(&actions);
        true
    }

    fn finish(&mut self, harness: &mut Harness, channel: &Channel) {
        while self.step(harness, channel) {}
    }
}

/// Generation 2 of an adapter that saw `p0` in c1, restarted cold and told by a new connection
/// id that it missed what was posted meanwhile: c1's catch-up has been asked for.
fn catching_up() -> (Harness, u64, Run) {
    let mut first = signed_in("onmessage");
    first.feed(live_post(&post_json("p0", "alice", "c1", "seen", 1_000_000), "O", 1)).unwrap();
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let conn = opened_connections(&started)[0].conn;
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (teams, _) = gets(&actions, "/users/me/teams").pop().unwrap();
    let actions = answer(&mut second, teams, 200, json!([]));
    let (mine, _) = gets(&actions, "/users/me/channels").pop().unwrap();
    let listing = json!([{"id": "c1", "type": "O", "name": "c", "last_post_at": 9_000_000}]);
    let mut run = Run::default();
    run.absorb(&answer(&mut second, mine, 200, listing));
    assert!(run.pending.front().is_some_and(|(_, url)| url.ends_with("since=995000")), "{:?}", run.pending);
    (second, conn, run)
}

fn expected_ids(gap_posts: usize) -> Vec<String> {
    (0..gap_posts).map(|i| format!("g{i:05}")).collect()
}

/// The state is exported after every batch: what a catch-up fetched stays out of it.
#[test]
fn the_state_exported_mid_catch_up_stays_small() {
    let channel = Channel::with_gap(5000);
    let (mut second, _, mut run) = catching_up();
    // The `since` rows, then 25 pages of 200 back to the gap's start.
    for _ in 0..26 {
        assert!(run.step(&mut second, &channel));
    }
    assert!(run.pending.front().is_some_and(|(_, url)| url.contains("page=25")), "{:?}", run.pending);
    assert!(run.handed.is_empty(), "nothing is handed before every page is in");
    let (state, _) = second.hand_over().unwrap();
    println!("state exported with 5,000 posts collected: {} bytes", state.data.len());
    assert!(state.data.len() < 16 * 1024, "{} bytes", state.data.len());
    let saved: Value = serde_json::from_str(state.data.as_str()).unwrap();
    let catch_up = &saved["catch_ups"]["c1"];
    assert_eq!(catch_up["floor"], 995_000, "the progress is saved: {catch_up}");
    assert_eq!(catch_up["collected"], json!({}), "an empty map, which builds before this one can still read");
}

/// A gap's posts fetched but not yet handed when the state was saved are fetched again by
/// the next generation, after a crash (no `hello`: the connection resumes) or a swap (the
/// answer to the old generation's page request comes after it): each is handed once, in
/// order, and a live post held meanwhile too.
#[test]
fn a_catch_up_restored_from_a_saved_state_hands_every_post_of_the_gap_once() {
    for warm in [false, true] {
        let mut channel = Channel::with_gap(1500);
        let (mut second, conn, mut run) = catching_up();
        for _ in 0..3 {
            assert!(run.step(&mut second, &channel)); // since, pages 0 and 1
        }
        // A live post while c1 is being caught up: held, then saved with the state.
        let live = post_json("live1", "alice", "c1", "live", 1_100_000);
        channel.posts.push(live.clone());
        let frame = json!({"event": "posted", "data": {"post": live.to_string(), "channel_type": "O",
            "sender_name": "@alice"}, "broadcast": {}, "seq": 1});
        run.absorb(&second.feed(Event::WsFrame { conn, text: frame.to_string().into() }).unwrap());
        assert!(run.handed.is_empty(), "nothing handed before the catch-up is complete");
        let host = second.host.clone();
        let (state, _) = second.hand_over().unwrap();
        let (mut third, started) = if warm {
            let handover = Handover {
                generation: 3,
                previous_state: Some(state).into(),
                connections: vec![switchboard_plugin_api::OpenConnection { conn, url: "ws://x".into() }].into(),
                cold: false,
            };
            Harness::start_with::<MattermostAdapter>(host, &config("onmessage"), handover).unwrap()
        } else {
            run.pending.clear(); // the crashed process's requests are gone
            restart_cold(state, host)
        };
        assert_eq!(opened_connections(&started).len(), usize::from(!warm), "resumed or adopted, not a new gap");
        let fresh = gets(&started, "/channels/c1/posts?");
        assert!(fresh.len() == 1 && fresh[0].1.ends_with("since=995000"), "from the same floor again: {fresh:?}");
        run.absorb(&started);
        run.finish(&mut third, &channel);
        let mut expected = expected_ids(1500);
        expected.push("live1".into());
        assert_eq!(run.handed, expected, "warm: {warm}");
    }
}

/// A state saved by a build that kept the fetched posts in it still loads: those posts are
/// ignored and the catch-up starts again from its floor.
#[test]
fn a_state_of_a_build_that_saved_the_fetched_posts_still_loads() {
    let channel = Channel::with_gap(1500);
    let (mut second, _, mut run) = catching_up();
    for _ in 0..3 {
        assert!(run.step(&mut second, &channel));
    }
    let host = second.host.clone();
    let (mut state, _) = second.hand_over().unwrap();
    // As that build wrote it: the posts of the `since` rows and of pages 0 and 1.
    let mut saved: Value = serde_json::from_str(state.data.as_str()).unwrap();
    let collected: serde_json::Map<String, Value> = (0..999)
        .chain(1100..1500)
        .map(|i| (format!("g{i:05}"), gap_post(i, "x")))
        .chain([("p0".to_string(), post_json("p0", "alice", "c1", "seen", 1_000_000))])
        .collect();
    saved["catch_ups"]["c1"]["collected"] = Value::Object(collected);
    assert_eq!(saved["catch_ups"]["c1"]["page"], 2, "pages 0 and 1 are in");
    state.data = saved.to_string().into();
    assert!(state.data.len() > 200_000, "{} bytes", state.data.len());
    run.pending.clear();
    let (mut third, started) = restart_cold(state, host);
    assert!(logs(&started).iter().all(|l| !l.contains("unreadable")), "{:?}", logs(&started));
    let url = opened_connections(&started)[0].url.to_string();
    assert!(url.contains("connection_id=conn2"), "the saved state was read: {url}");
    let fresh = gets(&started, "/channels/c1/posts?");
    assert!(fresh.len() == 1 && fresh[0].1.ends_with("since=995000"), "started again: {fresh:?}");
    run.absorb(&started);
    run.finish(&mut third, &channel);
    assert_eq!(run.handed, expected_ids(1500));
    let (state, _) = third.hand_over().unwrap();
    assert!(state.data.len() < 16 * 1024, "and it is saved small again: {} bytes", state.data.len());
}

/// A restart while the gap's conversations are being listed lists them again at once (the
/// connection may resume), from the gap's start; a second gap before they are found keeps
/// that start, and answers to listings asked for before it are not waited for.
#[test]
fn a_restart_while_the_gaps_conversations_are_listed_lists_them_again_from_the_same_start() {
    let mut first = signed_in("onmessage");
    first.feed(live_post(&post_json("p0", "alice", "c1", "seen", 1_000_000), "O", 1)).unwrap();
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host.clone());
    let conn = opened_connections(&started)[0].conn;
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    assert_eq!(gets(&actions, "/users/me/teams").len(), 1);
    // A live post waits for the gap's conversations to be found.
    let live = post_json("live1", "alice", "c1", "live", 1_100_000);
    let frame = json!({"event": "posted", "data": {"post": live.to_string(), "channel_type": "O",
        "sender_name": "@alice"}, "broadcast": {}, "seq": 1});
    assert!(inbound(&second.feed(Event::WsFrame { conn, text: frame.to_string().into() }).unwrap()).is_empty());
    let (state, _) = second.hand_over().unwrap();

    let (mut third, started) = restart_cold(state, host);
    assert!(inbound(&started).is_empty(), "the held post still waits");
    let (stale, _) = gets(&started, "/users/me/teams").pop().expect("listed again at once");
    // The server's clock moves on (a ping answer), then the connection cannot resume either.
    let conn = opened_connections(&started)[0].conn;
    let opened = third.feed(Event::WsOpened { conn }).unwrap();
    let ping = sent_frames(&opened).into_iter().find(|f| f["action"] == "ping").unwrap();
    let pong = json!({"status": "OK", "seq_reply": ping["seq"], "data": {"server_time": 2_000_000}});
    third.feed(Event::WsFrame { conn, text: pong.to_string().into() }).unwrap();
    let hello = json!({"event": "hello", "data": {"connection_id": "conn3"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = third.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (teams, _) = gets(&actions, "/users/me/teams").pop().expect("listed again after the second gap");
    let actions = answer(&mut third, stale, 200, json!([{"id": "t1"}]));
    assert!(actions.iter().all(|a| !matches!(a, Action::HttpRequest { .. })), "not waited for: {actions:?}");
    let actions = answer(&mut third, teams, 200, json!([]));
    let (mine, _) = gets(&actions, "/users/me/channels").pop().unwrap();
    let listing = json!([{"id": "c1", "type": "O", "name": "c", "last_post_at": 1_100_000},
                         {"id": "d9", "type": "D", "name": "bot__carol", "last_post_at": 1_500_000}]);
    let actions = answer(&mut third, mine, 200, listing);
    let fetches = gets(&actions, "/posts?since=");
    assert_eq!(fetches.len(), 2, "{fetches:?}");
    assert!(fetches.iter().all(|(_, url)| url.ends_with("since=995000")), "from the first gap's start: {fetches:?}");
    let (c1, _) = fetches.iter().find(|(_, url)| url.contains("/channels/c1/")).cloned().unwrap();
    let both = json!({"order": ["live1", "p0"], "posts": {"live1": live, "p0": post_json("p0", "alice", "c1", "seen", 1_000_000)}});
    let texts: Vec<String> = inbound(&answer(&mut third, c1, 200, both)).into_iter().map(|(t, ..)| t).collect();
    assert_eq!(texts, ["live"], "fetched and held, handed once");
}

/// A frame the host gave up on while the gap's conversations are being found does not move
/// where its conversation's catch-up starts: posts before it are not handed yet.
#[test]
fn a_frame_given_up_on_during_a_gap_does_not_move_where_the_catch_up_starts() {
    let mut first = signed_in("onmessage");
    first.feed(live_post(&post_json("p0", "alice", "c1", "seen", 1_000_000), "O", 1)).unwrap();
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let conn = opened_connections(&started)[0].conn;
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (teams, _) = gets(&actions, "/users/me/teams").pop().unwrap();
    let skipped = json!({"event": "posted", "data": {"post": post_json("p5", "alice", "c1", "poison", 1_050_000).to_string(),
        "channel_type": "O", "sender_name": "@alice"}, "broadcast": {}, "seq": 1});
    second.feed(Event::WsFrameSkipped { conn, text: skipped.to_string().into() }).unwrap();
    let actions = answer(&mut second, teams, 200, json!([]));
    let (mine, _) = gets(&actions, "/users/me/channels").pop().unwrap();
    let listing = json!([{"id": "c1", "type": "O", "name": "c", "last_post_at": 1_050_000}]);
    let (_, url) = gets(&answer(&mut second, mine, 200, listing), "/channels/c1/posts?").pop().unwrap();
    assert!(url.ends_with("since=995000"), "from the last post handed, less the margin: {url}");
}
