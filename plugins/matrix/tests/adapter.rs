//! The adapter through the shared conformance harness (in-process, through the guarded ABI
//! wrapper), then its Matrix protocol behaviour event by event.

mod common;

use common::*;
use serde_json::{json, Value};
use switchboard_matrix::MatrixAdapter;
use switchboard_plugin_api::{
    conformance::{check_contract, Harness},
    Action, Event, Handover, LogLevel, OutboundReply, PeerKind, ReplyTarget, StateBlob,
};

#[test]
fn keeps_the_adapter_contract() {
    let bad = [
        (r#"{"user_id":"@b:x","access_token_env":"T"}"#, "homeserver_url"),
        (r#"{"homeserver_url":"http://x","user_id":"bot","access_token_env":"T"}"#, "user_id"),
        (r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","chatmode":"sometimes"}"#, "chatmode"),
        (
            r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","allow_from":["@a:x","alice"]}"#,
            "allow_from[1]",
        ),
        (r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","rooms":["ops"]}"#, "rooms[0]"),
        (r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","colour":"blue"}"#, "colour"),
        (
            r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","dm_policy":"allowlist"}"#,
            "allow_from",
        ),
        (r#"{"homeserver_url":"http://x","user_id":"@b:x","access_token_env":"T","auto_join":"yes"}"#, "auto_join"),
    ];
    check_contract::<MatrixAdapter>(host(), &config(json!({})), &bad).unwrap();
}

#[test]
fn every_problem_is_reported_at_once() {
    let problems = <MatrixAdapter as switchboard_plugin_api::AdapterPlugin>::validate_config(
        r#"{"homeserver_url":"ftp://x","chatmode":"loud","colour":1,"rooms":[""]}"#,
    );
    let paths: Vec<&str> = problems.iter().map(|p| p.key_path.as_str()).collect();
    for key in ["homeserver_url", "user_id", "access_token_env", "chatmode", "colour", "rooms[0]"] {
        assert!(paths.contains(&key), "{key} in {paths:?}");
    }
}

#[test]
fn the_first_sync_answers_no_history_and_the_long_poll_resumes_from_its_next_batch() {
    let (mut harness, actions) = Harness::start::<MatrixAdapter>(host(), &config(json!({}))).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    assert_eq!(whoami.url, "http://127.0.0.1:8008/_matrix/client/v3/account/whoami");
    assert!(whoami.headers.iter().any(|h| h.name == "Authorization" && h.value.as_str() == format!("Bearer {TOKEN}")));
    let actions = harness.feed(answer(&whoami, 200, json!({"user_id": BOT}))).unwrap();
    let first = next_sync(&actions);
    assert_eq!(first.query("since"), None);
    assert_eq!(first.query("timeout").as_deref(), Some("0"));
    let filter: Value = serde_json::from_str(&first.query("filter").unwrap()).unwrap();
    assert_eq!(filter["room"]["timeline"]["limit"], 1, "the first sync is read for rooms only");

    let history = sync_answer(
        "s1",
        json!({"!r:x": room(3, false, vec![text("$old", ALICE, "@switchboard:localhost old question")])}),
    );
    let actions = harness.feed(answer(&first, 200, history)).unwrap();
    assert!(inbound(&actions).is_empty(), "history is not answered");
    let poll = next_sync(&actions);
    assert_eq!(poll.query("since").as_deref(), Some("s1"));
    assert_eq!(poll.query("timeout").as_deref(), Some("30000"));
    let state = harness.adapter.export_state().into_result().unwrap();
    assert!(state.data.contains("\"since\":\"s1\""), "{}", state.data);
}

#[test]
fn since_moves_in_the_batch_that_passes_the_messages_on() {
    let config = config(json!({"chatmode": "onmessage"}));
    let (mut harness, poll) = syncing(&config, json!({"!r:x": room(3, false, vec![])}));
    let before = harness.adapter.export_state().into_result().unwrap();
    assert!(before.data.contains("\"since\":\"s1\""));
    assert!(
        before.data.contains(&format!("\"{}\":{{\"Sync\":{{\"since\":\"s1\"}}}}", poll.id)),
        "the sync in flight and its since: {}",
        before.data
    );

    let new = sync_answer(
        "s2",
        json!({"!r:x": {"timeline": {"events": [text("$1", ALICE, "one"), text("$2", ALICE, "two")]}}}),
    );
    let actions = harness.feed(answer(&poll, 200, new)).unwrap();
    let passed = inbound(&actions);
    assert_eq!(passed.iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["$1", "$2"]);
    assert_eq!(passed[0].text, "one");
    assert_eq!(passed[0].created_at_ms, 1_700_000_000_123);
    assert_eq!(next_sync(&actions).query("since").as_deref(), Some("s2"));
    let after = harness.adapter.export_state().into_result().unwrap();
    assert!(after.data.contains("\"since\":\"s2\""), "{}", after.data);
}

/// Feed one message in `room_section` to a syncing adapter with `config`; the inbound made.
fn one_message(config_extra: Value, known_room: Value, event: Value) -> Vec<switchboard_plugin_api::InboundMessage> {
    let (mut harness, poll) = syncing(&config(config_extra), json!({"!r:x": known_room}));
    let new = sync_answer("s2", json!({"!r:x": {"timeline": {"events": [event]}}}));
    inbound(&harness.feed(answer(&poll, 200, new)).unwrap())
}

#[test]
fn chatmodes_decide_what_is_answered_and_mentions_are_stripped() {
    let group = || room(3, false, vec![]);
    let mut pill = text("$p", ALICE, "Switchboard: deploy please");
    pill["content"]["m.mentions"] = json!({"user_ids": [BOT]});
    assert_eq!(one_message(json!({}), group(), pill)[0].text, "deploy please");
    assert_eq!(
        one_message(json!({}), group(), text("$m", ALICE, "@switchboard:localhost: status?"))[0].text,
        "status?"
    );
    assert_eq!(one_message(json!({}), group(), text("$l", ALICE, "switchboard, status?"))[0].text, "status?");
    assert!(one_message(json!({}), group(), text("$n", ALICE, "just chatting")).is_empty(), "oncall needs a mention");
    assert!(one_message(json!({}), group(), text("$s", ALICE, "switchboards are old")).is_empty());
    assert_eq!(
        one_message(json!({"chatmode": "onmessage"}), group(), text("$o", ALICE, "just chatting"))[0].text,
        "just chatting"
    );
    assert_eq!(one_message(json!({"chatmode": "onchar"}), group(), text("$c", ALICE, "> do it"))[0].text, "do it");
    assert_eq!(one_message(json!({"chatmode": "onchar"}), group(), text("$c", ALICE, "!ping"))[0].text, "ping");
    assert!(one_message(json!({"chatmode": "onchar"}), group(), text("$c", ALICE, "do it")).is_empty());
    // DMs always count as addressed.
    assert_eq!(one_message(json!({}), room(2, false, vec![]), text("$d", ALICE, "hi there"))[0].text, "hi there");
}

#[test]
fn rooms_are_dms_groups_or_channels() {
    let kind = |room_section: Value| {
        one_message(json!({"chatmode": "onmessage"}), room_section, text("$k", ALICE, "hi"))[0].peer_kind
    };
    assert_eq!(kind(room(2, false, vec![])), PeerKind::Dm, "two members, invite only");
    assert_eq!(kind(room(3, false, vec![])), PeerKind::Group);
    assert_eq!(kind(room(2, true, vec![])), PeerKind::Channel, "a public room is not a DM");
    assert_eq!(kind(room(5, true, vec![])), PeerKind::Channel);

    // m.direct makes a DM of any room; the peer id is the room (replies go there).
    let (mut harness, poll) =
        syncing(&config(json!({"chatmode": "onmessage"})), json!({"!big:x": room(4, false, vec![])}));
    let mut new = sync_answer("s2", json!({"!big:x": {"timeline": {"events": [text("$x", ALICE, "private")]}}}));
    new["account_data"] = json!({"events": [{"type": "m.direct", "content": {ALICE: ["!big:x"]}}]});
    let passed = inbound(&harness.feed(answer(&poll, 200, new)).unwrap());
    assert_eq!((passed[0].peer_kind, passed[0].peer_id.as_str()), (PeerKind::Dm, "!big:x"));
}

#[test]
fn own_messages_edits_notices_and_ignored_users_are_not_answered() {
    let on = || json!({"chatmode": "onmessage", "ignore_users": ["@otherbot:localhost"]});
    let group = || room(3, false, vec![]);
    assert!(one_message(on(), group(), text("$own", BOT, "my own reply")).is_empty());
    assert!(one_message(on(), group(), text("$bot", "@otherbot:localhost", "hello")).is_empty());
    let mut edit = text("$e", ALICE, "* fixed");
    edit["content"]["m.relates_to"] = json!({"rel_type": "m.replace", "event_id": "$orig"});
    assert!(one_message(on(), group(), edit).is_empty());
    let mut notice = text("$n", ALICE, "automated");
    notice["content"]["msgtype"] = json!("m.notice");
    assert!(one_message(on(), group(), notice).is_empty());
    let redacted = json!({"type": "m.room.message", "event_id": "$r", "sender": ALICE, "content": {}});
    assert!(one_message(on(), group(), redacted).is_empty());
    let mut reply = text("$q", ALICE, "> <@bob:localhost> earlier\n\nthe real question");
    reply["content"]["m.relates_to"] = json!({"m.in_reply_to": {"event_id": "$earlier"}});
    assert_eq!(one_message(on(), group(), reply)[0].text, "the real question", "the reply fallback is stripped");
}

#[test]
fn policies_and_the_room_allowlist_decide_who_is_answered() {
    let msg = || text("$m", ALICE, "hello");
    let dm = || room(2, false, vec![]);
    let group = || room(3, false, vec![]);
    let allow_bob =
        |policy: &str, key: &str| json!({"chatmode": "onmessage", key: policy, "allow_from": ["@bob:localhost"]});
    assert!(one_message(allow_bob("allowlist", "dm_policy"), dm(), msg()).is_empty());
    assert_eq!(
        one_message(json!({"dm_policy": "allowlist", "allow_from": ["@Alice:localhost"]}), dm(), msg()).len(),
        1
    );
    assert!(one_message(json!({"dm_policy": "disabled"}), dm(), msg()).is_empty());
    assert!(one_message(allow_bob("allowlist", "group_policy"), group(), msg()).is_empty());
    assert!(one_message(json!({"chatmode": "onmessage", "group_policy": "disabled"}), group(), msg()).is_empty());
    assert_eq!(one_message(json!({"chatmode": "onmessage", "group_policy": "disabled"}), dm(), msg()).len(), 1);
    assert!(one_message(json!({"chatmode": "onmessage", "rooms": ["!other:x"]}), group(), msg()).is_empty());
    assert_eq!(one_message(json!({"chatmode": "onmessage", "rooms": ["!r:x"]}), group(), msg()).len(), 1);
}

#[test]
fn allowlisted_aliases_are_resolved_before_the_first_sync() {
    let config = config(json!({"chatmode": "onmessage", "rooms": ["#ops:localhost"]}));
    let (mut harness, actions) = Harness::start::<MatrixAdapter>(host(), &config).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    let actions = harness.feed(answer(&whoami, 200, json!({"user_id": BOT}))).unwrap();
    assert!(syncs(&actions).is_empty(), "no sync before the alias is known");
    let alias = request_to(&actions, "/directory/room/");
    assert!(alias.url.ends_with("/directory/room/%23ops%3Alocalhost"), "{}", alias.url);
    let actions = harness.feed(answer(&alias, 200, json!({"room_id": "!ops:x"}))).unwrap();
    let first = next_sync(&actions);
    let rooms = json!({"!ops:x": room(3, false, vec![]), "!else:x": room(3, false, vec![])});
    let poll = next_sync(&harness.feed(answer(&first, 200, sync_answer("s1", rooms))).unwrap());
    let new = sync_answer(
        "s2",
        json!({"!ops:x": {"timeline": {"events": [text("$a", ALICE, "in ops")]}},
               "!else:x": {"timeline": {"events": [text("$b", ALICE, "elsewhere")]}}}),
    );
    let passed = inbound(&harness.feed(answer(&poll, 200, new)).unwrap());
    assert_eq!(passed.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["in ops"]);
}

#[test]
fn invites_are_accepted_as_the_policies_allow() {
    let invite = |room: &str, inviter: &str, direct: bool| {
        json!({room: {"invite_state": {"events": [
            {"type": "m.room.join_rules", "state_key": "", "sender": inviter, "content": {"join_rule": "invite"}},
            {"type": "m.room.member", "state_key": BOT, "sender": inviter, "content": {"membership": "invite", "is_direct": direct}},
        ]}}})
    };
    let joins = |extra: Value, room: &str, inviter: &str, direct: bool| {
        let (mut harness, poll) = syncing(&config(extra), json!({}));
        let new = json!({"next_batch": "s2", "rooms": {"invite": invite(room, inviter, direct)}});
        requests(&harness.feed(answer(&poll, 200, new)).unwrap())
            .into_iter()
            .filter(|r| r.url.ends_with("/join"))
            .count()
    };
    assert_eq!(joins(json!({}), "!g:x", ALICE, false), 1);
    assert_eq!(joins(json!({"auto_join": false}), "!g:x", ALICE, false), 0);
    assert_eq!(joins(json!({"dm_policy": "allowlist", "allow_from": ["@bob:localhost"]}), "!d:x", ALICE, true), 0);
    assert_eq!(joins(json!({"dm_policy": "allowlist", "allow_from": [ALICE]}), "!d:x", ALICE, true), 1);
    assert_eq!(joins(json!({"group_policy": "disabled"}), "!g:x", ALICE, false), 0);
    assert_eq!(joins(json!({"rooms": ["!only:x"]}), "!g:x", ALICE, false), 0);

    // A DM joined from an is_direct invite is a DM whatever its member count.
    let (mut harness, poll) = syncing(&config(json!({})), json!({}));
    let actions = harness
        .feed(answer(&poll, 200, json!({"next_batch": "s2", "rooms": {"invite": invite("!d:x", ALICE, true)}})))
        .unwrap();
    let join = request_to(&actions, "/join");
    assert_eq!(join.url, "http://127.0.0.1:8008/_matrix/client/v3/rooms/%21d%3Ax/join");
    let poll = next_sync(&actions);
    harness.feed(answer(&join, 200, json!({"room_id": "!d:x"}))).unwrap();
    let joined = sync_answer("s3", json!({"!d:x": room(3, false, vec![text("$hi", ALICE, "hi without a mention")])}));
    let passed = inbound(&harness.feed(answer(&poll, 200, joined)).unwrap());
    assert_eq!(passed[0].peer_kind, PeerKind::Dm);
}

#[test]
fn a_room_joined_just_now_answers_nothing_from_before_the_join() {
    let (mut harness, poll) = syncing(&config(json!({"chatmode": "onmessage"})), json!({}));
    let join = json!({"type": "m.room.member", "state_key": BOT, "sender": BOT, "event_id": "$join", "content": {"membership": "join"}});
    let timeline = vec![text("$before", ALICE, "said before the bot came"), join, text("$after", ALICE, "said after")];
    let mut section = room(3, false, timeline);
    section["timeline"]["limited"] = json!(true);
    let actions = harness.feed(answer(&poll, 200, sync_answer("s2", json!({"!new:x": section})))).unwrap();
    assert_eq!(inbound(&actions).iter().map(|m| m.message_id.as_str()).collect::<Vec<_>>(), ["$after"]);
    assert!(requests(&actions).iter().all(|r| !r.url.contains("/messages")), "no gap to fill in a new room");
}

#[test]
fn a_limited_timeline_is_filled_from_messages_before_since_moves() {
    let (mut harness, poll) =
        syncing(&config(json!({"chatmode": "onmessage"})), json!({"!r:x": room(3, false, vec![])}));
    let mut section =
        json!({"timeline": {"events": [text("$103", ALICE, "m103")], "limited": true, "prev_batch": "p103"}});
    section["state"] = json!({"events": []});
    let actions = harness.feed(answer(&poll, 200, sync_answer("s2", json!({"!r:x": section})))).unwrap();
    assert!(inbound(&actions).is_empty(), "nothing passed on before the gap is filled");
    assert!(syncs(&actions).is_empty());
    let page1 = request_to(&actions, "/messages");
    assert_eq!(
        (page1.query("from").as_deref(), page1.query("to").as_deref(), page1.query("dir").as_deref()),
        (Some("p103"), Some("s1"), Some("b"))
    );
    let state = harness.adapter.export_state().into_result().unwrap();
    assert!(state.data.contains("\"since\":\"s1\""), "since waits: {}", state.data);
    let actions = harness
        .feed(answer(
            &page1,
            200,
            json!({"chunk": [text("$102", ALICE, "m102"), text("$101", ALICE, "m101")], "end": "p101"}),
        ))
        .unwrap();
    let page2 = request_to(&actions, "/messages");
    assert_eq!(page2.query("from").as_deref(), Some("p101"));
    let actions =
        harness.feed(answer(&page2, 200, json!({"chunk": [text("$100", ALICE, "m100")], "end": "p100"}))).unwrap();
    let page3 = request_to(&actions, "/messages");
    let actions = harness.feed(answer(&page3, 200, json!({"chunk": [], "start": "p100"}))).unwrap();
    let passed: Vec<String> = inbound(&actions).iter().map(|m| m.message_id.to_string()).collect();
    assert_eq!(passed, ["$100", "$101", "$102", "$103"], "oldest first, the gap before the timeline");
    assert_eq!(next_sync(&actions).query("since").as_deref(), Some("s2"));
}

#[test]
fn threads_are_kept_and_replies_in_them_point_at_the_message() {
    let mut threaded = text("$t2", ALICE, "@switchboard:localhost summarise");
    threaded["content"]["m.relates_to"] = json!({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true,
                                                  "m.in_reply_to": {"event_id": "$t1"}});
    let (mut harness, poll) = syncing(&config(json!({})), json!({"!r:x": room(3, false, vec![])}));
    let new = sync_answer("s2", json!({"!r:x": {"timeline": {"events": [threaded]}}}));
    let passed = inbound(&harness.feed(answer(&poll, 200, new)).unwrap());
    assert_eq!((passed[0].thread_root_id.as_str(), passed[0].text.as_str()), ("$root", "summarise"));

    let actions = harness.feed(reply(7, "!r:x", "$root", "the summary")).unwrap();
    let send = request_to(&actions, "/send/m.room.message/");
    let content = send.json();
    assert_eq!(
        content["m.relates_to"],
        json!({"rel_type": "m.thread", "event_id": "$root", "is_falling_back": true, "m.in_reply_to": {"event_id": "$t2"}})
    );
    assert_eq!(content["msgtype"], "m.notice");
    assert_eq!(content["body"], "the summary");
}

fn reply(reply_id: u64, room: &str, root: &str, text: &str) -> Event {
    Event::DeliverReply(OutboundReply {
        reply_id,
        session_key: "agent:main:matrix:group:x".into(),
        target: ReplyTarget::new(room, root),
        text: text.into(),
    })
}

fn sent(actions: &[Action]) -> Vec<Request> {
    requests(actions).into_iter().filter(|r| r.url.contains("/send/m.room.message/")).collect()
}

/// The transaction id of a send.
fn txn(request: &Request) -> String {
    request.url.rsplit('/').next().unwrap().to_string()
}

#[test]
fn long_replies_go_out_in_parts_with_transaction_ids_of_the_reply() {
    let (mut harness, _) = syncing(&config(json!({})), json!({}));
    let text = format!("{}\n\n{}", "a".repeat(12_000), "b".repeat(12_000));
    let first = sent(&harness.feed(reply(42, "!r:x", "", &text)).unwrap());
    assert_eq!(first.len(), 1, "one part at a time");
    assert_eq!(first[0].method, "PUT");
    assert!(first[0]
        .url
        .starts_with("http://127.0.0.1:8008/_matrix/client/v3/rooms/%21r%3Ax/send/m.room.message/switchboard-"));
    assert!(txn(&first[0]).ends_with("-42-0"), "{}", txn(&first[0]));
    assert_eq!(first[0].json()["body"].as_str().unwrap(), "a".repeat(12_000));
    assert!(first[0].json().get("m.relates_to").is_none());
    let second = sent(&harness.feed(answer(&first[0], 200, json!({"event_id": "$part0"}))).unwrap());
    assert!(txn(&second[0]).ends_with("-42-1"));
    assert_eq!(second[0].json()["body"].as_str().unwrap(), "b".repeat(12_000));
    let done = harness.feed(answer(&second[0], 200, json!({"event_id": "$part1"}))).unwrap();
    assert!(done.iter().any(|a| matches!(a, Action::ReplyDelivered { reply_id: 42, platform_message_id } if platform_message_id.as_str() == "$part0")), "{done:?}");
}

#[test]
fn a_rate_limited_reply_waits_as_told_and_the_next_one_waits_behind_it() {
    let (mut harness, _) = syncing(&config(json!({})), json!({}));
    let first = sent(&harness.feed(reply(1, "!r:x", "", "first")).unwrap());
    assert!(sent(&harness.feed(reply(2, "!r:x", "", "second")).unwrap()).is_empty(), "the second waits for the first");
    let other_room = sent(&harness.feed(reply(3, "!other:x", "", "elsewhere")).unwrap());
    assert_eq!(other_room.len(), 1, "another room does not wait");

    let limited = json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": 4707});
    let actions = harness.feed(answer(&first[0], 429, limited)).unwrap();
    let Some(Action::SetTimer { timer, after_ms: 4707 }) =
        actions.iter().find(|a| matches!(a, Action::SetTimer { .. }))
    else {
        panic!("a timer of retry_after_ms: {actions:?}")
    };
    assert!(sent(&actions).is_empty());
    let again = sent(&harness.feed(Event::TimerFired { timer: *timer }).unwrap());
    assert_eq!(txn(&again[0]), txn(&first[0]), "the same transaction id: a repeat posts once");
    let actions = harness.feed(answer(&again[0], 200, json!({"event_id": "$1"}))).unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::ReplyDelivered { reply_id: 1, .. })));
    let second = sent(&actions);
    assert_eq!(second[0].json()["body"], "second", "then the second, in order");
}

#[test]
fn failures_are_retried_then_given_back_and_a_refused_reply_is_not_retried() {
    let (mut harness, _) = syncing(&config(json!({})), json!({}));
    let mut attempt = sent(&harness.feed(reply(5, "!r:x", "", "hello")).unwrap()).remove(0);
    let first_txn = txn(&attempt);
    for round in 1..5 {
        let actions =
            harness.feed(Event::HttpFailed { request: attempt.id, error: "connection reset".into() }).unwrap();
        let timer =
            actions.iter().find_map(|a| if let Action::SetTimer { timer, .. } = a { Some(*timer) } else { None });
        attempt = sent(&harness.feed(Event::TimerFired { timer: timer.expect("a backoff timer") }).unwrap()).remove(0);
        assert_eq!(txn(&attempt), first_txn, "attempt {round} repeats the transaction");
    }
    let actions = harness.feed(answer(&attempt, 502, json!({}))).unwrap();
    assert!(
        actions.iter().any(|a| matches!(a, Action::ReplyFailed { reply_id: 5, retryable: true, .. })),
        "{actions:?}"
    );

    let forbidden = sent(&harness.feed(reply(6, "!r:x", "", "not allowed")).unwrap()).remove(0);
    let actions = harness.feed(answer(&forbidden, 403, json!({"errcode": "M_FORBIDDEN"}))).unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::ReplyFailed { reply_id: 6, retryable: false, .. })));
}

