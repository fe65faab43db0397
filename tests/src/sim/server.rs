//! The simulator's HTTP side: the REST endpoints a bot uses, the WebSocket endpoint, and the
//! `/_sim/*` control API. Auth, status codes and bodies follow MATTERMOST.md A2/A5/A6.
//!
//! Real-server behaviour followed here (paths under `server/channels/` of mattermost/mattermost):
//! - `GET /channels/{id}/posts?since=` (`store/sqlstore/post_store.go` `GetPostsSince`): every
//!   post with `UpdateAt > since`, deleted ones included, at most 1000 chosen arbitrarily (the
//!   CTE has `LIMIT 1000` and no `ORDER BY`: the simulator picks randomly), roots of replies added
//!   to `posts`; without `since`: `page`/`per_page` (60, at most 200) or `before`/`after`
//!   cursors, newest first, deleted posts left out (`GetPosts`, `GetPostsBefore`/`After`);
//!   403 `api.context.permissions.app_error` for a non-member (`api4/post.go`).
//! - `POST /posts` (`app/post.go` `CreatePost`, `deduplicateCreatePost`): `pending_post_id`
//!   de-duplication keyed by the id alone for `PendingPostIDsCacheTTL` (30 s); a repeat while
//!   the first request is still running gets 500 `api.post.deduplicate_create_post.pending`;
//!   a `root_id` that is missing, in another channel, deleted or itself a reply gets 400
//!   `api.post.create_post.root_id.app_error`; 16383 runes at most (`model/post.go` `IsValid`).
//! - `PUT /posts/{id}/patch`, `DELETE /posts/{id}`, `POST /posts/{id}/pin`, `POST /reactions`
//!   (`api4/post.go` `patchPost`/`deletePost`/`pinPost`, `api4/reaction.go` `saveReaction`).
//! - `GET /users/{id}/teams`, `/users/{id}/teams/{team}/channels` (with the user's DM and group
//!   channels, as `store/sqlstore/channel_store.go` `GetChannels` includes `TeamId = ''`),
//!   `/users/{id}/channels` (`api4/team.go`, `api4/channel.go`).
//! - Rate limiting (`app/ratelimit.go`, throttled GCRA keyed by remote address): every
//!   `/api/v4` route including the WebSocket upgrade; `X-Ratelimit-Limit` (burst + 1),
//!   `-Remaining`, `-Reset` (seconds, ceil); 429 `text/plain` `limit exceeded\n` with
//!   `Retry-After` (`http.Error` in `RateLimitHandler`). Off unless configured.
//! - WebSocket (`api4/websocket.go` `connectWebSocket`, `app/platform/web_conn.go`): the upgrade
//!   needs no session; a wrong or revoked token leaves the socket unauthenticated (no `hello`,
//!   actions answered FAIL `api.web_socket_router.not_authenticated.app_error`, closed after
//!   `authCheckInterval`); resume only on header-authenticated upgrades; ping control frames and
//!   the pong read deadline; a full send queue closes the connection (`web_hub.go`).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use axum::{
    extract::{
        ws::{Message, WebSocket},
        ConnectInfo, Path, Query, Request, State, WebSocketUpgrade,
    },
    http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post, put},
    Json, Router,
};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{
    model::{is_valid_id, new_id, now_ms, Control, LiveSocket, PendingId, PostSpec, SimPost, World, MAX_POST_RUNES},
    RateLimit, SimOptions,
};

#[derive(Clone)]
pub struct Shared {
    pub world: Arc<Mutex<World>>,
    pub options: SimOptions,
    pub limiter: Arc<Mutex<Limiter>>,
}

/// The server's rate limiter: throttled's GCRA, one bucket per remote address.
pub struct Limiter {
    pub config: Option<RateLimit>,
    /// Theoretical arrival time per address, in ns since `base`.
    tats: HashMap<IpAddr, i128>,
    base: Instant,
    pub throttled: u64,
}

