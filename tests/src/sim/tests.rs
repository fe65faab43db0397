//! The simulator's own checks against MATTERMOST.md, over real loopback sockets.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::{
    tungstenite::{client::IntoClientRequest, Message},
    MaybeTlsStream, WebSocketStream,
};

use super::*;
use model::new_id;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn ws_url(sim: &Simulator, query: &str) -> String {
    format!("{}/api/v4/websocket{query}", sim.base_url().replace("http://", "ws://"))
}

async fn connect(sim: &Simulator, token: Option<&str>, query: &str) -> Socket {
    let mut request = ws_url(sim, query).into_client_request().unwrap();
    if let Some(token) = token {
        request.headers_mut().insert("Authorization", format!("BEARER {token}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// The next JSON text frame, or `None` if the socket closed or stayed silent for 2 s.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await.ok()?? {
            Ok(Message::Text(text)) => return serde_json::from_str(text.as_str()).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

#[tokio::test]
async fn challenge_auth_gets_hello_before_the_ok_reply_and_replies_do_not_consume_seq() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut socket = connect(&sim, None, "").await;
    let challenge = json!({"seq": 1, "action": "authentication_challenge", "data": {"token": world.alice.token}});
    socket.send(Message::Text(challenge.to_string().into())).await.unwrap();
    let hello = next_json(&mut socket).await.unwrap();
    assert_eq!(hello["event"], "hello");
    assert_eq!(hello["seq"], 0);
    assert_eq!(hello["broadcast"]["user_id"], world.alice.id.as_str());
    assert_eq!(next_json(&mut socket).await.unwrap(), json!({"status": "OK", "seq_reply": 1}));
    socket.send(Message::Text(json!({"seq": 2, "action": "ping"}).to_string().into())).await.unwrap();
    let pong = next_json(&mut socket).await.unwrap();
    assert_eq!(pong["seq_reply"], 2);
    assert_eq!(pong["data"]["text"], "pong");
    sim.post_as(&world.bob.id, &world.office_general, "hi", None);
    assert_eq!(next_json(&mut socket).await.unwrap()["seq"], 1, "the ping reply did not consume a seq");
}

#[tokio::test]
async fn a_bad_challenge_token_closes_the_socket() {
    let sim = Simulator::start().await.unwrap();
    let mut socket = connect(&sim, None, "").await;
    let challenge = json!({"seq": 1, "action": "authentication_challenge", "data": {"token": "nope"}});
    socket.send(Message::Text(challenge.to_string().into())).await.unwrap();
    assert_eq!(next_json(&mut socket).await, None);
}

#[tokio::test]
async fn posted_reaches_the_author_and_mentions_only_the_mentioned_recipient() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut bot = connect(&sim, Some(&world.bot.token), "").await;
    let mut alice = connect(&sim, Some(&world.alice.token), "").await;
    assert_eq!(next_json(&mut bot).await.unwrap()["event"], "hello");
    assert_eq!(next_json(&mut alice).await.unwrap()["event"], "hello");
    sim.post_as(&world.alice.id, &world.office_general, "hey @switchboard-bot", None);
    let to_bot = next_json(&mut bot).await.unwrap();
    let to_alice = next_json(&mut alice).await.unwrap();
    assert_eq!(to_bot["event"], "posted");
    assert_eq!(to_alice["event"], "posted", "the author gets her own post");
    let post: Value = serde_json::from_str(to_bot["data"]["post"].as_str().unwrap()).unwrap();
    assert_eq!(post["message"], "hey @switchboard-bot");
    assert_eq!(to_bot["data"]["mentions"], json!([world.bot.id]).to_string());
    assert!(to_alice["data"].get("mentions").is_none());
    assert_eq!(to_bot["data"]["channel_type"], "O");
    assert_eq!(to_bot["broadcast"]["channel_id"], world.office_general.as_str());

    sim.post_as(&world.alice.id, &world.alice_dm, "psst", None);
    let dm = next_json(&mut bot).await.unwrap();
    assert_eq!(dm["data"]["channel_type"], "D");
    assert_eq!(dm["data"]["channel_display_name"], "@alice");
    assert_eq!(dm["data"]["team_id"], "");
    assert_eq!(dm["data"]["mentions"], json!([world.bot.id]).to_string());
}

#[tokio::test]
async fn rest_posts_follow_the_server_rules() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let client = reqwest::Client::new();
    let url = format!("{}/api/v4/posts", sim.base_url());
    let post = |body: Value| {
        client.post(&url).header("Authorization", format!("Bearer {}", world.bot.token)).json(&body).send()
    };

    let created =
        post(json!({"channel_id": world.office_general, "message": "hello", "pending_post_id": "p1"})).await.unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["content-type"], "application/json");
    let created: Value = created.json().await.unwrap();
    let again: Value = post(json!({"channel_id": world.office_general, "message": "hello", "pending_post_id": "p1"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["id"], created["id"], "a repeated pending_post_id is not posted twice");
    assert_eq!(sim.posts_by(&world.bot.id).len(), 1);

    let too_long = post(json!({"channel_id": world.office_general, "message": "x".repeat(16384)})).await.unwrap();
    assert_eq!(too_long.status(), 400);
    let body: Value = too_long.json().await.unwrap();
    assert_eq!(body["id"], "model.post.is_valid.message_length.app_error");

    sim.fail_next_posts(1, 429);
    let limited = post(json!({"channel_id": world.office_general, "message": "later"})).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(limited.text().await.unwrap(), "limit exceeded\n");

    let anonymous = client.get(format!("{}/api/v4/users/me", sim.base_url())).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body["id"], "api.context.session_expired.app_error");
}

#[tokio::test]
async fn a_dropped_connection_resumes_with_its_id_and_gets_the_missed_events() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let mut bot = connect(&sim, Some(&world.bot.token), "").await;
    let hello = next_json(&mut bot).await.unwrap();
    let connection_id = hello["data"]["connection_id"].as_str().unwrap().to_string();
    sim.post_as(&world.alice.id, &world.office_general, "one", None);
    assert_eq!(next_json(&mut bot).await.unwrap()["seq"], 1);

    sim.drop_connections();
    sim.post_as(&world.alice.id, &world.office_general, "two (while away)", None);
    let mut resumed =
        connect(&sim, Some(&world.bot.token), &format!("?connection_id={connection_id}&sequence_number=2")).await;
    let missed = next_json(&mut resumed).await.unwrap();
    assert_eq!(missed["event"], "posted", "no hello on a resume");
    assert_eq!(missed["seq"], 2);
    assert_eq!(sim.resumed_connections(), 1);

    // Asking for a seq the server no longer has: a new connection id and a hello.
    sim.drop_connections();
    let mut fresh =
        connect(&sim, Some(&world.bot.token), &format!("?connection_id={connection_id}&sequence_number=99")).await;
    let hello = next_json(&mut fresh).await.unwrap();
    assert_eq!(hello["event"], "hello");
    assert_ne!(hello["data"]["connection_id"], connection_id.as_str());
    assert_eq!(sim.ws_connections_opened(), 3);
}

