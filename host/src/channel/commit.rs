//! The write-ahead pipeline: a handled batch goes to the store, and what it asked for is
//! carried out once it is stored, in order.

use super::*;
use crate::transport::HttpRequest;

impl Instance {
    /// Carry out what a stored batch asked for.
    pub(super) fn carry_out(&mut self, committed: Committing, outcome: Result<Vec<Option<i64>>, StoreError>) {
        let Committing { generation, commands, storing_state, inbound, taken_at, .. } = committed;
        let inbound_ids = match outcome {
            Ok(ids) => ids,
            Err(e) => {
                if storing_state {
                    self.state_unstored = true;
                }
                self.shared.metrics.store_errors.inc();
                tracing::error!(
                    channel = %self.id,
                    generation,
                    inbound,
                    "cannot store this batch; its messages are answered but a crash now could lose them: {e}"
                );
                // Without the store there is no telling a redelivery; answer rather than drop.
                (0..inbound).map(|_| Some(0)).collect()
            }
        };
        let mut inbound_ids = inbound_ids.into_iter();
        for command in commands {
            match command {
                Command::Inbound(inbound) => match inbound_ids.next().flatten() {
                    Some(inbound_id) => self.shared.router.route(&self.id, inbound_id, inbound, taken_at),
                    None => {
                        self.shared.metrics.inbound_redelivered.get_or_create(&metrics::channel(&self.id)).inc();
                        tracing::info!(
                            channel = %self.id,
                            message_id = %inbound.message_id,
                            "inbound seen before (replay or catch-up); not answered twice"
                        );
                    }
                },
                command => self.execute(generation, command),
            }
        }
    }

    /// Wait for every batch in flight to be stored and carry out what each asked for.
    pub(super) async fn settle(&mut self) {
        while let Some(mut committed) = self.committing.pop_front() {
            let outcome = (&mut committed.outcome).await;
            self.carry_out(committed, outcome);
        }
    }

    /// Send one batch to the store, to be carried out once stored ([`Self::carry_out`]); waits
    /// only when [`COMMITS_IN_FLIGHT`] batches are already on their way. The adapter's state
    /// goes with it when `state_now` or [`STATE_STORE_EVERY`] has passed.
    pub(super) async fn submit(
        &mut self,
        generation: u64,
        commands: Vec<Command>,
        state: Option<(u32, String)>,
        state_now: bool,
    ) {
        let mut record = BatchRecord { adapter_state: state, ..Default::default() };
        for command in &commands {
            match command {
                Command::Inbound(inbound) => record.inbound.push(inbound.clone()),
                Command::ReplyDelivered { reply_id, platform_message_id } => {
                    record.delivered.push((*reply_id, platform_message_id.clone()))
                }
                Command::ReplyFailed { reply_id, error, retryable: false, .. } => {
                    record.failed.push((*reply_id, error.clone()))
                }
                Command::SaveState { format_version, data } if record.adapter_state.is_none() => {
                    record.adapter_state = Some((*format_version, data.clone()))
                }
                _ => {}
            }
        }
        if let Some((format_version, data)) = record.adapter_state.take() {
            self.saved_state = Some(StateBlob { format_version, data: data.into() });
            self.state_unstored = true;
        }
        let due = state_now || self.state_stored_at.is_none_or(|at| at.elapsed() >= STATE_STORE_EVERY);
        if self.state_unstored && due {
            record.adapter_state = self.saved_state.as_ref().map(|s| (s.format_version, s.data.to_string()));
        }
        let storing_state = record.adapter_state.is_some();
        // A confirmation alone is not worth a commit of its own (a third of a reply's writes):
        // until it is stored, a restart hands the reply back and the adapter looks before it
        // posts again. The adapter's state, which no longer lists the delivery, is never
        // stored without it.
        let only_confirmations = record.inbound.is_empty() && record.failed.is_empty() && !storing_state && !state_now;
        if only_confirmations {
            self.confirmations_unstored.append(&mut record.delivered);
        } else if !self.confirmations_unstored.is_empty() {
            let mut delivered = std::mem::take(&mut self.confirmations_unstored);
            delivered.append(&mut record.delivered);
            record.delivered = delivered;
        }
        if storing_state {
            // Counted as stored from now on; a failed commit marks it unstored again.
            self.state_unstored = false;
            self.state_stored_at = Some(Instant::now());
        }
        let inbound = record.inbound.len();
        let taken_at = self.batch_taken_at;
        let nothing_to_store =
            inbound == 0 && record.delivered.is_empty() && record.failed.is_empty() && !storing_state;
        if nothing_to_store && self.committing.is_empty() {
            let ready = PendingBatch::ready(Ok(Vec::new()));
            return self.carry_out(
                Committing { generation, commands, storing_state, inbound, taken_at, outcome: ready },
                Ok(Vec::new()),
            );
        }
        let outcome = if nothing_to_store {
            PendingBatch::ready(Ok(Vec::new()))
        } else {
            self.shared.router.writer().submit_batch(&self.id, record, now_ms())
        };
        if self.committing.len() >= COMMITS_IN_FLIGHT {
            if let Some(mut oldest) = self.committing.pop_front() {
                let outcome = (&mut oldest.outcome).await;
                self.carry_out(oldest, outcome);
            }
        }
        self.committing.push_back(Committing { generation, commands, storing_state, inbound, taken_at, outcome });
    }