/// What the limiter says about one request.
pub struct Verdict {
    limited: bool,
    limit: u32,
    remaining: u64,
    reset_secs: u64,
    retry_after_secs: u64,
}

impl Limiter {
    pub fn new(config: Option<RateLimit>) -> Self {
        Self { config, tats: HashMap::new(), base: Instant::now(), throttled: 0 }
    }

    pub fn set(&mut self, config: Option<RateLimit>) {
        self.config = config;
        self.tats.clear();
    }

    fn check(&mut self, key: IpAddr) -> Option<Verdict> {
        let config = self.config?;
        let emission = 1_000_000_000i128 / i128::from(config.per_sec.max(1));
        let tolerance = emission * (i128::from(config.burst) + 1);
        let now = self.base.elapsed().as_nanos() as i128;
        let tat = self.tats.get(&key).copied().unwrap_or(now).max(now);
        let new_tat = tat + emission;
        let allow_at = new_tat - tolerance;
        let diff = now - allow_at;
        let ceil_secs = |ns: i128| (ns.max(0) as u128).div_ceil(1_000_000_000) as u64;
        let (limited, ttl, retry_after) = if diff < 0 {
            self.throttled += 1;
            (true, tat - now, ceil_secs(-diff).max(1))
        } else {
            self.tats.insert(key, new_tat);
            (false, new_tat - now, 0)
        };
        let next = tolerance - ttl;
        let remaining = if next > -emission { (next / emission).max(0) as u64 } else { 0 };
        Some(Verdict {
            limited,
            limit: config.burst + 1,
            remaining,
            reset_secs: ceil_secs(ttl),
            retry_after_secs: retry_after,
        })
    }
}

pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/api/v4/users/me", get(users_me))
        .route("/api/v4/users/{user_id}", get(user_by_id))
        .route("/api/v4/users/{user_id}/typing", post(user_typing))
        .route("/api/v4/users/{user_id}/teams", get(user_teams))
        .route("/api/v4/users/{user_id}/teams/{team_id}/channels", get(user_team_channels))
        .route("/api/v4/users/{user_id}/channels", get(user_channels))
        .route("/api/v4/posts", post(create_post))
        .route("/api/v4/posts/{post_id}", get(get_post).delete(delete_post))
        .route("/api/v4/posts/{post_id}/patch", put(patch_post))
        .route("/api/v4/posts/{post_id}/pin", post(pin_post))
        .route("/api/v4/reactions", post(save_reaction))
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
        .route("/_sim/half_open_drop", post(sim_half_open_drop))
        .route("/_sim/fail_next_posts", post(sim_fail_next_posts))
        .route("/_sim/dedup", post(sim_dedup))
        .route("/_sim/rate_limit", post(sim_rate_limit))
        .route("/_sim/edit", post(sim_edit))
        .route("/_sim/delete", post(sim_delete))
        .route("/_sim/react", post(sim_react))
        .fallback(|| async {
            app_error(StatusCode::NOT_FOUND, "api.context.404.app_error", "Sorry, we could not find the page.")
        })
        .layer(axum::middleware::from_fn_with_state(shared.clone(), rate_limit))
        .with_state(shared)
}