async fn rest(sim: &Simulator, method: reqwest::Method, token: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut request = client
        .request(method, format!("{}/api/v4{path}", sim.base_url()))
        .header("Authorization", format!("Bearer {token}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn get(sim: &Simulator, token: &str, path: &str) -> (u16, Value) {
    rest(sim, reqwest::Method::GET, token, path, None).await
}

fn post_of(event: &Value) -> Value {
    serde_json::from_str(event["data"]["post"].as_str().expect("data.post is a JSON string")).unwrap()
}

fn order_of(list: &Value) -> Vec<String> {
    list["order"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

/// Connect with a header token and read the `hello`; returns the socket and its connection id.
async fn connect_hello(sim: &Simulator, token: &str, query: &str) -> (Socket, String) {
    let mut socket = connect(sim, Some(token), query).await;
    let hello = next_json(&mut socket).await.unwrap();
    assert_eq!(hello["event"], "hello", "{hello}");
    let id = hello["data"]["connection_id"].as_str().unwrap().to_string();
    (socket, id)
}

#[tokio::test]
async fn posts_carry_the_server_fields_and_channels_their_last_post_at() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let post = sim.post_as(&world.alice.id, &world.office_general, "hello", None);
    let json = post.to_json();
    for key in ["update_at", "edit_at", "delete_at", "is_pinned", "type", "reply_count", "last_reply_at"] {
        assert!(json.get(key).is_some(), "{key} in {json}");
    }
    assert_eq!(json["type"], "");
    assert_eq!(json["update_at"], post.create_at);
    let (status, channel) = get(&sim, &world.alice.token, &format!("/channels/{}", world.office_general)).await;
    assert_eq!(status, 200);
    assert_eq!(channel["last_post_at"], post.create_at);
    // JSON written before the new fields still reads.
    let old = json!({"id": "x", "channel_id": "c", "user_id": "u", "root_id": "", "message": "m",
                     "create_at": 5, "pending_post_id": ""});
    let old: SimPost = serde_json::from_value(old).unwrap();
    assert_eq!((old.update_at, old.kind.as_str(), old.is_pinned), (0, "", false));
}

#[tokio::test]
async fn edits_deletes_reactions_pins_and_replies_move_update_at_and_are_broadcast() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let (mut bot, _) = connect_hello(&sim, &world.bot.token, "").await;
    let post = sim.post_as(&world.alice.id, &world.office_general, "first", None);
    assert_eq!(next_json(&mut bot).await.unwrap()["event"], "posted");
    let mut last = post.update_at;
    let mut moved = |sim: &Simulator, what: &str| {
        let now = sim.post(&post.id).unwrap().update_at;
        assert!(now > last, "{what} moves update_at ({now} > {last})");
        last = now;
    };

    let patch = Some(json!({"message": "first (edited)"}));
    let (status, edited) =
        rest(&sim, reqwest::Method::PUT, &world.alice.token, &format!("/posts/{}/patch", post.id), patch.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(edited["message"], "first (edited)");
    assert!(edited["edit_at"].as_i64().unwrap() > 0);
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["event"], "post_edited");
    assert_eq!(post_of(&event)["message"], "first (edited)");
    moved(&sim, "an edit");
    let (status, _) =
        rest(&sim, reqwest::Method::PUT, &world.bob.token, &format!("/posts/{}/patch", post.id), patch).await;
    assert_eq!(status, 403, "only the author edits");

    let reaction = json!({"user_id": world.bob.id, "post_id": post.id, "emoji_name": "tada"});
    let (status, body) = rest(&sim, reqwest::Method::POST, &world.bob.token, "/reactions", Some(reaction)).await;
    assert_eq!(status, 201);
    assert_eq!(body["emoji_name"], "tada");
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["event"], "reaction_added");
    let reaction: Value = serde_json::from_str(event["data"]["reaction"].as_str().unwrap()).unwrap();
    assert_eq!(
        (reaction["user_id"].as_str(), reaction["emoji_name"].as_str()),
        (Some(world.bob.id.as_str()), Some("tada"))
    );
    assert!(sim.post(&post.id).unwrap().has_reactions);
    moved(&sim, "a reaction");

    sim.pin_post(&post.id).unwrap();
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["event"], "post_edited");
    assert_eq!(post_of(&event)["is_pinned"], true);
    moved(&sim, "a pin");

    let reply = sim.post_as(&world.bob.id, &world.office_general, "a reply", Some(&post.id));
    next_json(&mut bot).await.unwrap();
    let root = sim.post(&post.id).unwrap();
    assert_eq!((root.reply_count, root.last_reply_at), (1, reply.create_at));
    moved(&sim, "a reply");

    let (status, body) =
        rest(&sim, reqwest::Method::DELETE, &world.alice.token, &format!("/posts/{}", post.id), None).await;
    assert_eq!((status, body), (200, json!({"status": "OK"})));
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["event"], "post_deleted");
    assert_eq!(event["broadcast"]["contains_sanitized_data"], true);
    assert!(post_of(&event)["delete_at"].as_i64().unwrap() > 0);
    moved(&sim, "a delete");
    assert!(sim.post(&reply.id).unwrap().delete_at > 0, "deleting a root deletes its thread");
    assert_eq!(sim.posts_in(&world.office_general).len(), 2, "deleted posts stay in the store");
    let (status, _) = get(&sim, &world.alice.token, &format!("/posts/{}", post.id)).await;
    assert_eq!(status, 404);
    assert!(sim.edit_post(&post.id, "too late").is_none());
}