#[test]
fn a_refused_token_makes_the_adapter_unhealthy_without_showing_the_token() {
    let (mut harness, first) = signed_in(&config(json!({})));
    let refused = json!({"errcode": "M_UNKNOWN_TOKEN", "error": "Invalid access token passed.", "soft_logout": false});
    let actions = harness.feed(answer(&first, 401, refused)).unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::Health { healthy: false, .. })), "{actions:?}");
    let logs: Vec<String> = actions
        .iter()
        .filter_map(
            |a| if let Action::Log { level, message } = a { Some(format!("{level:?} {message}")) } else { None },
        )
        .collect();
    assert!(logs.iter().any(|l| l.starts_with("Error") && l.contains("MATRIX_ACCESS_TOKEN")), "{logs:?}");
    for action in &actions {
        if let Action::Health { detail, .. } | Action::Log { message: detail, .. } = action {
            assert!(!detail.contains(TOKEN), "the token shows in {detail}");
        }
    }
    let timer = actions.iter().find_map(|a| if let Action::SetTimer { timer, .. } = a { Some(*timer) } else { None });
    let retry = next_sync(&harness.feed(Event::TimerFired { timer: timer.expect("a retry timer") }).unwrap());
    let actions = harness.feed(answer(&retry, 200, sync_answer("s1", json!({})))).unwrap();
    assert!(actions.iter().any(|a| matches!(a, Action::Health { healthy: true, .. })));
    let _ = LogLevel::Error;
}