/// `app/ratelimit.go` `RateLimitHandler` in front of every `/api/v4` route.
async fn rate_limit(State(s): State<Shared>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/api/v4") {
        return next.run(request).await;
    }
    let ip = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([127, 0, 0, 1]), |ConnectInfo(address)| address.ip());
    let verdict = s.limiter.lock().unwrap().check(ip);
    let Some(verdict) = verdict else { return next.run(request).await };
    let mut response = if verdict.limited {
        let mut response = (StatusCode::TOO_MANY_REQUESTS, "limit exceeded\n").into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(header::RETRY_AFTER, HeaderValue::from(verdict.retry_after_secs));
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(HeaderName::from_static("x-ratelimit-limit"), HeaderValue::from(verdict.limit));
    headers.insert(HeaderName::from_static("x-ratelimit-remaining"), HeaderValue::from(verdict.remaining));
    headers.insert(HeaderName::from_static("x-ratelimit-reset"), HeaderValue::from(verdict.reset_secs));
    response
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

fn forbidden() -> Response {
    app_error(
        StatusCode::FORBIDDEN,
        "api.context.permissions.app_error",
        "You do not have the appropriate permissions.",
    )
}

fn post_not_found() -> Response {
    app_error(StatusCode::NOT_FOUND, "app.post.get.app_error", "Unable to get the post.")
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

/// `{user_id}` of a route: `me` or the caller's own id (others need admin rights: 403).
fn own_user(path_user: &str, me: &str) -> Option<()> {
    (path_user == "me" || path_user == me).then_some(())
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
    let me = authenticated!(s, headers, q);
    let user_id = if user_id == "me" { me } else { user_id };
    let world = s.world.lock().unwrap();
    match world.users.get(&user_id) {
        Some(user) => Json(user.to_json()).into_response(),
        None => app_error(StatusCode::NOT_FOUND, "app.user.missing_account.const", "Unable to find the user."),
    }
}

fn team_json(id: &str, name: &str) -> Value {
    json!({"id": id, "create_at": 0, "update_at": 0, "delete_at": 0, "display_name": name, "name": name,
           "description": "", "email": "", "type": "O", "company_name": "", "allowed_domains": "",
           "invite_id": "", "allow_open_invite": false, "scheme_id": null, "group_constrained": null,
           "policy_id": null})
}

async fn user_teams(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(user_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    if own_user(&user_id, &me).is_none() {
        return forbidden();
    }
    let world = s.world.lock().unwrap();
    let mut teams: Vec<(&String, &String)> =
        world.teams.iter().filter(|(id, _)| world.team_members.get(*id).is_some_and(|m| m.contains(&me))).collect();
    teams.sort_by(|a, b| a.1.cmp(b.1));
    Json(teams.into_iter().map(|(id, name)| team_json(id, name)).collect::<Vec<_>>()).into_response()
}

async fn user_team_channels(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path((user_id, team_id)): Path<(String, String)>,
) -> Response {
    let me = authenticated!(s, headers, q);
    if own_user(&user_id, &me).is_none() {
        return forbidden();
    }
    let world = s.world.lock().unwrap();
    if !world.team_members.get(&team_id).is_some_and(|m| m.contains(&me)) {
        return forbidden();
    }
    let mut channels: Vec<Value> = world
        .channels
        .values()
        .filter(|c| (c.team_id == team_id || c.team_id.is_empty()) && c.members.contains(&me))
        .map(|c| c.to_json())
        .collect();
    channels.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(channels).into_response()
}

async fn user_channels(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(user_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    if own_user(&user_id, &me).is_none() {
        return forbidden();
    }
    let world = s.world.lock().unwrap();
    let mut channels: Vec<Value> =
        world.channels.values().filter(|c| c.members.contains(&me)).map(|c| c.to_json()).collect();
    channels.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(channels).into_response()
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
    if own_user(&user_id, &me).is_none() {
        return forbidden();
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
    #[serde(default, rename = "type")]
    kind: String,
}

/// How long the server remembers a `pending_post_id` (`PendingPostIDsCacheTTL`, app/post.go).
pub const PENDING_POST_ID_TTL_MS: i64 = 30_000;

/// A post as read back from the database: `pending_post_id` is not a stored column.
fn stored(post: &SimPost) -> Value {
    let mut json = post.to_json();
    json["pending_post_id"] = json!("");
    json
}

fn too_many_requests() -> Response {
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::RETRY_AFTER, "1"),
            (HeaderName::from_static("x-ratelimit-limit"), "10"),
            (HeaderName::from_static("x-ratelimit-remaining"), "0"),
            (HeaderName::from_static("x-ratelimit-reset"), "1"),
        ],
        "limit exceeded\n",
    )
        .into_response()
}

async fn create_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    body: String,
) -> Response {
    let me = authenticated!(s, headers, q);
    let (request, delay) = {
        let mut world = s.world.lock().unwrap();
        if let Some((count, status)) = world.fail_next_posts.take() {
            if count > 1 {
                world.fail_next_posts = Some((count - 1, status));
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status == StatusCode::TOO_MANY_REQUESTS {
                return too_many_requests();
            }
            return app_error(
                status,
                "app.simulated.failure.app_error",
                "The simulator was told to fail this request.",
            );
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
        if !world.channels.get(&request.channel_id).is_some_and(|c| c.members.contains(&me)) {
            return forbidden();
        }
        let length = request.message.chars().count();
        if length > MAX_POST_RUNES {
            let message = format!("Invalid Message property, Length={length}, MaxLength={MAX_POST_RUNES}");
            return app_error(StatusCode::BAD_REQUEST, "model.post.is_valid.message_length.app_error", &message);
        }
        if !request.root_id.is_empty()
            && !world.post(&request.root_id).is_some_and(|root| {
                root.channel_id == request.channel_id && !root.is_deleted() && root.root_id.is_empty()
            })
        {
            return app_error(
                StatusCode::BAD_REQUEST,
                "api.post.create_post.root_id.app_error",
                "Invalid RootId parameter.",
            );
        }
        // The de-duplication cache (`deduplicateCreatePost`): a known id answers with the post
        // already made, an id whose first request is still running gets a 500; after the TTL
        // the id is forgotten and a repeat makes a new post.
        if world.dedup && !request.pending_post_id.is_empty() {
            let now = now_ms();
            match world.pending_post_ids.get(&request.pending_post_id).copied() {
                Some(PendingId { post, seen_at_ms }) if now - seen_at_ms < PENDING_POST_ID_TTL_MS => match post {
                    None => {
                        return app_error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "api.post.deduplicate_create_post.pending",
                            "Post rejected: another request with the same pending post id is being processed.",
                        )
                    }
                    Some(index) => return (StatusCode::CREATED, Json(stored(&world.posts[index]))).into_response(),
                },
                _ => {
                    world
                        .pending_post_ids
                        .insert(request.pending_post_id.clone(), PendingId { post: None, seen_at_ms: now });
                }
            }
        }
        let delay = world.delay_next_posts.take().map(|(count, delay)| {
            if count > 1 {
                world.delay_next_posts = Some((count - 1, delay));
            }
            delay
        });
        (request, delay)
    };
    let create = move || {
        let mut world = s.world.lock().unwrap();
        let spec =
            PostSpec { message: request.message, root_id: request.root_id, kind: request.kind, props: request.props };
        world.create_post_with(&me, &request.channel_id, spec, &request.pending_post_id)
    };
    let post = match delay {
        None => create(),
        // Go does not stop a handler when its client goes away: a slow request whose client
        // timed out still creates its post. Detached, so dropping this future does not stop it.
        Some(delay) => {
            let slow = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                create()
            });
            match slow.await {
                Ok(post) => post,
                Err(_) => {
                    return app_error(StatusCode::INTERNAL_SERVER_ERROR, "app.simulated.failure.app_error", "lost")
                }
            }
        }
    };
    (StatusCode::CREATED, Json(post.to_json())).into_response()
}