#[tokio::test]
async fn since_returns_what_changed_deleted_posts_roots_and_an_arbitrary_limited_set() {
    let options = SimOptions { since_limit: 5, ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let old = sim.post_as(&world.alice.id, &world.office_general, "old root", None);
    let before = sim.post_as(&world.alice.id, &world.office_general, "old, untouched", None);
    let since = before.create_at;
    let reply = sim.post_as(&world.bob.id, &world.office_general, "new reply", Some(&old.id));
    let edited = sim.post_as(&world.alice.id, &world.office_general, "to edit", None);
    let deleted = sim.post_as(&world.alice.id, &world.office_general, "to delete", None);
    sim.edit_post(&edited.id, "edited").unwrap();
    sim.delete_post(&deleted.id).unwrap();

    let path = format!("/channels/{}/posts?since={since}", world.office_general);
    let (status, list) = get(&sim, &world.bot.token, &path).await;
    assert_eq!(status, 200);
    let order = order_of(&list);
    // The old root moved (a reply), so it matched too; the untouched old post did not.
    assert_eq!(order, vec![deleted.id.clone(), edited.id.clone(), reply.id.clone(), old.id.clone()]);
    assert!(list["posts"][&deleted.id]["delete_at"].as_i64().unwrap() > 0, "deleted posts included");
    assert!(list["posts"].get(&before.id).is_none());
    assert_eq!((list["next_post_id"].as_str(), list["prev_post_id"].as_str()), (Some(""), Some("")));

    // A reply whose root did not change: the root is in `posts`, not in `order`.
    let since = sim.post(&deleted.id).unwrap().update_at;
    let late = sim.post_as(&world.bob.id, &world.office_general, "late reply", Some(&edited.id));
    let root_update = sim.post(&edited.id).unwrap().update_at;
    assert_eq!(root_update, late.create_at);
    let (_, list) =
        get(&sim, &world.bot.token, &format!("/channels/{}/posts?since={since}", world.office_general)).await;
    assert_eq!(order_of(&list), vec![late.id.clone(), edited.id.clone()]);
    // Only the reply changed since: its root is in `posts` but not in `order`.
    sim.edit_post(&late.id, "late reply (edited)").unwrap();
    let (_, list) =
        get(&sim, &world.bot.token, &format!("/channels/{}/posts?since={root_update}", world.office_general)).await;
    assert_eq!(order_of(&list), vec![late.id.clone()]);
    assert!(list["posts"].get(&edited.id).is_some(), "the root of a returned reply is added");

    // More matches than the limit: an arbitrary `since_limit` of them, not (always) the newest.
    let channel = sim.add_channel(&world.team_id, "busy", "Busy", ChannelType::Open);
    sim.add_member(&channel, &world.bot.id);
    let posts: Vec<SimPost> = (0..30).map(|i| sim.post_as(&world.bot.id, &channel, &format!("p{i}"), None)).collect();
    let newest: Vec<String> = posts.iter().rev().take(5).map(|p| p.id.clone()).collect();
    let mut all_newest = true;
    for _ in 0..4 {
        let (_, list) = get(&sim, &world.bot.token, &format!("/channels/{channel}/posts?since=0")).await;
        let order = order_of(&list);
        assert_eq!(order.len(), 5);
        let times: Vec<i64> = order.iter().map(|id| list["posts"][id]["create_at"].as_i64().unwrap()).collect();
        assert!(times.windows(2).all(|w| w[0] > w[1]), "order is create_at descending");
        all_newest &= order == newest;
    }
    assert!(!all_newest, "the limited set is arbitrary, not the newest");
    assert_eq!(sim.posts_queries(&channel), 4);

    let outsider = sim.add_user("outsider", false);
    let (status, body) = get(&sim, &outsider.token, &format!("/channels/{channel}/posts?since=0")).await;
    assert_eq!(status, 403);
    assert_eq!(body["id"], "api.context.permissions.app_error");
}

#[tokio::test]
async fn pages_and_cursors_are_newest_first_without_deleted_posts() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let channel = world.office_general.clone();
    let posts: Vec<SimPost> = (0..10).map(|i| sim.post_as(&world.alice.id, &channel, &format!("p{i}"), None)).collect();
    sim.delete_post(&posts[8].id).unwrap();
    let ids = |range: &[usize]| range.iter().map(|&i| posts[i].id.clone()).collect::<Vec<_>>();
    let page = |query: String| {
        let sim = &sim;
        let token = world.bot.token.clone();
        let channel = channel.clone();
        async move { get(sim, &token, &format!("/channels/{channel}/posts?{query}")).await.1 }
    };

    let first = page("per_page=3".into()).await;
    assert_eq!(order_of(&first), ids(&[9, 7, 6]), "deleted posts are left out");
    assert_eq!(first["posts"].as_object().unwrap().len(), 3);
    assert_eq!(first["prev_post_id"], posts[5].id.as_str());
    assert_eq!(order_of(&page("per_page=3&page=1".into()).await), ids(&[5, 4, 3]));
    assert_eq!(order_of(&page(format!("per_page=2&before={}", posts[5].id)).await), ids(&[4, 3]));
    assert_eq!(order_of(&page(format!("per_page=2&after={}", posts[5].id)).await), ids(&[7, 6]));
    assert_eq!(order_of(&page(String::new()).await).len(), 9, "per_page defaults to 60");

    for i in 0..205 {
        sim.post_as(&world.alice.id, &channel, &format!("more {i}"), None);
    }
    assert_eq!(order_of(&page("per_page=500".into()).await).len(), 200, "per_page is at most 200");
    assert_eq!(order_of(&page(String::new()).await).len(), 60);
    assert_eq!(sim.posts_queries(&channel), 7);
}