#[test]
fn server_errors_back_off_and_resume_from_the_same_since() {
    let (mut harness, poll) = syncing(&config(json!({})), json!({}));
    let mut waits = Vec::new();
    let mut request = poll;
    for _ in 0..4 {
        let actions = harness.feed(answer(&request, 502, json!({}))).unwrap();
        let (timer, wait) = actions
            .iter()
            .find_map(|a| if let Action::SetTimer { timer, after_ms } = a { Some((*timer, *after_ms)) } else { None })
            .unwrap();
        waits.push(wait);
        request = next_sync(&harness.feed(Event::TimerFired { timer }).unwrap());
        assert_eq!(request.query("since").as_deref(), Some("s1"));
    }
    assert!(waits.windows(2).all(|w| w[1] > w[0]), "the waits grow: {waits:?}");
}

/// Generation 1 with a `/sync` in flight from `s1`, handed over warm to generation 2 with `config`.
fn swapped_mid_sync(config2: &str) -> (Harness, Request, Vec<Action>) {
    let (first, poll) = syncing(&config(json!({"chatmode": "oncall"})), json!({"!r:x": room(3, false, vec![])}));
    let host = first.host.clone();
    let (state, shutdown) = first.hand_over().unwrap();
    assert!(common::requests(&shutdown).is_empty());
    let handover =
        Handover { generation: 2, previous_state: Some(state).into(), connections: Default::default(), cold: false };
    let (second, started) = Harness::start_with::<MatrixAdapter>(host, config2, handover).unwrap();
    (second, poll, started)
}