/// The post `post_id` if it exists, is not deleted and the caller is a member of its channel.
fn visible_post<'w>(world: &'w World, me: &str, post_id: &str) -> Result<&'w SimPost, fn() -> Response> {
    let Some(post) = world.post(post_id) else { return Err(post_not_found) };
    if !world.channels.get(&post.channel_id).is_some_and(|c| c.members.iter().any(|m| m == me)) {
        return Err(forbidden);
    }
    if post.is_deleted() {
        return Err(post_not_found);
    }
    Ok(post)
}

/// The caller may change `post_id`: it is visible to them and theirs.
fn own_post(world: &World, me: &str, post_id: &str) -> Result<(), fn() -> Response> {
    match visible_post(world, me, post_id) {
        Ok(post) if post.user_id != me => Err(forbidden),
        Ok(_) => Ok(()),
        Err(response) => Err(response),
    }
}

async fn get_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(post_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let world = s.world.lock().unwrap();
    match visible_post(&world, &me, &post_id) {
        Ok(post) => Json(stored(post)).into_response(),
        Err(response) => response(),
    }
}

#[derive(Deserialize)]
struct PatchRequest {
    message: Option<String>,
    is_pinned: Option<bool>,
}

async fn patch_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(post_id): Path<String>,
    Json(request): Json<PatchRequest>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let mut world = s.world.lock().unwrap();
    if let Err(response) = own_post(&world, &me, &post_id) {
        return response();
    }
    if let Some(message) = &request.message {
        if message.chars().count() > MAX_POST_RUNES {
            return app_error(
                StatusCode::BAD_REQUEST,
                "model.post.is_valid.message_length.app_error",
                "Invalid Message property",
            );
        }
    }
    if let Some(pinned) = request.is_pinned {
        let _ = world.pin_post(&post_id, pinned);
    }
    let post = match &request.message {
        Some(message) => world.edit_post(&post_id, message),
        None => world.post(&post_id).cloned().ok_or(super::model::PostError::NotFound),
    };
    match post {
        Ok(post) => Json(stored(&post)).into_response(),
        Err(_) => post_not_found(),
    }
}

