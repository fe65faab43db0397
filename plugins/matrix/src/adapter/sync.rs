//! The `/sync` long-poll and its cursor.
//!
//! One `/sync` is in flight at a time; the request id and the `since` it was sent with are in
//! the exported state, so a warm successor takes its answer over, and an answer for another
//! position than the current one is dropped (a sync is started again from the current one).
//! `since` moves to an answer's `next_batch` in the same `handle` call that passes the
//! answer's messages on as `Inbound` actions: the host stores the state exported after that
//! batch together with those messages, before the next `/sync` goes out. A crash can only
//! leave the stored `since` behind the messages passed on (the host writes the state at most
//! every 100 ms), and what comes again is recognised by its event id.
//!
//! The very first sync (no saved state) asks for the rooms only and starts from its
//! `next_batch`: history is not answered. A limited timeline (more events in a room than the
//! filter's limit since `since`) is filled from `/messages`, backwards from the timeline's
//! `prev_batch` down to `since`, before anything of that answer is passed on; the answer is
//! held in memory meanwhile, not exported — a successor syncs again from the same `since`.
//! In a room the bot has just joined, nothing before its own join is answered.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};
use switchboard_plugin_api::{Header, LogLevel};

use super::{
    requests::{encode, MatrixError, Pending, SYNC_TIMEOUT_MS},
    Adapter, TimerPurpose,
};

/// Events of a room per `/sync` answer at most (Synapse caps it at its
/// `filter_timeline_limit`, 100 by default); more make the timeline limited.
const TIMELINE_LIMIT: u64 = 100;
/// `/messages` pages fetched per limited room at most (each [`TIMELINE_LIMIT`] events).
const MAX_BACKFILL_PAGES: u32 = 20;
/// State the adapter reads: what a room is, who is in it and what it is called.
const STATE_TYPES: &[&str] = &["m.room.member", "m.room.join_rules", "m.room.canonical_alias"];

