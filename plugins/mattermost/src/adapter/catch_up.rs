//! Catch-up after a gap the server could not resume (a new connection id in `hello`).
//!
//! Which conversations: the bot's teams and its channels in each — DMs and group messages
//! included, which is how a first DM sent during the gap is found — whose `last_post_at` is
//! after the newest post the adapter knows of there (or, for a conversation never seen, after
//! the gap began). When listing fails, every conversation seen or with a session is fetched.
//!
//! Which posts: `GET /channels/{id}/posts?since=` filters on *UpdateAt*, not CreateAt
//! (store/sqlstore/post_store.go `GetPostsSince`): a reaction, an edit, a pin or a reply in
//! its thread brings an old post back, deleted posts come back, thread roots of returned
//! replies are added to `posts` (not to `order`), and at most 1000 rows come, not the newest
//! ones. So the adapter walks `order`, keeps only posts created after the gap's start (less a
//! margin for posts broadcast out of creation order; the host recognises a message it already
//! has) and not deleted, and when the answer was cut at its limit walks the channel page by
//! page, newest first, down to the gap's start. Posts are then handled in creation order,
//! after their senders' usernames are known, and live posts of that conversation wait until
//! then.
//!
//! What is saved of a catch-up is its progress, never the posts it fetched: the state is
//! exported after every batch, and up to [`MAX_COLLECTED`] posts per conversation made it
//! megabytes. Nothing of a gap is handed to the host before its conversation's catch-up is
//! complete (pages come newest first, posts go oldest first), so the only point a catch-up can
//! resume from is its start: a restored adapter (a swap, a restart, a crash) fetches each
//! conversation again from the same floor, and a gap's discovery again from the same start.
//! The floors never move past a post not yet handed (a conversation's newest known post
//! moves only as its posts are handled, and held posts are not handled), and what comes twice
//! is recognised by its id, here and by the host.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{json, Map, Value};
use switchboard_plugin_api::LogLevel;

use super::{number, post_channel, requests::Pending, Adapter, TimerPurpose, KNOWN_USERS};

/// Posts broadcast out of creation order by this much are still caught up.
const MARGIN_MS: i64 = 5_000;
/// Catch-up requests that fail are retried this often before the posts found are released.
const CATCH_UP_ATTEMPTS: u32 = 5;
/// New posts kept per conversation in one catch-up at most.
const MAX_COLLECTED: usize = 10_000;

/// A `PostList` answer (`{order, posts, …}`).
pub(super) struct PostList {
    pub(super) order: Vec<String>,
    pub(super) posts: Map<String, Value>,
}

impl PostList {
    /// The most rows a `since` query returns (store/sqlstore/post_store.go).
    pub(super) const SINCE_LIMIT: usize = 1000;
    /// Posts per page when walking a channel.
    pub(super) const PAGE: usize = 200;
    /// Pages walked at most (newest first).
    pub(super) const MAX_PAGES: u32 = 50;

    pub(super) fn parse(body: &str) -> Self {
        let mut list: Value = serde_json::from_str(body).unwrap_or_default();
        let order = list["order"]
            .as_array()
            .map(|ids| ids.iter().filter_map(|id| id.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        let posts = match list["posts"].take() {
            Value::Object(posts) => posts,
            _ => Map::new(),
        };
        Self { order, posts }
    }

    /// The posts `order` lists, in its order.
    fn listed(&self) -> impl Iterator<Item = &Value> {
        self.order.iter().filter_map(|id| self.posts.get(id))
    }

    pub(super) fn oldest_create_at(&self) -> i64 {
        self.listed().map(|p| number(&p["create_at"])).min().unwrap_or(i64::MAX)
    }
}

/// One conversation's catch-up.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct CatchUp {
    /// Posts created at or before this (server ms) are not new.
    floor: i64,
    /// None: the `since` query; Some: walking pages, newest first.
    page: Option<u32>,
    attempts: u32,
    channel_type: String,
    channel_name: String,
    /// New posts found so far, by id: bulk, not progress, so never saved. Written as `{}`, so
    /// a build from before this one can still read the state (its format stays the same).
    /// Posts in a state saved by such a build are read and ignored: that catch-up starts again
    /// like any other restored one ([`Adapter::restart_catch_ups`]).
    #[serde(default, serialize_with = "unsaved")]
    collected: BTreeMap<String, Value>,
    /// Every page is in; waiting for the senders' usernames.
    complete: bool,
}

fn unsaved<S: Serializer>(_: &BTreeMap<String, Value>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(std::iter::empty::<(String, Value)>())
}

/// Finding the conversations a gap touched.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct Discovery {
    /// The newest server time known before the gap.
    gap_floor: i64,
    /// Listings still to come (team ids; "" for the bot's channels without a team).
    pending: BTreeSet<String>,
    failed: bool,
}