#[tokio::test]
async fn discovery_routes_list_teams_and_channels_with_direct_and_group_channels() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let group = sim.group_channel(&[&world.bot.id, &world.alice.id, &world.bob.id]);
    let other_team = sim.add_team("elsewhere");
    sim.add_team_member(&other_team, &world.bot.id);
    let elsewhere = sim.add_channel(&other_team, "elsewhere-general", "Elsewhere", ChannelType::Open);
    sim.add_member(&elsewhere, &world.bot.id);
    let post = sim.post_as(&world.alice.id, &world.alice_dm, "hi", None);

    let (status, teams) = get(&sim, &world.bot.token, "/users/me/teams").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = teams.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["elsewhere", "office"]);
    assert_eq!(teams[1]["type"], "O");
    let (_, alice_teams) = get(&sim, &world.alice.token, &format!("/users/{}/teams", world.alice.id)).await;
    assert_eq!(alice_teams.as_array().unwrap().len(), 1);

    let (status, channels) = get(&sim, &world.bot.token, &format!("/users/me/teams/{}/channels", world.team_id)).await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = channels.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    for expected in [&world.office_general, &world.protocol_evolution, &world.alice_dm, &group] {
        assert!(ids.contains(&expected.as_str()), "{expected} in {ids:?}");
    }
    assert!(!ids.contains(&elsewhere.as_str()));
    let dm = channels.as_array().unwrap().iter().find(|c| c["id"] == world.alice_dm.as_str()).unwrap();
    assert_eq!(dm["last_post_at"], post.create_at);

    let (_, all) = get(&sim, &world.bot.token, "/users/me/channels").await;
    assert_eq!(all.as_array().unwrap().len(), 5);

    let (status, _) = get(&sim, &world.alice.token, &format!("/users/{}/teams", world.bot.id)).await;
    assert_eq!(status, 403, "another user's teams");
    let (status, _) = get(&sim, &world.alice.token, &format!("/users/me/teams/{other_team}/channels")).await;
    assert_eq!(status, 403, "a team the user is not in");
}

