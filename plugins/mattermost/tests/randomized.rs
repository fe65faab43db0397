//! Randomized input from outside — WebSocket frames and HTTP answers as a server (or anything
//! pretending to be one) could send them — through the adapter behind the guarded ABI wrapper:
//! no case may panic (a panic comes back as an error from the harness), and garbage is said
//! in a log line, never acted on as a message. Run with `PROPTEST_CASES=N` for more cases.

mod common;

use common::{signed_in, BOT};
use proptest::prelude::*;
use serde_json::{json, Value};
use switchboard_plugin_api::{Action, Event, Header, OutboundReply, ReplyTarget};

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A post-shaped object whose fields are each right, wrong-typed or missing.
fn post() -> impl Strategy<Value = Value> {
    let field = |right: Value| prop_oneof![Just(Some(right)), json_value().prop_map(Some), Just(None)];
    (
        field(json!("p1")),
        field(json!("u1")),
        field(json!("c1")),
        field(json!("hello @switchboard-bot")),
        field(json!("")),
        field(json!(1_700_000_000_000i64)),
        field(json!({"from_bot": "true"})),
    )
        .prop_map(|(id, user, channel, message, kind, create_at, props)| {
            let mut post = serde_json::Map::new();
            for (key, value) in [
                ("id", id),
                ("user_id", user),
                ("channel_id", channel),
                ("message", message),
                ("type", kind),
                ("create_at", create_at),
                ("props", props),
            ] {
                if let Some(value) = value {
                    post.insert(key.into(), value);
                }
            }
            Value::Object(post)
        })
}

/// Frames: text, any JSON, and events the adapter reads with parts of them wrong.
fn frame() -> impl Strategy<Value = String> {
    let names = prop_oneof![
        Just("posted"),
        Just("hello"),
        Just("post_edited"),
        Just("post_deleted"),
        Just("reaction_added"),
        Just("typing")
    ];
    prop_oneof![
        ".{0,200}",
        json_value().prop_map(|v| v.to_string()),
        (names, any::<Option<i64>>(), post(), json_value(), prop_oneof![Just("O"), Just("D"), Just("G"), Just("P")])
            .prop_map(|(event, seq, post, extra, kind)| {
                json!({"event": event, "seq": seq, "broadcast": extra,
                       "data": {"post": post.to_string(), "channel_type": kind, "sender_name": "@alice",
                                "mentions": json!([BOT]).to_string(), "connection_id": "conn2"}})
                .to_string()
            }),
        (any::<Option<i64>>(), json_value())
            .prop_map(|(seq, error)| { json!({"status": "FAIL", "seq_reply": seq, "error": error}).to_string() }),
    ]
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![Just(200u16), Just(201), Just(400), Just(401), Just(429), Just(500), 100u16..600]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_frame_makes_the_adapter_panic(frames in prop::collection::vec(frame(), 1..8)) {
        let mut harness = signed_in("onmessage");
        for text in frames {
            let actions = harness.feed(Event::WsFrame { conn: 1, text: text.into() });
            prop_assert!(actions.is_ok(), "panicked: {actions:?}");
        }
    }

    #[test]
    fn no_http_answer_makes_the_adapter_panic(
        status in status(),
        body in prop_oneof![".{0,200}".boxed(), json_value().prop_map(|v| v.to_string()).boxed(),
                            post().prop_map(|p| json!({"order": ["p1"], "posts": {"p1": p}}).to_string()).boxed()],
        retry_after in prop::option::of(".{0,8}"),
    ) {
        let mut harness = signed_in("onmessage");
        let reply = OutboundReply {
            reply_id: 1,
            session_key: "agent:main:mattermost:channel:c1".into(),
            target: ReplyTarget::new("c1", "root1"),
            text: "hello".into(),
        };
        let actions = harness.feed(Event::DeliverReply(reply)).unwrap();
        let request = actions.iter().find_map(|a| match a {
            Action::HttpRequest { request, .. } => Some(*request),
            _ => None,
        });
        prop_assert!(request.is_some());
        let headers: Vec<Header> =
            retry_after.into_iter().map(|v| Header { name: "Retry-After".into(), value: v.into() }).collect();
        let answer = Event::HttpResponse { request: request.unwrap(), status, headers: headers.into(), body: body.into() };
        prop_assert!(harness.feed(answer).is_ok());
    }

    #[test]
    fn no_config_makes_validation_panic(config in prop_oneof![".{0,120}".boxed(), json_value().prop_map(|v| v.to_string()).boxed()]) {
        let outcome = std::panic::catch_unwind(|| switchboard_mattermost::settings::parse(&config));
        prop_assert!(outcome.is_ok());
        if let Ok(Err(problems)) = outcome {
            prop_assert!(!problems.is_empty());
            prop_assert!(problems.iter().all(|p| !p.message.is_empty()));
        }
    }
}