async fn delete_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(post_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let mut world = s.world.lock().unwrap();
    if let Err(response) = own_post(&world, &me, &post_id) {
        return response();
    }
    match world.delete_post(&post_id) {
        Ok(_) => Json(json!({"status": "OK"})).into_response(),
        Err(_) => post_not_found(),
    }
}

async fn pin_post(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(post_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let mut world = s.world.lock().unwrap();
    if let Err(response) = visible_post(&world, &me, &post_id) {
        return response();
    }
    let _ = world.pin_post(&post_id, true);
    Json(json!({"status": "OK"})).into_response()
}

#[derive(Deserialize)]
struct ReactionRequest {
    user_id: String,
    post_id: String,
    emoji_name: String,
}

async fn save_reaction(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Json(request): Json<ReactionRequest>,
) -> Response {
    let me = authenticated!(s, headers, q);
    if request.user_id != me {
        return forbidden();
    }
    if request.emoji_name.is_empty() || request.emoji_name.len() > 64 {
        return app_error(
            StatusCode::BAD_REQUEST,
            "model.reaction.is_valid.emoji_name.app_error",
            "Invalid emoji name.",
        );
    }
    let mut world = s.world.lock().unwrap();
    if let Err(response) = visible_post(&world, &me, &request.post_id) {
        return response();
    }
    match world.react(&me, &request.post_id, &request.emoji_name) {
        Ok(reaction) => (StatusCode::CREATED, Json(reaction)).into_response(),
        Err(_) => post_not_found(),
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
        Some(_) => forbidden(),
        None => app_error(
            StatusCode::NOT_FOUND,
            "app.channel.get.existing.app_error",
            "Unable to find the existing channel.",
        ),
    }
}

fn invalid_param(name: &str) -> Response {
    app_error(
        StatusCode::BAD_REQUEST,
        "api.context.invalid_url_param.app_error",
        &format!("Invalid or missing {name} parameter in request URL."),
    )
}

async fn channel_posts(
    State(s): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
    Path(channel_id): Path<String>,
) -> Response {
    let me = authenticated!(s, headers, q);
    let mut world = s.world.lock().unwrap();
    *world.posts_queries.entry(channel_id.clone()).or_default() += 1;
    if !world.channels.get(&channel_id).is_some_and(|c| c.members.contains(&me)) {
        return forbidden();
    }
    let world = &*world;
    let empty = Vec::new();
    let all = world.channel_posts.get(&channel_id).unwrap_or(&empty);
    let (order, next_post_id, prev_post_id): (Vec<usize>, String, String) = if let Some(since) = q.get("since") {
        let Ok(since) = since.parse::<i64>() else { return invalid_param("since") };
        let mut matched: Vec<usize> = all.iter().copied().filter(|&i| world.posts[i].update_at > since).collect();
        let limit = s.options.since_limit;
        if matched.len() > limit {
            // The CTE's `LIMIT 1000` has no ORDER BY: which rows come back is not promised.
            let mut rng = rand::rng();
            let picked = rand::seq::index::sample(&mut rng, matched.len(), limit);
            matched = picked.into_iter().map(|k| matched[k]).collect();
        }
        matched.sort_by_key(|&i| std::cmp::Reverse(world.posts[i].create_at));
        (matched, String::new(), String::new())
    } else {
        let per_page = match q.get("per_page").map(|v| v.parse::<usize>()) {
            None | Some(Err(_)) => 60,
            Some(Ok(n)) => n.min(200),
        };
        let page = q.get("page").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
        // Live posts, oldest first (the store is in create_at order).
        let live: Vec<usize> = all.iter().copied().filter(|&i| !world.posts[i].is_deleted()).collect();
        // A cursor that names no post of this channel matches nothing.
        let cursor = |key: &str| -> Option<i64> {
            let id = q.get(key).filter(|v| !v.is_empty())?;
            Some(world.post(id).filter(|p| p.channel_id == channel_id).map_or(i64::MIN, |p| p.create_at))
        };
        let (before, after) = (cursor("before"), cursor("after"));
        let mut chosen: Vec<usize> = if let Some(after) = after {
            if after == i64::MIN {
                Vec::new()
            } else {
                let mut newer: Vec<usize> = live
                    .iter()
                    .copied()
                    .filter(|&i| world.posts[i].create_at > after)
                    .skip(page * per_page)
                    .take(per_page)
                    .collect();
                newer.reverse();
                newer
            }
        } else {
            live.iter()
                .rev()
                .copied()
                .filter(|&i| before.is_none_or(|b| world.posts[i].create_at < b))
                .skip(page * per_page)
                .take(per_page)
                .collect()
        };
        chosen.sort_by_key(|&i| std::cmp::Reverse(world.posts[i].create_at));
        let next = chosen
            .first()
            .and_then(|&newest| live.iter().find(|&&i| world.posts[i].create_at > world.posts[newest].create_at))
            .map_or_else(String::new, |&i| world.posts[i].id.clone());
        let prev = chosen
            .last()
            .and_then(|&oldest| live.iter().rev().find(|&&i| world.posts[i].create_at < world.posts[oldest].create_at))
            .map_or_else(String::new, |&i| world.posts[i].id.clone());
        (chosen, next, prev)
    };
    let mut posts: serde_json::Map<String, Value> =
        order.iter().map(|&i| (world.posts[i].id.clone(), stored(&world.posts[i]))).collect();
    for &i in &order {
        let root_id = &world.posts[i].root_id;
        if !root_id.is_empty() && !posts.contains_key(root_id) {
            if let Some(root) = world.post(root_id) {
                posts.insert(root.id.clone(), stored(root));
            }
        }
    }
    let order: Vec<&str> = order.iter().map(|&i| world.posts[i].id.as_str()).collect();
    Json(json!({"order": order, "posts": posts, "next_post_id": next_post_id, "prev_post_id": prev_post_id,
                "has_next": !next_post_id.is_empty()}))
    .into_response()
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
    // A wrong or revoked token does not fail the upgrade: the socket is just unauthenticated.
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

static SOCKET_IDS: AtomicU64 = AtomicU64::new(1);

/// How a socket task ended.
#[derive(PartialEq, Eq)]
enum Ended {
    /// Closed by either side or a failure: the server notices (the connection becomes inactive).
    Closed,
    /// Cut without a close frame.
    Dropped,
    /// Cut without the server noticing (half-open).
    Vanished,
}

async fn serve_socket(s: Shared, socket: WebSocket, mut user: Option<String>, requested: Option<(String, i64)>) {
    let (mut sink, mut stream) = socket.split();
    let limit = s.options.send_queue.max(1);
    let (tx, mut rx) = mpsc::channel::<String>(LiveSocket::capacity_for(limit));
    let (control_tx, mut control) = mpsc::unbounded_channel::<Control>();
    let live = LiveSocket { tx, control: control_tx, id: SOCKET_IDS.fetch_add(1, Ordering::Relaxed), limit };
    let mut connection_id = user.as_ref().map(|u| s.world.lock().unwrap().attach(u, requested, live.clone()));
    let auth_deadline = tokio::time::sleep(s.options.auth_timeout);
    tokio::pin!(auth_deadline);
    let mut ping = tokio::time::interval(s.options.ping_interval);
    ping.tick().await;
    let mut last_pong = tokio::time::Instant::now();
    let ended = loop {
        tokio::select! {
            command = control.recv() => match command {
                Some(Control::Close(code)) => {
                    while let Ok(text) = rx.try_recv() {
                        let _ = sink.feed(Message::Text(text.into())).await;
                    }
                    let frame = code.map(|code| axum::extract::ws::CloseFrame { code, reason: "".into() });
                    let _ = sink.send(Message::Close(frame)).await;
                    break Ended::Closed;
                }
                Some(Control::Drop) => {
                    // What was queued before the cut went out before it.
                    while let Ok(text) = rx.try_recv() {
                        let _ = sink.feed(Message::Text(text.into())).await;
                    }
                    let _ = sink.flush().await;
                    break Ended::Dropped;
                }
                Some(Control::Vanish) => break Ended::Vanished,
                None => break Ended::Closed,
            },
            outgoing = rx.recv() => {
                // Frames queued meanwhile go out in one write, as a buffered Go writer would:
                // a syscall per frame would make the simulator the bottleneck of the bench.
                let Some(mut next) = outgoing else { break Ended::Closed };
                let mut queued = 0;
                let failed = loop {
                    if sink.feed(Message::Text(next.into())).await.is_err() { break true; }
                    queued += 1;
                    if queued == WRITE_COALESCE { break false; }
                    match rx.try_recv() {
                        Ok(more) => next = more,
                        Err(_) => break false,
                    }
                };
                if failed || sink.flush().await.is_err() { break Ended::Closed; }
            },
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(text))) => {
                    let Ok(request) = serde_json::from_str::<Value>(text.as_str()) else { continue };
                    let seq = request["seq"].as_i64().unwrap_or(0);
                    let action = request["action"].as_str().unwrap_or_default();
                    if action == "authentication_challenge" {
                        if user.is_some() { continue; }
                        let token = request["data"]["token"].as_str().unwrap_or_default().to_string();
                        let mut world = s.world.lock().unwrap();
                        let Some(found) = world.user_by_token(&token).map(|u| u.id.clone()) else { break Ended::Closed };
                        // hello is queued during registration, before the OK reply.
                        connection_id = Some(world.attach(&found, None, live.clone()));
                        let _ = live.tx.try_send(reply(seq, None));
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
                    let _ = live.tx.try_send(text);
                }
                Some(Ok(Message::Pong(_))) => {
                    last_pong = tokio::time::Instant::now();
                    if let Some(connection_id) = &connection_id {
                        s.world.lock().unwrap().pong(connection_id);
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break Ended::Closed,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if last_pong.elapsed() > s.options.pong_timeout { break Ended::Closed; }
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() { break Ended::Closed; }
            }
            _ = &mut auth_deadline, if user.is_none() => break Ended::Closed,
        }
    };
    if ended == Ended::Vanished {
        // The server keeps the connection active until its read deadline passes.
        return;
    }
    if let Some(connection_id) = connection_id {
        s.world.lock().unwrap().detach(&connection_id, live.id);
    }
    if ended == Ended::Closed {
        let _ = sink.close().await;
    }
}

async fn sim_stats(State(s): State<Shared>) -> Json<Value> {
    let world = s.world.lock().unwrap();
    Json(json!({
        "ws_connections_opened": world.ws_opened,
        "ws_connections_active": world.active_connections(),
        "resumed_connections": world.resumed,
        "hellos_sent": world.hellos,
        "posts": world.posts.len(),
        "posts_queries": world.posts_queries.values().sum::<usize>(),
        "throttled": s.limiter.lock().unwrap().throttled,
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

async fn sim_half_open_drop(State(s): State<Shared>) -> Json<Value> {
    s.world.lock().unwrap().half_open_drop(s.options.pong_timeout);
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

#[derive(Deserialize)]
struct DedupRequest {
    enabled: bool,
}

async fn sim_dedup(State(s): State<Shared>, Json(request): Json<DedupRequest>) -> Json<Value> {
    let mut world = s.world.lock().unwrap();
    world.dedup = request.enabled;
    if !request.enabled {
        world.pending_post_ids.clear();
    }
    Json(json!({"status": "OK"}))
}

#[derive(Deserialize)]
struct RateLimitRequest {
    per_sec: Option<u32>,
    burst: Option<u32>,
}

async fn sim_rate_limit(State(s): State<Shared>, Json(request): Json<RateLimitRequest>) -> Response {
    let config = match (request.per_sec, request.burst) {
        (None, None) => None,
        (Some(per_sec), burst) if per_sec > 0 => Some(RateLimit { per_sec, burst: burst.unwrap_or(100) }),
        _ => return app_error(StatusCode::BAD_REQUEST, "sim.rate_limit.invalid", "per_sec must be > 0"),
    };
    s.limiter.lock().unwrap().set(config);
    Json(json!({"status": "OK"})).into_response()
}

#[derive(Deserialize)]
struct EditRequest {
    post_id: String,
    message: String,
}

fn sim_result(result: Result<SimPost, super::model::PostError>) -> Response {
    match result {
        Ok(post) => Json(post).into_response(),
        Err(_) => post_not_found(),
    }
}

async fn sim_edit(State(s): State<Shared>, Json(request): Json<EditRequest>) -> Response {
    sim_result(s.world.lock().unwrap().edit_post(&request.post_id, &request.message))
}

#[derive(Deserialize)]
struct DeleteRequest {
    post_id: String,
}

async fn sim_delete(State(s): State<Shared>, Json(request): Json<DeleteRequest>) -> Response {
    sim_result(s.world.lock().unwrap().delete_post(&request.post_id))
}

#[derive(Deserialize)]
struct ReactRequest {
    user_id: String,
    post_id: String,
    emoji: String,
}

async fn sim_react(State(s): State<Shared>, Json(request): Json<ReactRequest>) -> Response {
    match s.world.lock().unwrap().react(&request.user_id, &request.post_id, &request.emoji) {
        Ok(reaction) => Json(reaction).into_response(),
        Err(_) => post_not_found(),
    }
}

/// How often the background tick runs for `options`.
pub fn tick_interval(options: &SimOptions) -> Duration {
    [Duration::from_millis(250), options.pong_timeout / 4, options.reap_interval / 4]
        .into_iter()
        .min()
        .unwrap_or(Duration::from_millis(250))
        .max(Duration::from_millis(5))
}

/// The server's timers: half-open read deadlines, the inactive-connection reaper
/// (`inactiveConnReaperInterval`) and the pending-post-id cache expiry.
pub async fn ticker(world: std::sync::Weak<Mutex<World>>, options: SimOptions) {
    let mut tick = tokio::time::interval(tick_interval(&options));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reap = Instant::now();
    let mut last_prune = Instant::now();
    loop {
        tick.tick().await;
        let Some(world) = world.upgrade() else { return };
        let mut world = world.lock().unwrap();
        let now = Instant::now();
        world.expire_half_open(now);
        if now.duration_since(last_reap) >= options.reap_interval {
            world.reap(options.reap_after);
            last_reap = now;
        }
        if now.duration_since(last_prune) >= Duration::from_secs(10) {
            world.prune_pending_ids(PENDING_POST_ID_TTL_MS);
            last_prune = now;
        }
    }
}
