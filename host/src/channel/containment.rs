//! Containment: a batch reaches the adapter whole or not at all; a panic restarts the adapter
//! from its last good state, an event it fails on twice is dead-lettered, and past the
//! restart budget the instance halts with its events kept.

use super::*;
use crate::apartment::ApartmentGone;
use std::sync::atomic::AtomicUsize;

/// `reached` while the apartment is not inside an event (constructing, exporting).
const NOT_IN_AN_EVENT: usize = usize::MAX;

impl Instance {
    /// Hand events to the running generation and carry out what it asks.
    ///
    /// A batch goes through whole or not at all: its commands are only carried out once the
    /// adapter handled every event of it. When the adapter fails on an event (a caught panic),
    /// nothing of the batch has happened yet; the adapter is rebuilt from its last good state
    /// (the state exported after the previous batch) and handed the batch again. An event it
    /// fails on twice is dead-lettered and the rest of the batch goes on without it.
    pub(super) async fn dispatch(&mut self, batch: Vec<Event>) {
        if self.current.is_none() {
            self.parked.extend(batch);
            return;
        }
        for event in &batch {
            match event {
                Event::DeliverReply(reply) => {
                    self.pending_replies.insert(
                        reply.reply_id,
                        PendingReply {
                            session_key: reply.session_key.to_string(),
                            conversation_id: reply.target.conversation_id.to_string(),
                        },
                    );
                }
                Event::WsClosed { conn, .. } | Event::StreamClosed { conn, .. } => {
                    self.transport.forget_socket(*conn);
                    self.transport.forget_stream(*conn);
                    self.websockets_up.remove(conn);
                    self.shared.ledger.set_connections(&self.id, self.websockets_up.len(), now_ms());
                }
                Event::WsOpened { conn } | Event::StreamOpened { conn } => {
                    self.websockets_up.insert(*conn);
                    self.shared.ledger.set_connections(&self.id, self.websockets_up.len(), now_ms());
                    self.reached_platform();
                }
                // An adapter that talks to its platform over HTTP only has reached it with the
                // first answer; one that asked for a WebSocket, once the socket is open.
                Event::HttpResponse { status, .. } | Event::HttpBytesResponse { status, .. }
                    if (200..300).contains(status) && !self.asked_for_websocket =>
                {
                    self.reached_platform()
                }
                Event::TimerFired { timer } => self.transport.timer_fired(*timer),
                _ => {}
            }
        }
        let export = batch.iter().any(moves_state);
        let mut batch = batch;
        let mut failures: HashMap<usize, u32> = HashMap::new();
        let mut dead: Vec<usize> = Vec::new();
        let mut substituted: Vec<usize> = Vec::new();
        let mut restart: Option<Handover> = None;
        let (handled, exported, number) = loop {
            let Some(running) = self.current.as_ref() else {
                // Halted (or the apartment died) while retrying: keep the rest for later.
                self.parked.extend(batch.into_iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e));
                return;
            };
            let number = running.number;
            let live: Vec<usize> = (0..batch.len()).filter(|i| !dead.contains(i)).collect();
            let events: Vec<Event> = live.iter().map(|&i| batch[i].clone()).collect();
            let rebuild = restart
                .take()
                .map(|handover| (self.host_handle(number, handover.cold), self.config.adapter_config_json(), handover));
            let restarted = rebuild.is_some();
            let reached = Arc::new(AtomicUsize::new(NOT_IN_AN_EVENT));
            let noted = reached.clone();
            let outcome = running
                .apartment
                .run_within(self.call_budget(), move |resident| {
                    let mut events = events;
                    if let Some((host, config_json, handover)) = rebuild {
                        if let Err(e) = resident.reconstruct(host, &config_json, handover) {
                            return (vec![Err(e)], None);
                        }
                        events.insert(0, Event::Started { generation: number });
                    }
                    let expected = events.len();
                    let handled = resident.handle_all_noting(events, &noted);
                    noted.store(NOT_IN_AN_EVENT, Ordering::SeqCst);
                    let whole = handled.len() == expected && handled.iter().all(Result::is_ok);
                    let state = if whole && export { Some(resident.export_state()) } else { None };
                    (handled, state)
                })
                .await;
            let (mut handled, exported) = match outcome {
                Ok(outcome) => outcome,
                Err(ApartmentGone::Hung(after)) => {
                    // Which event it hangs on (none: in its constructor or its state export).
                    let at = reached.load(Ordering::SeqCst);
                    let index = match at {
                        NOT_IN_AN_EVENT => None,
                        at if restarted => at.checked_sub(1).map(|p| live[p]),
                        at => live.get(at).copied(),
                    };
                    let during = index.map_or("a constructor or state export", |i| event_kind(&batch[i]));
                    self.shared.metrics.adapter_hangs.get_or_create(&metrics::channel(&self.id)).inc();
                    if let Some(trial) = self.trial.as_mut() {
                        // The new generation hangs on its first batch: the one it replaced
                        // takes over again (`replace`); tearing the new one down abandons it.
                        *trial = Some(format!("{during} did not return within {after:?}"));
                        return;
                    }
                    if self.stop_by.is_some() {
                        // Out of time because the instance is stopping, not necessarily hung
                        // for good: nothing is dead-lettered. The batch was not stored, so the
                        // next start resumes before it.
                        tracing::warn!(channel = %self.id, generation = number, event = during, "the adapter did not finish by the stop deadline; left behind, its events come again after the next start");
                        if let Some(late) = self.current.take() {
                            self.tear_down_later(late.number, late.apartment, GenerationState::Abandoned);
                        }
                        self.parked
                            .extend(batch.into_iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e));
                        return;
                    }
                    let error = format!("the adapter did not return within {after:?} from {during}");
                    return self.abandon_hung(number, batch, dead, index, &error).await;
                }
                Err(gone) => {
                    tracing::error!(channel = %self.id, generation = number, "{gone}; the instance has no running adapter");
                    self.retire_current(false);
                    continue;
                }
            };
            let failed_at = handled.iter().position(Result::is_err);
            let Some(position) = failed_at else {
                if restarted {
                    tracing::info!(channel = %self.id, generation = number, events = live.len(), "restarted adapter handled the batch");
                }
                break (handled, exported, number);
            };
            let error = match handled.swap_remove(position) {
                Err(error) => error.to_string(),
                Ok(_) => unreachable!("position points at an error"),
            };
            self.shared.metrics.adapter_panics.get_or_create(&metrics::channel(&self.id)).inc();
            if let Some(trial) = self.trial.as_mut() {
                // A new generation failing its first batch: nothing of it was carried out, and
                // the generation it replaced takes over again (`replace`).
                *trial = Some(format!("{} failed: {error}", event_kind(&batch[live[position]])));
                return;
            }
            // With a rebuild, position 0 is its `Started`: the restart itself failed.
            let index = if restarted { position.checked_sub(1).map(|p| live[p]) } else { Some(live[position]) };
            match index {
                None => {
                    tracing::error!(channel = %self.id, generation = number, "the restarted adapter failed to start: {error}")
                }
                Some(index) => {
                    let attempts = failures.entry(index).or_insert(0);
                    *attempts += 1;
                    let kind = event_kind(&batch[index]);
                    if *attempts >= 2 {
                        if substituted.contains(&index) {
                            tracing::error!(channel = %self.id, generation = number, event = kind, "adapter failed on the stand-in for a dead letter too; dropped: {error}");
                            dead.push(index);
                        } else {
                            self.dead_letter(number, &batch[index], &error).await;
                            // Where the adapter tracks a cursor, it is told to move past the
                            // event instead of acting on it (else a resume brings it back).
                            match stand_in(&batch[index]) {
                                Some(stand_in) => {
                                    batch[index] = stand_in;
                                    substituted.push(index);
                                    failures.remove(&index);
                                }
                                None => dead.push(index),
                            }
                        }
                    } else {
                        tracing::error!(channel = %self.id, generation = number, event = kind, "adapter failed on an event; restarting it from its last good state to try once more: {error}");
                    }
                }
            }
            if !self.may_restart() {
                let remaining =
                    batch.iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e.clone()).collect();
                self.halt(remaining, &error);
                return;
            }
            self.shared.metrics.adapter_restarts.get_or_create(&metrics::channel(&self.id)).inc();
            // The earlier batches' actions first: the handover lists the open connections.
            self.settle().await;
            let cold = self.current.as_ref().is_some_and(|r| r.cold_start);
            restart = Some(Handover {
                generation: number,
                previous_state: self.saved_state.clone().map_or(RNone, RSome),
                connections: self.transport.open_connections().into(),
                cold,
            });
        };
        self.handled_at = Some(Instant::now());
        // These frames are handled (or dead-lettered): their socket may read as many more.
        self.transport.frames_handled(
            batch
                .iter()
                .filter(|e| {
                    matches!(
                        e,
                        Event::WsFrame { .. }
                            | Event::WsFrameSkipped { .. }
                            | Event::WsBinaryFrame { .. }
                            | Event::StreamLine { .. }
                            | Event::StreamData { .. }
                    )
                })
                .count(),
        );
        let count = handled.len() as u64;
        if let Some(running) = self.current.as_mut() {
            running.events_handled += count;
            running.cold_start = false;
        }
        let id = self.id.clone();
        self.shared.ledger.update(&id, number, |r| r.events_handled += count);
        self.shared.metrics.events_dispatched.get_or_create(&metrics::channel(&id)).inc_by(count);
        let commands: Vec<Command> = handled.into_iter().flatten().flatten().collect();
        let state = match exported {
            Some(Ok(state)) => Some(state),
            Some(Err(e)) => {
                tracing::error!(channel = %id, generation = number, "adapter could not export its state: {e}");
                None
            }
            None => None,
        };
        // Write ahead: the batch's inbound, reply outcomes and the adapter's cursor are stored
        // together before anything the batch asked for is carried out.
        self.submit(number, commands, state, false).await;
    }

    /// Count a restart against the instance's budget; whether it is allowed.
    pub(super) fn may_restart(&mut self) -> bool {
        let (budget, window) = self.shared.adapter_restarts;
        let now = Instant::now();
        self.restarts.retain(|at| now.duration_since(*at) < window);
        if self.restarts.len() >= budget as usize {
            return false;
        }
        self.restarts.push_back(now);
        true
    }

    /// Give up on an event the adapter failed on twice: store it, say which session it
    /// concerned, and settle a reply it carried as failed.
    pub(super) async fn dead_letter(&mut self, generation: u64, event: &Event, error: &str) {
        let kind = event_kind(event);
        let conversation = match self.current.as_ref() {
            Some(running) => {
                let probe = event.clone();
                running.apartment.run(move |resident| resident.conversation_of(&probe)).await.ok().flatten()
            }
            None => None,
        }
        .unwrap_or_default();
        let sessions: Vec<String> = if conversation.is_empty() {
            Vec::new()
        } else {
            self.shared
                .router
                .list_sessions_async(&self.id, "")
                .await
                .into_iter()
                .filter(|s| s.target.conversation_id == conversation)
                .map(|s| s.key)
                .collect()
        };
        let session = if sessions.is_empty() { "(none yet)".to_string() } else { sessions.join(",") };
        let payload = match event {
            Event::WsFrame { text, .. } | Event::WsFrameReplayed { text } => text.to_string(),
            Event::HttpResponse { body, status, .. } => format!("HTTP {status}: {body}"),
            Event::HttpBytesResponse { body, status, .. } => {
                format!("HTTP {status} ({} bytes): {}", body.len(), String::from_utf8_lossy(body))
            }
            Event::WsBinaryFrame { data, .. } => {
                format!("binary frame ({} bytes): {}", data.len(), String::from_utf8_lossy(data))
            }
            Event::DeliverReply(reply) => reply.text.to_string(),
            other => format!("{other:?}"),
        };
        self.shared.metrics.dead_letters.get_or_create(&metrics::channel(&self.id)).inc();
        let letter = DeadLetter {
            channel_instance: self.id.clone(),
            generation,
            event_kind: kind.to_string(),
            conversation_id: conversation.clone(),
            session_key: session.clone(),
            payload,
            error: error.to_string(),
        };
        let stored = self.shared.router.add_dead_letter(letter).await;
        if let Err(e) = &stored {
            self.shared.metrics.store_errors.inc();
            tracing::error!(channel = %self.id, "cannot store the dead letter: {e}");
        }
        if let Event::DeliverReply(reply) = event {
            self.pending_replies.remove(&reply.reply_id);
            self.shared.metrics.replies_failed.get_or_create(&metrics::channel(&self.id)).inc();
            let marked =
                self.shared.router.writer().mark_failed(reply.reply_id, &format!("dead-lettered: {error}"), now_ms());
            if let Err(e) = marked.await {
                tracing::error!(channel = %self.id, reply_id = reply.reply_id, "cannot mark the reply failed: {e}");
            }
        }
        tracing::error!(
            channel = %self.id,
            generation,
            session = %session,
            conversation = %conversation,
            event = kind,
            dead_letter = stored.unwrap_or(0),
            "dead-lettered an event the adapter failed on twice; the rest goes on: {error}"
        );
    }

    /// The running generation `number` hangs in a call: it is abandoned (its thread and
    /// library are left as they are, see [`crate::apartment`]), the event it hangs on is
    /// dead-lettered — not tried again, each try would cost another thread — and the rest of
    /// the batch waits for a new generation of the current build, which the reload
    /// controller starts from the last good state (within the restart budget).
    async fn abandon_hung(
        &mut self,
        number: u64,
        mut batch: Vec<Event>,
        mut dead: Vec<usize>,
        hung_on: Option<usize>,
        error: &str,
    ) {
        tracing::error!(
            channel = %self.id,
            generation = number,
            timeout = ?self.shared.adapter_call_timeout,
            "{error}; generation abandoned: its thread and library stay loaded (counted against \
             gateway.generation_budget) and the instance restarts from its last good state"
        );
        if let Some(index) = hung_on {
            self.dead_letter(number, &batch[index], error).await;
            match stand_in(&batch[index]) {
                Some(stand_in) => batch[index] = stand_in,
                None => dead.push(index),
            }
        }
        let remaining: Vec<Event> =
            batch.into_iter().enumerate().filter(|(i, _)| !dead.contains(i)).map(|(_, e)| e).collect();
        if !self.may_restart() {
            return self.halt(remaining, error);
        }
        self.shared.metrics.adapter_restarts.get_or_create(&metrics::channel(&self.id)).inc();
        let Some(hung) = self.current.take() else { return };
        self.tear_down_later(hung.number, hung.apartment, GenerationState::Abandoned);
        let mut kept = remaining;
        kept.append(&mut self.parked);
        self.parked = kept;
        self.vacant.store(true, Ordering::SeqCst);
        // Not awaited: the controller may itself be waiting on this instance (a reload).
        let supervisor = self.shared.supervisor.clone();
        let channel = self.id.clone();
        tokio::spawn(async move {
            let _ = supervisor.send(crate::gateway::ControlMessage::GenerationAbandoned { channel }).await;
        });
    }

    /// The restart budget is spent: stop running an adapter for this instance. Events are
    /// kept (parked) for the next generation a reload brings.
    pub(super) fn halt(&mut self, remaining: Vec<Event>, error: &str) {
        let (budget, window) = self.shared.adapter_restarts;
        let Some(old) = self.current.take() else { return };
        tracing::error!(
            channel = %self.id,
            generation = old.number,
            restarts = budget,
            window = ?window,
            kept_events = remaining.len() + self.parked.len(),
            "channel instance halted: the adapter failed again after {budget} restarts within {window:?} ({error}); \
             drop a fixed build into the plugin directory or reload to resume"
        );
        self.shared.ledger.update(&self.id, old.number, |r| r.state = GenerationState::Retiring);
        self.tear_down_later(old.number, old.apartment, GenerationState::Halted);
        self.shared.metrics.instance_halted.get_or_create(&metrics::channel(&self.id)).set(1);
        let mut kept = remaining;
        kept.append(&mut self.parked);
        self.parked = kept;
    }
}

