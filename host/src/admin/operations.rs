//! The admin routes an operator's commands use (`switchboard sessions`, `plugins`,
//! `dead-letters`): listings read on the store's read connections from a blocking thread,
//! changes written through the store's writer. Errors are JSON (`{"error": …}`) with a status
//! that says whose they are: 404 nothing under that id, 409 the gateway will not do it now,
//! 500 the store failed.

use std::path::{Path, PathBuf};

use axum::{
    extract::{Path as UrlPath, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use crate::{
    config::Config,
    ledger::GenerationRecord,
    session::now_ms,
    store::{ReplayClaim, StoreError},
};

/// How many sessions `GET /sessions` lists unless told otherwise, and at most.
const DEFAULT_SESSIONS: usize = 50;
const MAX_SESSIONS: usize = 10_000;

/// What `GET /plugins` reports the plugin files against; the reload controller keeps it
/// up to date with the running config.
#[derive(Debug, Clone)]
pub struct PluginSettings {
    pub dir: PathBuf,
    pub generation_budget: u64,
}

impl PluginSettings {
    pub fn of(config: &Config) -> Self {
        Self { dir: config.plugins.dir.clone(), generation_budget: config.gateway.generation_budget }
    }
}

fn failure(status: StatusCode, message: String) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn store_failure(error: StoreError) -> Response {
    failure(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
}

#[derive(Deserialize)]
pub(super) struct SessionsQuery {
    channel: Option<String>,
    limit: Option<usize>,
}

/// `GET /sessions?channel=<id>&limit=<n>`: the most recently active sessions first.
pub(super) async fn sessions(State(state): State<AdminState>, Query(query): Query<SessionsQuery>) -> Response {
    let limit = query.limit.unwrap_or(DEFAULT_SESSIONS);
    if limit == 0 || limit > MAX_SESSIONS {
        return failure(StatusCode::BAD_REQUEST, format!("limit must be between 1 and {MAX_SESSIONS}"));
    }
    let channel = query.channel.filter(|c| !c.is_empty());
    let store = state.shared.router.store();
    match store.sessions_page_async(channel, limit).await {
        Ok(sessions) => Json(json!({
            "sessions": sessions
                .iter()
                .map(|s| json!({
                    "key": s.key,
                    "agent_id": s.agent_id,
                    "channel_instance": s.target.channel_instance,
                    "conversation_id": s.target.conversation_id,
                    "thread_root_id": s.target.thread_root_id,
                    "created_at_ms": s.created_at_ms,
                    "last_active_ms": s.last_active_ms,
                }))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => store_failure(e),
    }
}

/// `GET /plugins`: the files in the plugin directory with their hashes, the generations
/// loaded from each, and how much of the generation budget is used.
pub(super) async fn plugins(State(state): State<AdminState>) -> Response {
    let settings = state.plugin_settings.read().unwrap().clone();
    let generations = state.shared.ledger.snapshot();
    let dir = settings.dir.clone();
    let files = match tokio::task::spawn_blocking(move || plugin_files(&dir)).await {
        Ok(Ok(files)) => files,
        Ok(Err(e)) => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot list the plugin directory {}: {e}", settings.dir.display()),
            )
        }
        Err(e) => return failure(StatusCode::INTERNAL_SERVER_ERROR, format!("the listing task failed: {e}")),
    };
    let of_file = |file: &Path| -> Vec<&GenerationRecord> { generations.iter().filter(|r| r.source == file).collect() };
    let files: Vec<serde_json::Value> = files
        .iter()
        .map(|(file, size, sha256)| {
            json!({
                "file": file,
                "size": size,
                "sha256": sha256,
                "generations": of_file(file).iter().map(|r| generation_summary(r)).collect::<Vec<_>>(),
            })
        })
        .collect();
    // Generations of files no longer in the directory (replaced or removed since).
    let elsewhere: Vec<serde_json::Value> = generations
        .iter()
        .filter(|r| !files.iter().any(|f| f["file"].as_str() == r.source.to_str()))
        .map(generation_summary)
        .collect();
    let opened = crate::loader::libraries_opened();
    Json(json!({
        "dir": settings.dir,
        "files": files,
        "generations_of_other_files": elsewhere,
        "budget": {
            "libraries_opened": opened,
            "generation_budget": settings.generation_budget,
            "left": settings.generation_budget.saturating_sub(opened),
        },
    }))
    .into_response()
}

fn generation_summary(record: &GenerationRecord) -> serde_json::Value {
    json!({
        "channel": record.channel,
        "generation": record.generation,
        "state": record.state,
        "adapter_name": record.adapter_name,
        "adapter_version": record.adapter_version,
        "build": record.build,
        "abi_minor": record.abi_minor,
        "sha256": record.sha256,
        "source": record.source,
        "loaded_at_ms": record.loaded_at_ms,
        "events_handled": record.events_handled,
        "mapped": record.mapped,
    })
}

/// The regular files of the plugin directory (hidden ones are copies in progress), sorted,
/// with their size and SHA-256.
fn plugin_files(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64, String)>> {
    use sha2::{Digest, Sha256};
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        let path = entry.path();
        let mut hasher = Sha256::new();
        let mut file = std::fs::File::open(&path)?;
        let size = std::io::copy(&mut file, &mut hasher)?;
        let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        files.push((path, size, hex));
    }
    files.sort();
    Ok(files)
}

/// `GET /dead-letters`: every stored dead letter, oldest first.
pub(super) async fn dead_letters(State(state): State<AdminState>) -> Response {
    match state.shared.router.store().dead_letters_async().await {
        Ok(letters) => Json(json!({ "dead_letters": letters })).into_response(),
        Err(e) => store_failure(e),
    }
}

fn no_such_letter(id: i64) -> Response {
    failure(StatusCode::NOT_FOUND, format!("no dead letter with id {id}"))
}

/// `GET /dead-letters/{id}`.
pub(super) async fn dead_letter(State(state): State<AdminState>, UrlPath(id): UrlPath<i64>) -> Response {
    match state.shared.router.store().dead_letter_async(id).await {
        Ok(Some(letter)) => Json(letter).into_response(),
        Ok(None) => no_such_letter(id),
        Err(e) => store_failure(e),
    }
}

/// `POST /dead-letters/{id}/replay`: hand the event to the running generation of its channel
/// instance again, once. It is marked replayed in the store before it is queued (a second
/// replay is refused), and unmarked if it cannot be queued after all.
pub(super) async fn replay(State(state): State<AdminState>, UrlPath(id): UrlPath<i64>) -> Response {
    let router = &state.shared.router;
    let stored = match router.store().dead_letter_async(id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return no_such_letter(id),
        Err(e) => return store_failure(e),
    };
    if let Some(at) = stored.replayed_at_ms {
        return failure(StatusCode::CONFLICT, format!("dead letter {id} was replayed before (at {at} ms)"));
    }
    let letter = &stored.letter;
    let Some(event) = crate::channel::replay_of(&letter.event_kind, &letter.payload) else {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "dead letter {id} is a {} event, which cannot be replayed: only WebSocket text frames are kept whole",
                letter.event_kind
            ),
        );
    };
    let channel = &letter.channel_instance;
    let running = state.shared.ledger.running().into_iter().find(|r| &r.channel == channel);
    let Some(running) = running else {
        return failure(
            StatusCode::CONFLICT,
            format!("channel instance {channel} has no running adapter generation; replay once one runs"),
        );
    };
    if running.abi_minor < 2 {
        return failure(
            StatusCode::CONFLICT,
            format!(
                "the running build of channel instance {channel} (generation {}, ABI minor {}) cannot take a \
                 replayed event: that needs ABI minor 2",
                running.generation, running.abi_minor
            ),
        );
    }
    match router.writer().claim_replay(id, now_ms()).await {
        Ok(ReplayClaim::Claimed) => {}
        Ok(ReplayClaim::AlreadyReplayed(at)) => {
            return failure(StatusCode::CONFLICT, format!("dead letter {id} was replayed before (at {at} ms)"))
        }
        Ok(ReplayClaim::NotFound) => return no_such_letter(id),
        Err(e) => return store_failure(e),
    }
    if !router.send_to(channel, event) {
        if let Err(e) = router.writer().unclaim_replay(id).await {
            tracing::error!(dead_letter = id, "cannot undo the replay mark of a dead letter not handed over: {e}");
        }
        return failure(StatusCode::CONFLICT, format!("channel instance {channel} is not running"));
    }
    tracing::info!(
        dead_letter = id,
        channel = %channel,
        generation = running.generation,
        session = %letter.session_key,
        "dead letter handed to its channel instance again (replay)"
    );
    Json(json!({ "replayed": id, "channel": channel, "generation": running.generation })).into_response()
}

/// `DELETE /dead-letters/{id}`.
pub(super) async fn drop_dead_letter(State(state): State<AdminState>, UrlPath(id): UrlPath<i64>) -> Response {
    match state.shared.router.writer().drop_dead_letter(id).await {
        Ok(true) => {
            tracing::info!(dead_letter = id, "dead letter dropped");
            Json(json!({ "dropped": id })).into_response()
        }
        Ok(false) => no_such_letter(id),
        Err(e) => store_failure(e),
    }
}