impl Adapter {
    /// A new connection id after a gap: find what was missed.
    pub(super) fn gap(&mut self) {
        // No server time known yet: the host's clock when the restored state was saved.
        let gap_floor =
            if self.state.server_clock_ms > 0 { self.state.server_clock_ms } else { self.restored_clock_ms };
        // A gap while the last one's conversations are still being found: those posted in
        // either are found from the earlier start.
        let earlier = self.state.discovering.as_ref().map_or(0, |d| d.gap_floor);
        let gap_floor = match (gap_floor > 0, earlier > 0) {
            (true, true) => gap_floor.min(earlier),
            (true, false) => gap_floor,
            (false, _) => earlier,
        };
        if gap_floor <= 0 {
            return; // nothing was known before: there is no gap to fill
        }
        self.restart_discovery(gap_floor);
    }

    /// List the bot's conversations from the beginning. Answers to listings asked for before
    /// are not waited for: they may predate posts of the gap, and one of them arriving after
    /// the new discovery began would otherwise end it before its own listings are in.
    fn restart_discovery(&mut self, gap_floor: i64) {
        let listing = |p: &Pending| matches!(p, Pending::Teams | Pending::TeamChannels(_) | Pending::MyChannels);
        self.state.requests.retain(|_, p| !listing(p));
        self.state.queue.retain(|p| !listing(p));
        self.state.timers.retain(|_, t| !matches!(t, TimerPurpose::Retry(p) if listing(p)));
        self.state.discovering = Some(Discovery { gap_floor, ..Default::default() });
        self.request(Pending::Teams);
    }

    /// A restored state has each catch-up's progress but not the posts it had fetched: start
    /// each again from its floor. Requests and timers of the previous generation that are
    /// still on their way (a swap keeps them) are not waited for: their answers belong to the
    /// old progress. The requests go out once the generation has started.
    pub(super) fn restart_catch_ups(&mut self) {
        let channels: BTreeSet<String> = self.state.catch_ups.keys().cloned().collect();
        let of_a_catch_up = |p: &Pending| matches!(p, Pending::CatchUp(c) if channels.contains(c));
        self.state.requests.retain(|_, p| !of_a_catch_up(p));
        self.state.queue.retain(|p| !of_a_catch_up(p));
        self.state.timers.retain(|_, t| match t {
            TimerPurpose::RetryCatchUp(c) => !channels.contains(c),
            TimerPurpose::Retry(p) => !of_a_catch_up(p),
            _ => true,
        });
        for catch_up in self.state.catch_ups.values_mut() {
            *catch_up = CatchUp {
                floor: catch_up.floor,
                channel_type: std::mem::take(&mut catch_up.channel_type),
                channel_name: std::mem::take(&mut catch_up.channel_name),
                ..Default::default()
            };
        }
    }

