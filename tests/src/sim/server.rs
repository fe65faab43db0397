//! The simulator's HTTP side: the REST endpoints a bot uses, the WebSocket endpoint, and the
//! `/_sim/*` control API. Auth, status codes and bodies follow MATTERMOST.md A2/A5.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{
        ws::{Message, WebSocket},
        Path, Query, State, WebSocketUpgrade,
    },
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    model::{is_valid_id, new_id, now_ms, Outgoing, SimPost, World, MAX_POST_RUNES},
    SimOptions,
};

#[derive(Clone)]
pub struct Shared {
    pub world: Arc<Mutex<World>>,
    pub options: SimOptions,
}

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/api/v4/users/me", get(users_me))
        .route("/api/v4/users/{user_id}", get(user_by_id))
        .route("/api/v4/users/{user_id}/typing", post(user_typing))
        .route("/api/v4/posts", post(create_post))
        .route("/api/v4/posts/{post_id}", get(get_post))
        .route("/api/v4/channels/{channel_id}", get(get_channel))
        .route("/api/v4/channels/{channel_id}/posts", get(channel_posts))
        .route("/api/v4/system/ping", get(|| async { Json(json!({"status": "OK"})) }))
        .route("/api/v4/websocket", get(websocket))
        .route("/api/v4/websocket/", get(websocket))
        .route("/_sim/stats", get(sim_stats))
        .route("/_sim/posts", get(sim_posts))
        .route("/_sim/post", post(sim_post))
        .route("/_sim/typing", get(sim_typing))
        .route("/_sim/drop_connections", post(sim_drop))
        .route("/_sim/fail_next_posts", post(sim_fail_next_posts))
        .fallback(|| async {
            app_error(StatusCode::NOT_FOUND, "api.context.404.app_error", "Sorry, we could not find the page.")
        })
        .with_state(shared)
}

/// The AppError body every REST error uses.
fn app_error(status: StatusCode, id: &str, message: &str) -> Response {
    let body = json!({"id": id, "message": message, "detailed_error": "", "request_id": new_id(), "status_code": status.as_u16()});
    (status, Json(body)).into_response()
}

fn unauthorized() -> Response {
    app_error(
        StatusCode::UNAUTHORIZED,
        "api.context.session_expired.app_error",
        "Invalid or expired session, please login again.",
    )
}

/// The token of a request: `Authorization: Bearer|token <t>` (case-insensitive scheme),
/// the `MMAUTHTOKEN` cookie, or `?access_token=`.
fn request_token(headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    if let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        if value.len() > 7 && value[..6].eq_ignore_ascii_case("bearer") {
            return Some(value[7..].to_string());
        }
        if value.len() > 6 && value[..5].eq_ignore_ascii_case("token") {
            return Some(value[6..].to_string());
        }
    }
    if let Some(cookies) = headers.get(header::COOKIE).and_then(|v| v.to_str().ok()) {
        for cookie in cookies.split(';') {
            if let Some(token) = cookie.trim().strip_prefix("MMAUTHTOKEN=") {
                return Some(token.to_string());
            }
        }
    }
    query.get("access_token").cloned()
}

fn caller(shared: &Shared, headers: &HeaderMap, query: &HashMap<String, String>) -> Option<String> {
    let token = request_token(headers, query)?;
    shared.world.lock().unwrap().user_by_token(&token).map(|u| u.id.clone())
}

macro_rules! authenticated {
    ($shared:expr, $headers:expr, $query:expr) => {
        match caller(&$shared, &$headers, &$query) {
            Some(user) => user,
            None => return unauthorized(),
        }
    };
}

async fn users_me(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<HashMap<String, String>>) -> Response {
    let me = authenticated!(s, headers, q);
    let world = s.world.lock().unwrap();
    Json(world.users[&me].to_json()).into_response()
}

async fn user_by_id(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(user_id): Path<String>,
) -> Response {
    let _ = authenticated!(s, headers, q);
    let world = s.world.lock().unwrap();
    match world.users.get(&user_id) {
        Some(user) => Json(user.to_json()).into_response(),
        None => app_error(StatusCode::NOT_FOUND, "app.user.missing_account.const", "Unable to find the user."),
    }
}

#[derive(Deserialize)]
struct TypingRequest {
    channel_id: String,
    #[serde(default)]
    parent_id: String,
}