/// The sync filter, inline. Lazy-loaded members make Synapse send each room's member counts
/// (`summary`), which tell a DM, and the member events of a timeline's senders (their names);
/// ephemeral events, presence and other account data are left out. The first sync asks for
/// one event per room: it is read for the rooms, not for messages.
fn filter(first: bool) -> String {
    let limit = if first { 1 } else { TIMELINE_LIMIT };
    let mut timeline_types = STATE_TYPES.to_vec();
    timeline_types.push("m.room.message");
    json!({
        "presence": {"types": []},
        "account_data": {"types": ["m.direct"]},
        "room": {
            "state": {"types": STATE_TYPES, "lazy_load_members": true},
            "timeline": {"limit": limit, "types": timeline_types, "lazy_load_members": true},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    })
    .to_string()
}

/// A sync answer waiting for its limited timelines to be filled.
pub(super) struct HeldSync {
    since: String,
    answer: Value,
    fills: BTreeMap<String, Fill>,
}

/// What `/messages` gave for one limited room so far.
#[derive(Default)]
struct Fill {
    /// The token of the page asked for now.
    from: String,
    /// Newest first, as the pages come.
    events: Vec<Value>,
    /// Member events that came with the pages (senders' names).
    members: Vec<Value>,
    pages: u32,
    done: bool,
}

impl Adapter {
    pub(super) fn sync_in_flight(&self) -> bool {
        self.state.requests.values().any(|p| matches!(p, Pending::Sync { .. }))
    }

    /// Start the next `/sync` unless one is under way, waiting for a timer, or the account
    /// and the allowlist's aliases are not known yet.
    pub(super) fn maybe_start_sync(&mut self) {
        if !self.state.verified
            || self.held.is_some()
            || self.sync_in_flight()
            || self.timer_armed(&TimerPurpose::Sync)
            || self.resolving_aliases()
        {
            return;
        }
        let since = self.state.since.clone();
        self.request(Pending::Sync { since });
    }

    pub(super) fn sync_path(&self, since: Option<&str>) -> String {
        let filter = encode(&filter(since.is_none()));
        match since {
            None => format!("/sync?timeout=0&filter={filter}"),
            Some(since) => format!("/sync?timeout={SYNC_TIMEOUT_MS}&filter={filter}&since={}", encode(since)),
        }
    }

    pub(super) fn sync_answered(
        &mut self,
        request: u64,
        since: Option<String>,
        status: u16,
        headers: &[Header],
        body: &str,
    ) {
        if since != self.state.since {
            self.log(LogLevel::Debug, format!("sync answer {request} is for an old position; syncing again"));
            return self.maybe_start_sync();
        }
        if status == 200 {
            let answer: Value = serde_json::from_str(body).unwrap_or_default();
            let Some(next_batch) = answer["next_batch"].as_str().map(str::to_string) else {
                return self.sync_failed(since, "an answer without next_batch");
            };
            self.state.sync_failures = 0;
            match since {
                None => self.first_sync(&answer, next_batch),
                Some(since) => self.incremental_sync(since, answer, next_batch),
            }
            return;
        }
        let error = MatrixError::parse(headers, body);
        if error.token_refused(status) {
            self.token_refused("sync answered 401");
            return self.set_timer(TimerPurpose::Sync, 30_000);
        }
        if status == 429 {
            let wait = error.retry_after_ms.unwrap_or(1000).clamp(1, 300_000);
            self.log(LogLevel::Warn, format!("sync rate limited; next sync in {wait} ms"));
            return self.set_timer(TimerPurpose::Sync, wait);
        }
        if status == 400 && since.is_some() && body.contains("stream token") {
            // The server no longer knows the position (its database was reset): nothing
            // better than starting over from now.
            self.log(
                LogLevel::Error,
                format!(
                    "the homeserver does not know the sync position {:?} ({}); starting over from now — messages \
                     sent since the last sync are not answered",
                    since, error.errcode
                ),
            );
            self.state.since = None;
            return self.maybe_start_sync();
        }
        self.sync_failed(since, &format!("answered {status} {}", error.errcode));
    }

    pub(super) fn sync_failed(&mut self, _since: Option<String>, error: &str) {
        self.state.sync_failures += 1;
        let failures = self.state.sync_failures;
        let wait = self.backoff(1000, failures - 1, 60_000);
        let level = if failures <= 3 || failures % 10 == 0 { LogLevel::Warn } else { LogLevel::Debug };
        self.log(level, format!("sync failed ({error}, {failures} in a row); next sync in {wait} ms"));
        self.set_timer(TimerPurpose::Sync, wait);
    }

    /// The first sync of an account: learn the rooms, accept invites, answer nothing.
    fn first_sync(&mut self, answer: &Value, next_batch: String) {
        self.learn_direct_rooms(answer);
        let joined = answer["rooms"]["join"].as_object().cloned().unwrap_or_default();
        for (room_id, room) in &joined {
            self.learn_room(room_id, room);
            for event in events(&room["timeline"]) {
                self.learn_state_event(room_id, event);
            }
        }
        self.invited(answer);
        self.left(answer);
        self.log(
            LogLevel::Info,
            format!("first sync: in {} rooms; messages before now are not answered", joined.len()),
        );
        self.state.since = Some(next_batch);
        self.maybe_start_sync();
    }

    fn incremental_sync(&mut self, since: String, answer: Value, next_batch: String) {
        let mut fills = BTreeMap::new();
        if let Some(joined) = answer["rooms"]["join"].as_object() {
            for (room_id, room) in joined {
                let timeline = &room["timeline"];
                // A room new to the adapter has no gap to fill: its history is not answered.
                if timeline["limited"] == true
                    && self.state.rooms.contains_key(room_id)
                    && !has_own_join(timeline, &self.settings.user_id)
                {
                    if let Some(prev_batch) = timeline["prev_batch"].as_str() {
                        fills.insert(room_id.clone(), Fill { from: prev_batch.to_string(), ..Fill::default() });
                    }
                }
            }
        }
        if fills.is_empty() {
            return self.pass_on(&answer, BTreeMap::new(), next_batch);
        }
        let rooms: Vec<(String, String)> = fills.iter().map(|(room, fill)| (room.clone(), fill.from.clone())).collect();
        self.log(
            LogLevel::Info,
            format!("{} room(s) had more new events than one sync carries; fetching the rest first", rooms.len()),
        );
        self.held = Some(HeldSync { since, answer, fills });
        for (room, from) in rooms {
            self.request(Pending::Backfill { room, from });
        }
    }

    pub(super) fn backfill_path(&self, room: &str, from: &str) -> Option<String> {
        let held = self.held.as_ref()?;
        let filter = json!({"types": ["m.room.message", "m.room.member"], "lazy_load_members": true}).to_string();
        Some(format!(
            "/rooms/{}/messages?dir=b&limit={TIMELINE_LIMIT}&from={}&to={}&filter={}",
            encode(room),
            encode(from),
            encode(&held.since),
            encode(&filter)
        ))
    }

    pub(super) fn backfill_answered(&mut self, room: &str, from: &str, status: u16, body: &str) {
        let user_id = self.settings.user_id.clone();
        // Answers for a sync this generation does not hold (a predecessor's) are dropped.
        let Some(fill) = self.held.as_mut().and_then(|h| h.fills.get_mut(room)).filter(|f| f.from == from) else {
            return;
        };
        let page: Value = serde_json::from_str(body).unwrap_or_default();
        let Some(chunk) = page["chunk"].as_array().filter(|_| status == 200) else {
            // Start over from `since` (which has not moved) after a pause.
            self.held = None;
            let what = if status == 0 { body.to_string() } else { format!("answered {status}") };
            return self.sync_failed(self.state.since.clone(), &format!("filling {room}: /messages {what}"));
        };
        fill.pages += 1;
        fill.members.extend(page["state"].as_array().cloned().unwrap_or_default());
        let mut reached_join = false;
        for event in chunk {
            if is_join_of(event, &user_id) {
                reached_join = true;
                break;
            }
            fill.events.push(event.clone());
        }
        match page["end"].as_str() {
            Some(end) if !chunk.is_empty() && !reached_join && end != from && fill.pages < MAX_BACKFILL_PAGES => {
                fill.from = end.to_string();
                let next = Pending::Backfill { room: room.to_string(), from: end.to_string() };
                self.request(next);
            }
            _ => {
                fill.done = true;
                if fill.pages >= MAX_BACKFILL_PAGES && !reached_join {
                    let message =
                        format!("{room}: more than {MAX_BACKFILL_PAGES} pages missed; older ones are not answered");
                    self.log(LogLevel::Warn, message);
                }
            }
        }
        if self.held.as_ref().is_some_and(|h| h.fills.values().all(|f| f.done)) {
            if let Some(held) = self.held.take() {
                let next_batch = held.answer["next_batch"].as_str().unwrap_or_default().to_string();
                self.pass_on(&held.answer, held.fills, next_batch);
            }
        }
    }

    /// Hand on every message of a sync answer (limited timelines filled), move `since` past
    /// it, and start the next sync — all in this one batch.
    fn pass_on(&mut self, answer: &Value, mut fills: BTreeMap<String, Fill>, next_batch: String) {
        self.learn_direct_rooms(answer);
        let user_id = self.settings.user_id.clone();
        if let Some(joined) = answer["rooms"]["join"].as_object() {
            for (room_id, room) in joined {
                let known_before = self.state.rooms.contains_key(room_id);
                self.learn_room(room_id, room);
                let fill = fills.remove(room_id).unwrap_or_default();
                let timeline = events(&room["timeline"]);
                let names = sender_names(events(&room["state"]).chain(fill.members.iter()).chain(timeline.clone()));
                // In a room joined just now, only what follows the join is the bot's business.
                let after_join = if known_before {
                    0
                } else {
                    timeline.clone().position(|e| is_join_of(e, &user_id)).map_or(0, |at| at + 1)
                };
                let in_timeline: BTreeSet<&str> = timeline.clone().filter_map(|e| e["event_id"].as_str()).collect();
                let filled: Vec<&Value> = fill
                    .events
                    .iter()
                    .rev()
                    .filter(|e| e["event_id"].as_str().is_some_and(|id| !in_timeline.contains(id)))
                    .collect();
                // State is learnt from the whole timeline: a room joined just now has its
                // join rule there (before the join) when its history is short.
                // Messages: every one filled in, and the timeline's from the join on.
                let (filled_count, first_message) = (filled.len(), filled.len() + after_join);
                for (at, event) in filled.into_iter().chain(timeline).enumerate() {
                    let answerable = at < filled_count || at >= first_message;
                    if event.get("state_key").is_some() {
                        self.learn_state_event(room_id, event);
                    } else if answerable && event["type"] == "m.room.message" {
                        self.message(room_id, event, &names);
                    }
                }
            }
        }
        self.invited(answer);
        self.left(answer);
        self.state.since = Some(next_batch);
        self.maybe_start_sync();
    }
}

/// A section's `events` (`timeline`, `state`, …).
pub(super) fn events(section: &Value) -> impl Iterator<Item = &Value> + Clone {
    section["events"].as_array().into_iter().flatten()
}

/// Whether `event` is `user_id` joining.
fn is_join_of(event: &Value, user_id: &str) -> bool {
    event["type"] == "m.room.member"
        && event["state_key"] == user_id
        && event["content"]["membership"] == "join"
        && event["unsigned"]["prev_content"]["membership"] != "join"
}

fn has_own_join(timeline: &Value, user_id: &str) -> bool {
    events(timeline).any(|e| is_join_of(e, user_id))
}

/// Display names by user id, from member events.
fn sender_names<'a>(members: impl Iterator<Item = &'a Value>) -> HashMap<String, String> {
    let mut names = HashMap::new();
    for event in members.filter(|e| e["type"] == "m.room.member") {
        if let (Some(user), Some(name)) = (event["state_key"].as_str(), event["content"]["displayname"].as_str()) {
            names.insert(user.to_string(), name.to_string());
        }
    }
    names
}