#[test]
fn a_warm_successor_takes_over_the_sync_in_flight_with_no_gap_and_nothing_twice() {
    let (mut second, poll, started) = swapped_mid_sync(&config(json!({"chatmode": "onmessage"})));
    assert!(requests(&started).is_empty(), "no new request: the predecessor's sync is still in flight: {started:?}");
    let new =
        sync_answer("s2", json!({"!r:x": {"timeline": {"events": [text("$during", ALICE, "sent during the swap")]}}}));
    let actions = second.feed(answer(&poll, 200, new.clone())).unwrap();
    let passed = inbound(&actions);
    assert_eq!(passed.len(), 1, "answered by the successor with its config (onmessage)");
    assert_eq!(passed[0].message_id, "$during");
    let next = next_sync(&actions);
    assert_eq!(next.query("since").as_deref(), Some("s2"));
    // The same answer again (a duplicate delivery) is not a request in flight any more.
    assert!(inbound(&second.feed(answer(&poll, 200, new)).unwrap()).is_empty());
}

#[test]
fn a_cold_start_resumes_from_the_stored_since_and_forgets_the_old_requests() {
    let (mut first, poll) = syncing(&config(json!({"chatmode": "onmessage"})), json!({"!r:x": room(3, false, vec![])}));
    let state: StateBlob = first.adapter.export_state().into_result().unwrap();
    drop(first);
    let handover =
        Handover { generation: 1, previous_state: Some(state).into(), connections: Default::default(), cold: true };
    let (mut second, actions) =
        Harness::start_with::<MatrixAdapter>(host(), &config(json!({"chatmode": "onmessage"})), handover).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    let actions = second.feed(answer(&whoami, 200, json!({"user_id": BOT}))).unwrap();
    let resumed = next_sync(&actions);
    assert_eq!(resumed.query("since").as_deref(), Some("s1"), "no initial sync: the saved position");
    assert_eq!(resumed.query("timeout").as_deref(), Some("30000"));
    // An answer to the old process's request is not taken for the new one.
    let stale = sync_answer("s9", json!({"!r:x": {"timeline": {"events": [text("$x", ALICE, "x")]}}}));
    assert_ne!(poll.id, resumed.id);
    assert!(inbound(&second.feed(answer(&poll, 200, stale)).unwrap()).is_empty());
    let fresh = sync_answer("s2", json!({"!r:x": {"timeline": {"events": [text("$down", ALICE, "sent while down")]}}}));
    assert_eq!(inbound(&second.feed(answer(&resumed, 200, fresh)).unwrap())[0].message_id, "$down");
}