async fn user_typing(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(user_id): Path<String>,
    Json(request): Json<TypingRequest>,
) -> Response {
    let me = authenticated!(s, headers, q);
    if user_id != "me" && user_id != me {
        return app_error(
            StatusCode::FORBIDDEN,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        );
    }
    s.world.lock().unwrap().typing(&me, &request.channel_id, &request.parent_id);
    Json(json!({"status": "OK"})).into_response()
}

#[derive(Deserialize)]
struct CreatePost {
    channel_id: String,
    message: String,
    #[serde(default)]
    root_id: String,
    #[serde(default)]
    pending_post_id: String,
    #[serde(default)]
    props: Value,
}

/// How long the server remembers a `pending_post_id` (`PendingPostIDsCacheTTL`, app/post.go).
const PENDING_POST_ID_TTL_MS: i64 = 30_000;

/// A post as read back from the database: `pending_post_id` is not a stored column.
fn stored(post: &SimPost) -> Value {
    let mut json = post.to_json();
    json["pending_post_id"] = json!("");
    json
}

async fn create_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: String,
) -> Response {
    let me = authenticated!(s, headers, q);
    let mut world = s.world.lock().unwrap();
    if let Some((count, status)) = world.fail_next_posts.take() {
        if count > 1 {
            world.fail_next_posts = Some((count - 1, status));
        }
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::TOO_MANY_REQUESTS {
            return (
                status,
                [
                    (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                    (header::RETRY_AFTER, "1"),
                    (header::HeaderName::from_static("x-ratelimit-limit"), "10"),
                    (header::HeaderName::from_static("x-ratelimit-remaining"), "0"),
                    (header::HeaderName::from_static("x-ratelimit-reset"), "1"),
                ],
                "limit exceeded\n",
            )
                .into_response();
        }
        return app_error(status, "app.simulated.failure.app_error", "The simulator was told to fail this request.");
    }
    let request: CreatePost = match serde_json::from_str(&body) {
        Ok(request) => request,
        Err(_) => {
            return app_error(
                StatusCode::BAD_REQUEST,
                "api.context.invalid_body_param.app_error",
                "Invalid or missing post in request body.",
            )
        }
    };
    let Some(channel) = world.channels.get(&request.channel_id) else {
        return app_error(
            StatusCode::FORBIDDEN,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        );
    };
    if !channel.members.contains(&me) {
        return app_error(
            StatusCode::FORBIDDEN,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        );
    }
    let length = request.message.chars().count();
    if length > MAX_POST_RUNES {
        let message = format!("Invalid Message property, Length={length}, MaxLength={MAX_POST_RUNES}");
        return app_error(StatusCode::BAD_REQUEST, "model.post.is_valid.message_length.app_error", &message);
    }
    if !request.root_id.is_empty()
        && !world.posts.iter().any(|p| p.id == request.root_id && p.channel_id == request.channel_id)
    {
        return app_error(
            StatusCode::BAD_REQUEST,
            "api.post.create_post.root_id.app_error",
            "Invalid RootId parameter.",
        );
    }
    // Within its cache window the server answers a repeated pending_post_id with the post it
    // already made; after that the id is forgotten and a repeat makes a new post.
    if !request.pending_post_id.is_empty() {
        let now = crate::sim::model::now_ms();
        let known = world.pending_post_ids.get(&format!("{me}\0{}", request.pending_post_id)).copied();
        if let Some(existing) =
            known.map(|index| &world.posts[index]).filter(|p| now - p.create_at < PENDING_POST_ID_TTL_MS)
        {
            return (StatusCode::CREATED, Json(existing.to_json())).into_response();
        }
    }
    let post = world.create_post(
        &me,
        &request.channel_id,
        &request.message,
        &request.root_id,
        &request.pending_post_id,
        request.props,
    );
    (StatusCode::CREATED, Json(post.to_json())).into_response()
}

async fn get_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(post_id): Path<String>,
) -> Response {
    let _ = authenticated!(s, headers, q);
    let world = s.world.lock().unwrap();
    match world.posts.iter().find(|p| p.id == post_id) {
        Some(post) => Json(stored(post)).into_response(),
        None => app_error(StatusCode::NOT_FOUND, "app.post.get.app_error", "Unable to get the post."),
    }
}