#[tokio::test]
async fn bot_webhook_system_and_me_posts_look_like_the_server_makes_them() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let (mut bot, _) = connect_hello(&sim, &world.bot.token, "").await;
    let body = json!({"channel_id": world.office_general, "message": "from the gateway"});
    let (status, created) = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body)).await;
    assert_eq!(status, 201);
    assert_eq!(created["props"]["from_bot"], "true");
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(post_of(&event)["props"]["from_bot"], "true");
    let human = sim.post_as(&world.alice.id, &world.office_general, "human", None);
    assert!(human.props.get("from_bot").is_none());
    next_json(&mut bot).await.unwrap();

    let hook = sim.post_webhook(&world.office_general, "build failed", Some("ci"));
    assert_eq!(hook.props["from_webhook"], "true");
    assert_eq!(hook.props["override_username"], "ci");
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["event"], "posted");
    assert_eq!(event["data"]["sender_name"], "ci");
    sim.post_webhook(&world.office_general, "plain hook", None);
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["data"]["sender_name"], "@webhook-creator");

    let system = sim.post_system(&world.office_general, "system_join_channel", "carol joined the channel.");
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(event["data"]["sender_name"], "System");
    assert_eq!(post_of(&event)["type"], "system_join_channel");
    assert_eq!(system.kind, "system_join_channel");

    let spec = PostSpec { message: "waves".into(), kind: "me".into(), ..PostSpec::default() };
    sim.post_with(&world.alice.id, &world.office_general, spec);
    let event = next_json(&mut bot).await.unwrap();
    assert_eq!(post_of(&event)["type"], "me");
    assert_eq!(event["data"]["sender_name"], "@alice");
}