#[test]
fn a_state_of_another_account_is_not_resumed() {
    let (mut first, _) = syncing(&config(json!({})), json!({}));
    let state = first.adapter.export_state().into_result().unwrap();
    let handover =
        Handover { generation: 1, previous_state: Some(state).into(), connections: Default::default(), cold: true };
    let other = config(json!({"user_id": "@other:localhost"}));
    let (mut second, actions) = Harness::start_with::<MatrixAdapter>(host(), &other, handover).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    let actions = second.feed(answer(&whoami, 200, json!({"user_id": "@other:localhost"}))).unwrap();
    assert_eq!(next_sync(&actions).query("since"), None, "a first sync for the other account");
}

#[test]
fn typing_is_shown_while_an_agent_works_and_cleared_after_the_reply() {
    let (mut harness, _) = syncing(&config(json!({})), json!({}));
    let actions = harness.feed(Event::AgentWorking { target: ReplyTarget::new("!r:x", "") }).unwrap();
    let typing = request_to(&actions, "/typing/");
    assert_eq!(typing.url, "http://127.0.0.1:8008/_matrix/client/v3/rooms/%21r%3Ax/typing/%40switchboard%3Alocalhost");
    assert_eq!(typing.json(), json!({"typing": true, "timeout": 30000}));
    let send = sent(&harness.feed(reply(1, "!r:x", "", "done")).unwrap()).remove(0);
    let actions = harness.feed(answer(&send, 200, json!({"event_id": "$1"}))).unwrap();
    assert_eq!(request_to(&actions, "/typing/").json(), json!({"typing": false}));
}