async fn get_channel(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(channel_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let world = s.world.lock().unwrap();
    match world.channels.get(&channel_id) {
        Some(channel) if channel.members.contains(&me) => Json(channel.to_json()).into_response(),
        Some(_) => app_error(
            StatusCode::FORBIDDEN,
            "api.context.permissions.app_error",
            "You do not have the appropriate permissions.",
        ),
        None => app_error(
            StatusCode::NOT_FOUND,
            "app.channel.get.existing.app_error",
            "Unable to find the existing channel.",
        ),
    }
}

async fn channel_posts(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(channel_id): Path<String>,
) -> Response {
    let _ = authenticated!(s, headers, q);
    let since: i64 = q.get("since").and_then(|v| v.parse().ok()).unwrap_or(0);
    let world = s.world.lock().unwrap();
    let posts: Vec<&SimPost> =
        world.posts.iter().filter(|p| p.channel_id == channel_id && p.create_at > since).collect();
    // Newest first, like the server's `order`.
    let order: Vec<&str> = posts.iter().rev().map(|p| p.id.as_str()).collect();
    let map: serde_json::Map<String, Value> = posts.iter().map(|p| (p.id.clone(), stored(p))).collect();
    Json(json!({"order": order, "posts": map, "next_post_id": "", "prev_post_id": ""})).into_response()
}

async fn websocket(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let refused =
        s.world.lock().unwrap().websockets_refused_until.is_some_and(|until| std::time::Instant::now() < until);
    if refused {
        return (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n").into_response();
    }
    let upgrade_user = caller(&s, &headers, &q);
    // A connection id must be a valid id with a sequence number; the server closes otherwise.
    let requested = match q.get("connection_id").filter(|c| !c.is_empty()) {
        None => Ok(None),
        Some(id) => match q.get("sequence_number").and_then(|n| n.parse::<i64>().ok()) {
            Some(seq) if is_valid_id(id) => Ok(Some((id.clone(), seq))),
            _ => Err(()),
        },
    };
    upgrade.max_message_size(8 * 1024).on_upgrade(move |socket| async move {
        match requested {
            Err(()) => {
                let (mut sink, _) = socket.split();
                let _ = sink.send(Message::Close(None)).await;
            }
            // Resume needs an authenticated upgrade; challenge-authenticated sockets start fresh.
            Ok(requested) => {
                serve_socket(s, socket, upgrade_user.clone(), requested.filter(|_| upgrade_user.is_some())).await
            }
        }
    })
}

fn reply(seq: i64, data: Option<Value>) -> String {
    let mut reply = json!({"status": "OK"});
    if seq > 0 {
        reply["seq_reply"] = json!(seq);
    }
    if let Some(data) = data {
        reply["data"] = data;
    }
    format!("{reply}\n")
}

fn fail(seq: i64, id: &str, message: &str, status: u16) -> String {
    let mut reply =
        json!({"status": "FAIL", "error": {"id": id, "message": message, "detailed_error": "", "status_code": status}});
    if seq > 0 {
        reply["seq_reply"] = json!(seq);
    }
    format!("{reply}\n")
}

/// Frames written to a socket before it is flushed, at most.
const WRITE_COALESCE: usize = 64;

async fn serve_socket(s: Shared, socket: WebSocket, mut user: Option<String>, requested: Option<(String, i64)>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut connection_id =
        user.as_ref().map(|u| s.world.lock().unwrap().attach(u, requested, tx.clone(), s.options.reap_after));
    let auth_deadline = tokio::time::sleep(s.options.auth_timeout);
    tokio::pin!(auth_deadline);
    let mut ping = tokio::time::interval(s.options.ping_interval);
    ping.tick().await;
    let mut last_pong = tokio::time::Instant::now();
    let dropped = loop {
        tokio::select! {
            outgoing = rx.recv() => {
                // Frames queued meanwhile go out in one write, as a buffered Go writer would:
                // a syscall per frame would make the simulator the bottleneck of the bench.
                let mut next = outgoing;
                let mut queued = 0;
                let ended = loop {
                    match next {
                        Some(Outgoing::Text(text)) => {
                            if sink.feed(Message::Text(text.into())).await.is_err() { break Some(false); }
                        }
                        Some(Outgoing::Close(code)) => {
                            let frame = axum::extract::ws::CloseFrame { code, reason: "".into() };
                            let _ = sink.send(Message::Close(Some(frame))).await;
                            break Some(false);
                        }
                        Some(Outgoing::Drop) | None => {
                            // What was queued before the cut went out before it.
                            let _ = sink.flush().await;
                            break Some(true);
                        }
                    }
                    queued += 1;
                    if queued == WRITE_COALESCE { break None; }
                    match rx.try_recv() {
                        Ok(more) => next = Some(more),
                        Err(_) => break None,
                    }
                };
                if let Some(dropped) = ended { break dropped; }
                if sink.flush().await.is_err() { break false; }
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let Ok(request) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    let seq = request["seq"].as_i64().unwrap_or(0);
                    let action = request["action"].as_str().unwrap_or_default();
                    if action == "authentication_challenge" {
                        if user.is_some() { continue; }
                        let token = request["data"]["token"].as_str().unwrap_or_default().to_string();
                        let found = s.world.lock().unwrap().user_by_token(&token).map(|u| u.id.clone());
                        let Some(found) = found else { break false };
                        // hello is queued during registration, before the OK reply.
                        let mut world = s.world.lock().unwrap();
                        connection_id = Some(world.attach(&found, None, tx.clone(), s.options.reap_after));
                        let _ = tx.send(Outgoing::Text(reply(seq, None)));
                        user = Some(found);
                        continue;
                    }
                    let text = if action.is_empty() {
                        fail(seq, "api.web_socket_router.no_action.app_error", "No websocket action.", 400)
                    } else if seq <= 0 {
                        fail(seq, "api.web_socket_router.bad_seq.app_error", "Invalid sequence for WebSocket message.", 400)
                    } else if user.is_none() {
                        fail(seq, "api.web_socket_router.not_authenticated.app_error", "You are not authenticated.", 401)
                    } else {
                        match action {
                            "ping" => reply(seq, Some(json!({"text": "pong", "version": "10.11.0", "server_time": now_ms(), "node_id": ""}))),
                            "user_typing" => {
                                let channel_id = request["data"]["channel_id"].as_str().unwrap_or_default().to_string();
                                let parent_id = request["data"]["parent_id"].as_str().unwrap_or_default().to_string();
                                if is_valid_id(&channel_id) {
                                    s.world.lock().unwrap().typing(user.as_deref().unwrap_or_default(), &channel_id, &parent_id);
                                    reply(seq, None)
                                } else {
                                    fail(seq, "api.websocket_handler.invalid_param.app_error", "Invalid channel_id parameter.", 400)
                                }
                            }
                            _ if action.starts_with("custom_") => continue,
                            _ => fail(seq, "api.web_socket_router.bad_action.app_error", "Unknown action.", 500),
                        }
                    };
                    let _ = tx.send(Outgoing::Text(text));
                }
                Some(Ok(Message::Pong(_))) => last_pong = tokio::time::Instant::now(),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break false,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > s.options.pong_timeout { break false; }
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break false; }
            }
            _ = &mut auth_deadline, if user.is_none() => break false,
        }
    };
    if let Some(connection_id) = connection_id {
        s.world.lock().unwrap().detach(&connection_id);
    }
    if !dropped {
        let _ = sink.close().await;
    }
}