#[tokio::test]
async fn channel_wide_here_and_keyword_mentions_reach_the_right_recipients() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let (_bob_socket, bob_connection) = connect_hello(&sim, &world.bob.token, "").await;
    sim.drop_connections(); // bob is offline (his connection is inactive, still resumable)
    let (mut bot, _) = connect_hello(&sim, &world.bot.token, "").await;
    let mentions = |event: &Value| event["data"].get("mentions").cloned();
    let bot_mentioned = Some(Value::String(json!([world.bot.id]).to_string()));

    sim.post_as(&world.alice.id, &world.office_general, "@here standup", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), bot_mentioned, "@here: the bot is online");
    sim.post_as(&world.alice.id, &world.office_general, "@all release at noon", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), bot_mentioned);
    sim.post_as(&world.alice.id, &world.office_general, "ping @channel.", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), bot_mentioned);
    sim.post_as(&world.alice.id, &world.office_general, "@channels is not a mention", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), None);

    sim.set_mention_keys(&world.bot.id, &["Deploy"]);
    sim.post_as(&world.alice.id, &world.office_general, "the deploy is done", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), bot_mentioned, "a mention key");
    sim.post_as(&world.alice.id, &world.office_general, "redeployed", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), None, "keys are whole words");
    sim.post_as(&world.bot.id, &world.office_general, "@channel from me", None);
    assert_eq!(mentions(&next_json(&mut bot).await.unwrap()), None, "never the author");

    // Bob was offline: @all mentioned him, @here did not.
    let mut bob =
        connect(&sim, Some(&world.bob.token), &format!("?connection_id={bob_connection}&sequence_number=1")).await;
    let here = next_json(&mut bob).await.unwrap();
    assert_eq!(post_of(&here)["message"], "@here standup");
    assert_eq!(mentions(&here), None);
    let all = next_json(&mut bob).await.unwrap();
    assert_eq!(mentions(&all), Some(Value::String(json!([world.bob.id]).to_string())));
}

#[tokio::test]
async fn pending_post_ids_dedup_by_id_500_while_in_flight_and_can_be_switched_off() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let body = |pending: &str| json!({"channel_id": world.office_general, "message": "m", "pending_post_id": pending});

    sim.delay_next_posts(1, Duration::from_millis(500));
    let slow = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body("p1")));
    let repeat = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body("p1"))).await
    };
    let ((status, first), (repeat_status, repeat_body)) = tokio::join!(slow, repeat);
    assert_eq!(status, 201);
    assert_eq!(repeat_status, 500);
    assert_eq!(repeat_body["id"], "api.post.deduplicate_create_post.pending");
    let (status, again) = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body("p1"))).await;
    assert_eq!((status, &again["id"]), (201, &first["id"]));
    // The cache key is the id alone: another user's repeat gets the same post.
    let (_, other) = rest(&sim, reqwest::Method::POST, &world.alice.token, "/posts", Some(body("p1"))).await;
    assert_eq!(other["id"], first["id"]);
    assert_eq!(sim.posts_in(&world.office_general).len(), 1);

    sim.set_dedup(false);
    for _ in 0..2 {
        let (status, _) = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body("p2"))).await;
        assert_eq!(status, 201);
    }
    assert_eq!(sim.posts_in(&world.office_general).len(), 3, "without dedup every POST makes a post");

    let options = SimOptions { dedup_pending_post_ids: false, ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    for _ in 0..2 {
        let body = json!({"channel_id": world.office_general, "message": "m", "pending_post_id": "p"});
        rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body)).await;
    }
    assert_eq!(sim.posts_in(&world.office_general).len(), 2);
}

#[tokio::test]
async fn replies_need_a_live_root_in_the_same_channel() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let root = sim.post_as(&world.alice.id, &world.office_general, "root", None);
    let elsewhere = sim.post_as(&world.alice.id, &world.protocol_evolution, "other channel", None);
    let gone = sim.post_as(&world.alice.id, &world.office_general, "deleted", None);
    sim.delete_post(&gone.id).unwrap();
    let reply = |root_id: String| json!({"channel_id": world.office_general, "message": "re", "root_id": root_id});
    let (status, _) = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(reply(root.id.clone()))).await;
    assert_eq!(status, 201);
    for bad in [new_id(), elsewhere.id.clone(), gone.id.clone()] {
        let (status, body) = rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(reply(bad))).await;
        assert_eq!(status, 400);
        assert_eq!(body["id"], "api.post.create_post.root_id.app_error");
    }
}

