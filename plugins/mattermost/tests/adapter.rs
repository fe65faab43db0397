//! The adapter through the shared conformance harness (in-process, through the guarded ABI
//! wrapper), then its Mattermost protocol behaviour event by event.

use serde_json::{json, Value};
use switchboard_mattermost::MattermostAdapter;
use switchboard_plugin_api::{
    conformance::{check_contract, opened_connections, Harness, TestHost},
    Action, Event, Handover, Header, OutboundReply, PeerKind, ReplyTarget,
};

const TOKEN: &str = "tok3n-value-never-logged";
const BOT: &str = "botid0000000000000000000000";

fn config(chatmode: &str) -> String {
    json!({"base_url": "http://127.0.0.1:8065/", "bot_token_env": "MM_BOT_TOKEN", "chatmode": chatmode,
           "dm_policy": "open", "group_policy": "open", "allow_from": []})
    .to_string()
}

fn host() -> TestHost {
    TestHost::new("mattermost").with_secret("MM_BOT_TOKEN", TOKEN)
}

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

/// Start, connect, say hello, and answer /users/me.
fn signed_in(chatmode: &str) -> Harness {
    let (mut harness, actions) = Harness::start::<MattermostAdapter>(host(), &config(chatmode)).unwrap();
    let me = actions
        .iter()
        .find_map(|a| match a {
            Action::HttpRequest { request, url, .. } if url.ends_with("/api/v4/users/me") => Some(*request),
            _ => None,
        })
        .expect("GET /users/me");
    harness.feed(Event::WsOpened { conn: 1 }).unwrap();
    let hello = json!({"event": "hello", "data": {"connection_id": "conn1"}, "broadcast": {"user_id": BOT}, "seq": 0});
    harness.feed(Event::WsFrame { conn: 1, text: hello.to_string().into() }).unwrap();
    let user = json!({"id": BOT, "username": "switchboard-bot"});
    harness
        .feed(Event::HttpResponse {
            request: me,
            status: 200,
            headers: Default::default(),
            body: user.to_string().into(),
        })
        .unwrap();
    harness
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
    assert_eq!(*after_ms, 2000);
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

#[test]
fn a_new_connection_id_after_a_gap_fetches_the_missed_posts_in_order() {
    let mut first = signed_in("onmessage");
    let seen = first.feed(posted("p1", "alice", "c1", "O", "before the gap", "", false)).unwrap();
    assert_eq!(inbound(&seen).len(), 1);
    let host = first.host.clone();
    let (state, _) = first.hand_over().unwrap();
    let (mut second, started) = restart_cold(state, host);
    let conn = opened_connections(&started)[0].conn;
    second.feed(Event::WsOpened { conn }).unwrap();
    // The server could not resume: a new connection id, seq 0.
    let hello = json!({"event": "hello", "data": {"connection_id": "conn2"}, "broadcast": {"user_id": BOT}, "seq": 0});
    let actions = second.feed(Event::WsFrame { conn, text: hello.to_string().into() }).unwrap();
    let (fetch, url) = gets(&actions, "/channels/c1/posts?since=").pop().expect("a catch-up of c1");
    assert!(url.ends_with("since=0"), "since the last post seen (create_at 1, minus one): {url}");
    // A live post arrives before the catch-up answer: it waits, so c1 stays in order.
    let live = json!({"event": "posted", "data": {"post": json!({"id": "p4", "user_id": "alice", "channel_id": "c1",
        "root_id": "", "message": "live", "type": "", "create_at": 40}).to_string(), "channel_type": "O",
        "sender_name": "@alice"}, "broadcast": {}, "seq": 1});
    assert!(inbound(&second.feed(Event::WsFrame { conn, text: live.to_string().into() }).unwrap()).is_empty());
    let missed = json!({"order": ["p3", "p2", "p1"], "posts": {
        "p1": {"id": "p1", "user_id": "alice", "channel_id": "c1", "root_id": "", "message": "before the gap", "type": "", "create_at": 1},
        "p3": {"id": "p3", "user_id": "alice", "channel_id": "c1", "root_id": "", "message": "second", "type": "", "create_at": 30},
        "p2": {"id": "p2", "user_id": "alice", "channel_id": "c1", "root_id": "", "message": "first", "type": "", "create_at": 20}}});
    let actions = second
        .feed(Event::HttpResponse {
            request: fetch,
            status: 200,
            headers: Default::default(),
            body: missed.to_string().into(),
        })
        .unwrap();
    let texts: Vec<String> = inbound(&actions).into_iter().map(|(text, ..)| text).collect();
    assert_eq!(texts, ["first", "second", "live"], "missed posts in order, then the held live one; p1 not again");
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