#[test]
fn conversation_of_names_the_room() {
    let (harness, _) = syncing(&config(json!({})), json!({}));
    assert_eq!(harness.conversation_of(&reply(1, "!r:x", "", "x")).unwrap().as_deref(), Some("!r:x"));
    assert_eq!(harness.conversation_of(&Event::TimerFired { timer: 1 }).unwrap(), None);
}

#[test]
fn a_v1_1_host_gets_calls_with_a_large_sync_limit_and_a_v1_0_host_plain_requests() {
    let (_, poll) = syncing(&config(json!({})), json!({"!r:x": room(3, false, vec![])}));
    assert_eq!(poll.max_response_bytes, Some(64 * 1024 * 1024), "a /sync may be larger than the host's 8 MiB");

    let (mut harness, actions) = Harness::start::<MatrixAdapter>(host().as_abi_v1_0(), &config(json!({}))).unwrap();
    let whoami = request_to(&actions, "/account/whoami");
    assert_eq!(whoami.max_response_bytes, None, "a v1.0 host knows no HttpCall");
    let actions = harness.feed(answer(&whoami, 200, json!({"user_id": BOT, "device_id": "GW"}))).unwrap();
    assert!(matches!(actions.iter().find(|a| !matches!(a, Action::Log { .. })), Some(Action::HttpRequest { .. })));
}

#[test]
fn a_dead_lettered_sync_answer_moves_since_past_its_messages() {
    let config = config(json!({"chatmode": "onmessage"}));
    let (mut harness, poll) = syncing(&config, json!({"!r:x": room(3, false, vec![])}));
    let poisoned = sync_answer("s2", json!({"!r:x": {"timeline": {"events": [text("$1", ALICE, "poison")]}}}));
    let skipped = Event::HttpResponseSkipped {
        request: poll.id,
        status: 200,
        headers: Default::default(),
        body: poisoned.to_string().into_bytes().into(),
    };
    let actions = harness.feed(skipped).unwrap();
    assert!(inbound(&actions).is_empty(), "nothing of the skipped answer is passed on");
    assert_eq!(next_sync(&actions).query("since").as_deref(), Some("s2"), "the next sync starts past it");
    let state = harness.adapter.export_state().into_result().unwrap();
    assert!(state.data.contains("\"since\":\"s2\""), "{}", state.data);
}