#[tokio::test]
async fn rate_limiting_covers_every_api_route_and_the_websocket_upgrade() {
    let options = SimOptions { rate_limit: Some(RateLimit { per_sec: 1, burst: 2 }), ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let client = reqwest::Client::new();
    let me = || client.get(format!("{}/api/v4/users/me", sim.base_url())).bearer_auth(&world.bot.token).send();
    for remaining in ["2", "1", "0"] {
        let response = me().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit"], "3");
        assert_eq!(response.headers()["x-ratelimit-remaining"], remaining);
        assert!(response.headers()["x-ratelimit-reset"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    }
    let limited = me().await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["content-type"], "text/plain; charset=utf-8");
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    assert_eq!(limited.text().await.unwrap(), "limit exceeded\n");

    let mut request = ws_url(&sim, "").into_client_request().unwrap();
    request.headers_mut().insert("Authorization", format!("Bearer {}", world.bot.token).parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("the upgrade is limited too: {:?}", other.map(|_| ())),
    }
    // The simulator's own control API and in-process methods are not limited.
    let stats = client.get(format!("{}/_sim/stats", sim.base_url())).send().await.unwrap();
    assert_eq!(stats.status(), 200);
    assert!(stats.headers().get("x-ratelimit-limit").is_none());
    sim.post_as(&world.alice.id, &world.office_general, "in-process", None);
    assert_eq!(sim.throttled_count(), 2);

    sim.set_rate_limit(None);
    let response = me().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("x-ratelimit-limit").is_none());
}

#[tokio::test]
async fn a_half_open_connection_stays_active_until_its_read_deadline_then_resumes() {
    let options = SimOptions { pong_timeout: Duration::from_millis(600), ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let (_old, connection_id) = connect_hello(&sim, &world.bot.token, "").await;
    sim.half_open_drop();
    sim.post_as(&world.alice.id, &world.office_general, "lost on the wire", None);
    assert_eq!(sim.ws_connections_active(), 1, "the server has not noticed");

    // A quick reconnect: the old connection is still active, so no resume.
    let resume_query = format!("?connection_id={connection_id}&sequence_number=1");
    let (_quick, quick_id) = connect_hello(&sim, &world.bot.token, &resume_query).await;
    assert_ne!(quick_id, connection_id);
    assert_eq!(sim.resumed_connections(), 0);
    assert_eq!(sim.ws_connections_active(), 2);

    // After the read deadline the old connection is inactive (without anyone connecting).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(sim.ws_connections_active(), 1);
    let hellos = sim.hellos_sent();
    let mut resumed = connect(&sim, Some(&world.bot.token), &resume_query).await;
    let missed = next_json(&mut resumed).await.unwrap();
    assert_eq!(missed["event"], "posted", "replayed from the dead queue, no hello");
    assert_eq!(missed["seq"], 1);
    assert_eq!(post_of(&missed)["message"], "lost on the wire");
    assert_eq!(sim.resumed_connections(), 1);
    assert_eq!(sim.hellos_sent(), hellos);
}

#[tokio::test]
async fn the_reaper_removes_idle_inactive_connections() {
    let options = SimOptions {
        reap_after: Duration::from_millis(200),
        reap_interval: Duration::from_millis(100),
        ..SimOptions::default()
    };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let (_socket, connection_id) = connect_hello(&sim, &world.bot.token, "").await;
    sim.drop_connections();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (_fresh, fresh_id) =
        connect_hello(&sim, &world.bot.token, &format!("?connection_id={connection_id}&sequence_number=1")).await;
    assert_ne!(fresh_id, connection_id, "reaped: no resume");
    assert_eq!(sim.resumed_connections(), 0);
    assert_eq!(sim.hellos_sent(), 2);
}

#[tokio::test]
async fn a_full_send_queue_closes_the_connection_and_typing_is_dropped_first() {
    let options = SimOptions { send_queue: 4, ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let (mut bot, connection_id) = connect_hello(&sim, &world.bot.token, "").await;
    // On this single-threaded runtime the socket task cannot drain while we post.
    sim.post_as(&world.alice.id, &world.office_general, "one", None);
    sim.post_as(&world.alice.id, &world.office_general, "two", None);
    sim.post_as(&world.bob.id, &world.office_general, "", None);
    {
        let mut world_guard = sim.world.lock().unwrap();
        world_guard.typing(&world.alice.id, &world.office_general, "");
    }
    for event in ["posted", "posted", "posted"] {
        assert_eq!(next_json(&mut bot).await.unwrap()["event"], event, "typing dropped at half full");
    }
    for i in 0..6 {
        sim.post_as(&world.alice.id, &world.office_general, &format!("burst {i}"), None);
    }
    let mut received = 0;
    while let Some(event) = next_json(&mut bot).await {
        assert_eq!(event["event"], "posted");
        received += 1;
    }
    assert_eq!(received, 4, "the queue held 4, the fifth closed the connection");
    assert_eq!(sim.ws_connections_active(), 0);
    let (_fresh, fresh_id) =
        connect_hello(&sim, &world.bot.token, &format!("?connection_id={connection_id}&sequence_number=7")).await;
    assert_ne!(fresh_id, connection_id, "a closed-for-overflow connection cannot resume");
}

#[tokio::test]
async fn a_revoked_token_upgrades_unauthenticated_and_a_new_token_works() {
    let options = SimOptions { auth_timeout: Duration::from_millis(400), ..SimOptions::default() };
    let sim = Simulator::start_with(options).await.unwrap();
    let world = demo_world(&sim);
    let (mut open, _) = connect_hello(&sim, &world.bot.token, "").await;
    sim.revoke_token(&world.bot.id);
    assert_eq!(next_json(&mut open).await, None, "open sockets of a revoked user are closed");
    assert_eq!(sim.ws_connections_active(), 0);
    let (status, body) = get(&sim, &world.bot.token, "/users/me").await;
    assert_eq!((status, body["id"].as_str()), (401, Some("api.context.session_expired.app_error")));

    let mut socket = connect(&sim, Some(&world.bot.token), "").await;
    socket.send(Message::Text(json!({"seq": 1, "action": "ping"}).to_string().into())).await.unwrap();
    let reply = next_json(&mut socket).await.unwrap();
    assert_eq!(reply["status"], "FAIL", "no hello first: {reply}");
    assert_eq!(reply["error"]["id"], "api.web_socket_router.not_authenticated.app_error");
    assert_eq!(reply["error"]["status_code"], 401);
    let started = std::time::Instant::now();
    assert_eq!(next_json(&mut socket).await, None, "closed after auth_timeout");
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(sim.hellos_sent(), 1);

    let token = sim.issue_token(&world.bot.id);
    let (status, me) = get(&sim, &token, "/users/me").await;
    assert_eq!((status, me["id"].as_str()), (200, Some(world.bot.id.as_str())));
    connect_hello(&sim, &token, "").await;
    assert_eq!(sim.hellos_sent(), 2);
}

#[tokio::test]
async fn the_control_api_edits_deletes_reacts_and_switches_knobs() {
    let sim = Simulator::start().await.unwrap();
    let world = demo_world(&sim);
    let client = reqwest::Client::new();
    let control = |path: &str, body: Value| client.post(format!("{}/_sim/{path}", sim.base_url())).json(&body).send();
    let post = sim.post_as(&world.alice.id, &world.office_general, "x", None);
    assert_eq!(control("edit", json!({"post_id": post.id, "message": "y"})).await.unwrap().status(), 200);
    assert_eq!(sim.post(&post.id).unwrap().message, "y");
    let react = json!({"user_id": world.bob.id, "post_id": post.id, "emoji": "+1"});
    assert_eq!(control("react", react).await.unwrap().status(), 200);
    assert!(sim.post(&post.id).unwrap().has_reactions);
    assert_eq!(control("delete", json!({"post_id": post.id})).await.unwrap().status(), 200);
    assert!(sim.post(&post.id).unwrap().delete_at > 0);

    control("dedup", json!({"enabled": false})).await.unwrap();
    for _ in 0..2 {
        let body = json!({"channel_id": world.office_general, "message": "m", "pending_post_id": "same"});
        rest(&sim, reqwest::Method::POST, &world.bot.token, "/posts", Some(body)).await;
    }
    assert_eq!(sim.posts_by(&world.bot.id).len(), 2);

    control("rate_limit", json!({"per_sec": 1, "burst": 0})).await.unwrap();
    assert_eq!(get(&sim, &world.bot.token, "/users/me").await.0, 200);
    assert_eq!(get(&sim, &world.bot.token, "/users/me").await.0, 429);
    control("rate_limit", json!({})).await.unwrap();
    assert_eq!(get(&sim, &world.bot.token, "/users/me").await.0, 200);

    let (_socket, _) = connect_hello(&sim, &world.bot.token, "").await;
    assert_eq!(control("half_open_drop", json!({})).await.unwrap().status(), 200);
    assert_eq!(sim.ws_connections_active(), 1, "half-open: still active");
}