    pub(super) fn execute(&mut self, generation: u64, command: Command) {
        match command {
            Command::WsOpen { conn, url, headers } => {
                tracing::info!(channel = %self.id, generation, conn, url = %redact_query(&url), "opening WebSocket");
                self.asked_for_websocket = true;
                self.transport.ws_open(conn, url, headers);
            }
            Command::WsSend { conn, text } => self.transport.ws_send(conn, text),
            Command::WsSendBinary { conn, data } => self.transport.ws_send_binary(conn, data),
            Command::StreamOpen(spec) => {
                tracing::info!(channel = %self.id, generation, conn = spec.conn, address = %spec.address(), tls = spec.tls, "opening stream");
                self.transport.stream_open(spec);
            }
            Command::StreamSend { conn, data } => self.transport.stream_send(conn, data),
            Command::StreamClose { conn } => self.transport.stream_close(conn),
            Command::WsClose { conn, code, reason } => self.transport.ws_close(conn, code, reason),
            Command::Http { request, method, url, headers, body, timeout_ms, max_response_bytes, bytes } => {
                let request =
                    HttpRequest { request, method, url, headers, body, timeout_ms, max_response_bytes, bytes };
                self.transport.http(request)
            }
            Command::SetTimer { timer, after_ms } => self.transport.set_timer(timer, after_ms),
            Command::CancelTimer { timer } => self.transport.cancel_timer(timer),
            Command::Inbound(_) => unreachable!("inbound is routed by dispatch"),
            Command::ReplyDelivered { reply_id, platform_message_id } => {
                self.host_retries.remove(&reply_id);
                let labels = metrics::channel(&self.id);
                self.shared.metrics.replies_delivered.get_or_create(&labels).inc();
                if let Some(taken_at) = self.shared.router.reply_timed_from(reply_id as i64) {
                    let latency = taken_at.elapsed().as_secs_f64();
                    self.shared.metrics.reply_latency_seconds.get_or_create(&labels).observe(latency);
                }
                match self.pending_replies.remove(&reply_id) {
                    Some(reply) => tracing::info!(
                        channel = %self.id,
                        session = %reply.session_key,
                        conversation = %reply.conversation_id,
                        reply_id,
                        post_id = %platform_message_id,
                        "delivered reply to channel:{}",
                        reply.conversation_id
                    ),
                    None => {
                        tracing::info!(channel = %self.id, reply_id, post_id = %platform_message_id, "delivered reply")
                    }
                }
            }
            Command::ReplyFailed { reply_id, error, retryable, retry_after_ms } => {
                let reply = self.pending_replies.remove(&reply_id);
                let session = reply.as_ref().map_or("", |r| r.session_key.as_str());
                let conversation = reply.as_ref().map_or("", |r| r.conversation_id.as_str());
                let round = self.host_retries.entry(reply_id).or_insert(0);
                *round += 1;
                if retryable && *round <= HOST_DELIVERY_ROUNDS {
                    // The platform's own word on when (a rate limit) over the host's back-off.
                    let wait = match retry_after_ms {
                        0 => HOST_RETRY_AFTER * *round,
                        ms => Duration::from_millis(ms),
                    };
                    tracing::warn!(channel = %self.id, session, conversation, reply_id, round = *round, "reply not delivered yet ({error}); handing it to the adapter again in {wait:?}");
                    self.retry_delivery_later(reply_id, wait);
                } else {
                    self.host_retries.remove(&reply_id);
                    self.shared.router.reply_timed_from(reply_id as i64);
                    self.shared.metrics.replies_failed.get_or_create(&metrics::channel(&self.id)).inc();
                    if retryable {
                        // Dead-lettered: stays in the store as failed, with the reason.
                        // Not awaited (this runs between batches); the writer logs a failure.
                        self.shared.router.writer().mark_failed(reply_id, &error, now_ms()).detach();
                    }
                    tracing::error!(channel = %self.id, session, conversation, reply_id, retryable, "reply could not be delivered: {error}");
                }
            }
            Command::SaveState { .. } => {}
            Command::Log { level, message } => emit_adapter_log(&self.id, generation, level, &message),
            Command::Health { healthy, detail } => {
                let problem = (!healthy).then_some(detail);
                if self.shared.ledger.set_problem(&self.id, problem.clone()) {
                    match problem {
                        Some(detail) => {
                            tracing::warn!(channel = %self.id, generation, "channel instance not ready: {detail}")
                        }
                        None => tracing::info!(channel = %self.id, generation, "channel instance ready again"),
                    }
                }
            }
            Command::Unknown => {
                tracing::debug!(channel = %self.id, generation, "adapter asked for an action this host does not know; ignored")
            }
        }
    }
}

/// The outcome of the oldest batch in flight.
pub(super) async fn next_commit(committing: &mut VecDeque<Committing>) -> Result<Vec<Option<i64>>, StoreError> {
    match committing.front_mut() {
        Some(oldest) => (&mut oldest.outcome).await,
        None => std::future::pending().await,
    }
}

/// A URL for the log, without its query string (which may carry credentials).
pub(super) fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, query)) if query.contains("token") => format!("{base}?<redacted>"),
        _ => url.to_string(),
    }
}