/// What the adapter gets instead of an event it failed on twice, where it must learn that
/// the event is gone: a skipped frame or response (move the sequence or sync token past it).
/// An adapter of ABI v1.0 gets a failed request for a skipped response (the apartment turns
/// it so), and nothing for a binary frame (it never got those).
pub(super) fn stand_in(event: &Event) -> Option<Event> {
    match event {
        Event::WsFrame { conn, text } => Some(Event::WsFrameSkipped { conn: *conn, text: text.clone() }),
        Event::HttpResponse { request, status, headers, body } => Some(Event::HttpResponseSkipped {
            request: *request,
            status: *status,
            headers: headers.clone(),
            body: body.as_bytes().to_vec().into(),
        }),
        Event::HttpBytesResponse { request, status, headers, body } => Some(Event::HttpResponseSkipped {
            request: *request,
            status: *status,
            headers: headers.clone(),
            body: body.clone(),
        }),
        _ => None,
    }
}

impl Instance {
    /// Note once that the platform answered (start-up readiness waits for it).
    fn reached_platform(&mut self) {
        if !self.reached {
            self.reached = true;
            self.shared.ledger.mark_reached(&self.id);
        }
    }
}

/// Whether a batch can have moved the adapter's state (everything but typing indicators).
fn moves_state(event: &Event) -> bool {
    !matches!(event, Event::AgentWorking { .. })
}