    /// Once a restored generation has started: send what the restored catch-ups and discovery
    /// wait for, unless a request or a timer of theirs is still on its way (a swap).
    pub(super) fn resume_catch_ups(&mut self) {
        let waiting: Vec<String> = self
            .state
            .catch_ups
            .iter()
            .filter(|(channel_id, catch_up)| {
                !catch_up.complete && !self.on_its_way(|p| p == &Pending::CatchUp(channel_id.to_string()))
            })
            .map(|(channel_id, _)| channel_id.clone())
            .collect();
        for channel_id in waiting {
            self.request(Pending::CatchUp(channel_id));
        }
        if let Some(gap_floor) = self.state.discovering.as_ref().map(|d| d.gap_floor) {
            if !self.on_its_way(|p| matches!(p, Pending::Teams | Pending::TeamChannels(_) | Pending::MyChannels)) {
                self.restart_discovery(gap_floor);
            }
        }
        self.release_held();
    }

    /// Whether a request `is` is in flight, queued, or waits for its retry timer.
    fn on_its_way(&self, is: impl Fn(&Pending) -> bool) -> bool {
        self.state.requests.values().any(&is)
            || self.state.queue.iter().any(&is)
            || self.state.timers.values().any(|t| match t {
                TimerPurpose::Retry(p) => is(p),
                TimerPurpose::RetryCatchUp(c) => is(&Pending::CatchUp(c.clone())),
                _ => false,
            })
    }