async fn sim_stats(State(s): State<Shared>) -> Json<Value> {
    let world = s.world.lock().unwrap();
    Json(json!({
        "ws_connections_opened": world.ws_opened,
        "ws_connections_active": world.active_connections(),
        "resumed_connections": world.resumed,
        "posts": world.posts.len(),
    }))
}

async fn sim_posts(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Json<Vec<SimPost>> {
    let world = s.world.lock().unwrap();
    let channel = q.get("channel_id");
    Json(world.posts.iter().filter(|p| channel.is_none_or(|c| *c == p.channel_id)).cloned().collect())
}

#[derive(Deserialize)]
struct SimPostRequest {
    user_id: String,
    channel_id: String,
    message: String,
    #[serde(default)]
    root_id: String,
}

async fn sim_post(State(s): State<Shared>, Json(request): Json<SimPostRequest>) -> Response {
    let mut world = s.world.lock().unwrap();
    if !world.channels.get(&request.channel_id).is_some_and(|c| c.members.contains(&request.user_id)) {
        return app_error(StatusCode::BAD_REQUEST, "sim.post.not_member", "user is not a member of that channel");
    }
    let post =
        world.create_post(&request.user_id, &request.channel_id, &request.message, &request.root_id, "", Value::Null);
    (StatusCode::CREATED, Json(post)).into_response()
}

async fn sim_typing(State(s): State<Shared>) -> Json<Value> {
    Json(json!(s.world.lock().unwrap().typing))
}

async fn sim_drop(State(s): State<Shared>) -> Json<Value> {
    s.world.lock().unwrap().drop_connections();
    Json(json!({"status": "OK"}))
}

#[derive(Deserialize)]
struct FailRequest {
    count: usize,
    status: u16,
}

async fn sim_fail_next_posts(State(s): State<Shared>, Json(request): Json<FailRequest>) -> Json<Value> {
    s.world.lock().unwrap().fail_next_posts = (request.count > 0).then_some((request.count, request.status));
    Json(json!({"status": "OK"}))
}