    pub(super) fn teams_answered(&mut self, status: u16, body: &str) {
        if self.state.discovering.is_none() {
            return;
        }
        if status != 200 {
            if !self.retry_later(Pending::Teams, &format!("server answered {status}")) {
                self.discovery_failed();
            }
            return;
        }
        let teams: Vec<String> = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.as_array().map(|t| t.iter().filter_map(|t| t["id"].as_str().map(str::to_string)).collect()))
            .unwrap_or_default();
        let Some(discovery) = self.state.discovering.as_mut() else { return };
        if teams.is_empty() {
            discovery.pending.insert(String::new());
            self.request(Pending::MyChannels);
        } else {
            discovery.pending.extend(teams.iter().cloned());
            for team in teams {
                self.request(Pending::TeamChannels(team));
            }
        }
    }

    /// A listing of the bot's channels (of one team, DMs and groups included; or of all).
    pub(super) fn channels_answered(&mut self, listing: Pending, status: u16, body: &str) {
        let Some(gap_floor) = self.state.discovering.as_ref().map(|d| d.gap_floor) else { return };
        if status != 200 {
            if !self.retry_later(listing, &format!("server answered {status}")) {
                self.discovery_failed();
            }
            return;
        }
        let channels: Vec<Value> =
            serde_json::from_str::<Value>(body).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default();
        for channel in &channels {
            let Some(id) = channel["id"].as_str().filter(|id| !id.is_empty()) else { continue };
            let known = self.state.seen.get(id).map_or(0, |s| s.last_post_at);
            let newest_known = if known > 0 { known } else { gap_floor };
            if number(&channel["last_post_at"]) > newest_known {
                let kind = channel["type"].as_str().unwrap_or_default().to_string();
                let name = channel["name"].as_str().unwrap_or_default().to_string();
                self.start_catch_up(id, newest_known - MARGIN_MS, kind, name);
            }
        }
        let team = match listing {
            Pending::TeamChannels(team) => team,
            _ => String::new(),
        };
        let Some(discovery) = self.state.discovering.as_mut() else { return };
        discovery.pending.remove(&team);
        if discovery.pending.is_empty() {
            self.discovery_done();
        }
    }

    pub(super) fn discovery_failed(&mut self) {
        if let Some(discovery) = self.state.discovering.as_mut() {
            discovery.failed = true;
            discovery.pending.clear();
            self.discovery_done();
        }
    }

    fn discovery_done(&mut self) {
        let Some(discovery) = self.state.discovering.take() else { return };
        if discovery.failed {
            // Listing failed: fetch every conversation known, since its newest known post.
            let mut known: BTreeMap<String, i64> =
                self.state.seen.iter().map(|(id, seen)| (id.clone(), seen.last_post_at)).collect();
            for session in self.host.sessions("".into()).iter() {
                known.entry(session.target.conversation_id.to_string()).or_insert(session.last_active_ms);
            }
            self.log(
                LogLevel::Warn,
                format!("could not list the bot's channels; catching up the {} conversation(s) known", known.len()),
            );
            for (channel_id, newest) in known {
                let floor = if newest > 0 { newest } else { discovery.gap_floor };
                let (kind, name) = self
                    .state
                    .seen
                    .get(&channel_id)
                    .map(|s| (s.channel_type.clone(), s.channel_name.clone()))
                    .unwrap_or_default();
                self.start_catch_up(&channel_id, floor - MARGIN_MS, kind, name);
            }
        }
        self.log(
            LogLevel::Info,
            format!("catching up {} conversation(s) with posts since the gap", self.state.catch_ups.len()),
        );
        self.release_held();
    }

    fn start_catch_up(&mut self, channel_id: &str, floor: i64, channel_type: String, channel_name: String) {
        if self.state.catch_ups.contains_key(channel_id) {
            return;
        }
        let catch_up = CatchUp { floor: floor.max(0), channel_type, channel_name, ..Default::default() };
        self.state.catch_ups.insert(channel_id.to_string(), catch_up);
        self.request(Pending::CatchUp(channel_id.to_string()));
    }

    pub(super) fn catch_up_request(&self, channel_id: &str) -> Option<(&'static str, String, String)> {
        let catch_up = self.state.catch_ups.get(channel_id)?;
        let path = match catch_up.page {
            None => format!("/channels/{channel_id}/posts?since={}", catch_up.floor),
            Some(page) => format!("/channels/{channel_id}/posts?page={page}&per_page={}", PostList::PAGE),
        };
        Some(("GET", path, String::new()))
    }

    pub(super) fn caught_up(&mut self, channel_id: &str, status: u16, body: &str) {
        let Some(catch_up) = self.state.catch_ups.get_mut(channel_id) else { return };
        if status != 200 {
            catch_up.attempts += 1;
            let attempts = catch_up.attempts;
            if attempts < CATCH_UP_ATTEMPTS {
                let wait = 1000u64 << attempts;
                self.log(
                    LogLevel::Warn,
                    format!("catch-up of channel {channel_id} failed ({status} {body}); retrying in {wait} ms"),
                );
                self.set_timer(TimerPurpose::RetryCatchUp(channel_id.to_string()), wait);
            } else {
                self.log(
                    LogLevel::Error,
                    format!("catch-up of channel {channel_id} failed {attempts} times ({status}); posts of the gap there that were not found are not answered"),
                );
                self.complete_catch_up(channel_id);
            }
            return;
        }
        catch_up.attempts = 0;
        let list = PostList::parse(body);
        let floor = catch_up.floor;
        for post in list.listed() {
            let new = number(&post["create_at"]) > floor && number(&post["delete_at"]) == 0;
            if let (true, Some(id)) = (new, post["id"].as_str()) {
                if catch_up.collected.len() < MAX_COLLECTED {
                    catch_up.collected.insert(id.to_string(), post.clone());
                }
            }
        }
        let more = match catch_up.page {
            None => list.order.len() >= PostList::SINCE_LIMIT,
            Some(_) => list.order.len() >= PostList::PAGE && list.oldest_create_at() > floor,
        };
        if more {
            let page = catch_up.page.map_or(0, |page| page + 1);
            if page < PostList::MAX_PAGES {
                catch_up.page = Some(page);
                self.request(Pending::CatchUp(channel_id.to_string()));
                return;
            }
            self.log(
                LogLevel::Error,
                format!("catch-up of channel {channel_id} stopped after {page} pages; older posts of the gap are not answered"),
            );
        }
        self.complete_catch_up(channel_id);
    }

    /// Every page is in: look up unknown senders, then handle the posts.
    fn complete_catch_up(&mut self, channel_id: &str) {
        let Some(catch_up) = self.state.catch_ups.get_mut(channel_id) else { return };
        catch_up.complete = true;
        let unknown: BTreeSet<String> = catch_up
            .collected
            .values()
            .filter(|p| p["props"]["from_webhook"] != "true")
            .filter_map(|p| p["user_id"].as_str())
            .filter(|u| !u.is_empty() && *u != self.state.bot_id && !self.state.usernames.contains_key(*u))
            .map(str::to_string)
            .collect();
        for user_id in unknown {
            if self.state.user_lookups.insert(user_id.clone()) {
                self.request(Pending::User(user_id));
            }
        }
        self.finish_catch_up(channel_id);
    }

    pub(super) fn user_answered(&mut self, user_id: &str, status: u16, body: &str) {
        self.state.user_lookups.remove(user_id);
        let user: Value = serde_json::from_str(body).unwrap_or_default();
        match user["username"].as_str() {
            Some(username) if status == 200 => self.learn_username(user_id, username),
            _ => self.log(LogLevel::Warn, format!("could not look up user {user_id} ({status})")),
        }
        let complete: Vec<String> =
            self.state.catch_ups.iter().filter(|(_, c)| c.complete).map(|(id, _)| id.clone()).collect();
        for channel_id in complete {
            self.finish_catch_up(&channel_id);
        }
    }

    pub(super) fn learn_username(&mut self, user_id: &str, username: &str) {
        let usernames = &mut self.state.usernames;
        if usernames.len() >= KNOWN_USERS && !usernames.contains_key(user_id) {
            usernames.pop_first();
        }
        usernames.insert(user_id.to_string(), username.trim_start_matches('@').to_string());
    }

    /// Handle a complete catch-up's posts in creation order, unless senders are being looked up.
    fn finish_catch_up(&mut self, channel_id: &str) {
        let Some(catch_up) = self.state.catch_ups.get(channel_id) else { return };
        let waiting = catch_up
            .collected
            .values()
            .any(|p| p["user_id"].as_str().is_some_and(|u| self.state.user_lookups.contains(u)));
        if !catch_up.complete || waiting {
            return;
        }
        let Some(catch_up) = self.state.catch_ups.remove(channel_id) else { return };
        let seen = self.state.seen.get(channel_id).cloned().unwrap_or_default();
        let channel_type = [catch_up.channel_type.as_str(), seen.channel_type.as_str()]
            .into_iter()
            .find(|k| !k.is_empty())
            .unwrap_or("O")
            .to_string();
        let channel_name =
            if catch_up.channel_name.is_empty() { seen.channel_name.clone() } else { catch_up.channel_name.clone() };
        let mut posts: Vec<Value> = catch_up.collected.into_values().collect();
        posts.sort_by(|a, b| {
            (number(&a["create_at"]), a["id"].as_str()).cmp(&(number(&b["create_at"]), b["id"].as_str()))
        });
        let count = posts.len();
        for post in posts {
            let user_id = post["user_id"].as_str().unwrap_or_default();
            let sender_name = self.state.usernames.get(user_id).map(|n| format!("@{n}")).unwrap_or_default();
            let data = json!({
                "post": post.to_string(),
                "channel_type": channel_type,
                "channel_name": channel_name,
                "sender_name": sender_name,
            });
            self.posted(&data);
        }
        self.log(LogLevel::Info, format!("caught up channel {channel_id}: {count} new post(s) since the gap"));
        self.release_held();
    }

    /// Live posts that waited: those of conversations no longer being caught up go now.
    pub(super) fn release_held(&mut self) {
        if self.state.discovering.is_some() {
            return;
        }
        let held = std::mem::take(&mut self.state.held);
        for data in held {
            let waiting = post_channel(&data).is_some_and(|c| self.state.catch_ups.contains_key(&c));
            if waiting {
                self.state.held.push_back(data);
            } else {
                self.posted(&data);
            }
        }
    }

    /// Whether a live post of `channel_id` must wait for a catch-up.
    pub(super) fn must_hold(&self, channel_id: Option<&str>) -> bool {
        self.state.discovering.is_some() || channel_id.is_some_and(|c| self.state.catch_ups.contains_key(c))
    }
}
