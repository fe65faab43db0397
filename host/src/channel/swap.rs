//! Swapping generations: export the running one's state, construct the next with it and the
//! open connections, cut over, and roll back while the new one is on trial.

use super::*;
use crate::apartment::ApartmentGone;

impl Instance {
    /// Swap in `prepared`. Events wait in the queue meanwhile. On any failure the current
    /// generation keeps serving, untouched.
    pub(super) async fn replace(
        &mut self,
        prepared: Prepared,
        config: ChannelConfig,
        done: oneshot::Sender<Result<(), String>>,
    ) {
        // What the current generation asked for so far is carried out first: the handover
        // lists the open connections, and the new generation must not miss one being opened.
        self.settle().await;
        let paused_at = Instant::now();
        let Prepared { number, apartment, source, digest } = prepared;
        let manifest = apartment.manifest.clone();
        self.shared.ledger.add(GenerationRecord {
            channel: self.id.clone(),
            generation: number,
            adapter_name: manifest.adapter_name.to_string(),
            adapter_version: manifest.adapter_version.to_string(),
            build: manifest.build.to_string(),
            abi_minor: apartment.build.abi_minor,
            source: source.clone(),
            sha256: digest.sha256_hex.clone(),
            copy: apartment.copy_path().to_path_buf(),
            loaded_at_ms: now_ms(),
            state: GenerationState::Refused,
            events_handled: 0,
            swap_pause_us: None,
            swap_settled_us: None,
            mapped: Some(true),
        });
        self.shared.metrics.generations_loaded.inc();

        // 1. The current generation's state; it is not told anything yet, so a failure
        //    below leaves it exactly as it was.
        let exported = match &self.current {
            Some(running) => Some(running.apartment.run(|resident| resident.export_state()).await),
            None => None,
        };
        let previous_state = match exported {
            Some(exported) => match exported {
                Ok(Ok((format_version, data))) => Some(StateBlob { format_version, data: data.into() }),
                Err(ApartmentGone::Hung(after)) => {
                    // The running generation hangs: it is abandoned, and the new one (perhaps
                    // the fixed build) starts from the last good state instead.
                    if let Some(hung) = self.current.take() {
                        tracing::error!(channel = %self.id, generation = hung.number, "the running generation did not export its state within {after:?}; abandoned, the new one starts from the last good state");
                        self.tear_down_later(hung.number, hung.apartment, GenerationState::Abandoned);
                    }
                    self.saved_state.clone()
                }
                Ok(Err(e)) => {
                    return self.refuse(
                        number,
                        apartment,
                        format!("the running generation could not export its state: {e}"),
                        done,
                    )
                }
                Err(gone) => return self.refuse(number, apartment, gone.to_string(), done),
            },
            None => self.saved_state.clone(),
        };

        let exported_after = paused_at.elapsed();

        // 2. Construct the new generation with the registry handle, the open connections
        //    and the handed-over state.
        let handover = Handover {
            generation: number,
            previous_state: previous_state.map_or(RNone, RSome),
            connections: self.transport.open_connections().into(),
            cold: self.cold,
        };
        let host = self.host_handle(number, self.cold);
        let config_json = config.adapter_config_json();
        match apartment.run(move |resident| resident.construct(host, &config_json, handover)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.refuse(number, apartment, format!("constructor failed: {e}"), done),
            Err(gone) => return self.refuse(number, apartment, gone.to_string(), done),
        }

        let constructed_after = paused_at.elapsed();

        // 3. Cut over: the new generation starts and the events queued meanwhile flow to it;
        //    then the old one is told it was replaced (it must leave the connections alone).
        //    It is only ever run when called, so telling it after the cut-over is safe and
        //    keeps its goodbye out of the pause.
        let previous = self.current.replace(Running { number, apartment, events_handled: 0, cold_start: self.cold });
        self.cold = false;
        self.vacant.store(false, Ordering::SeqCst);
        let previous_config = self.use_config(config);
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Running);
        self.shared.metrics.generations_started.inc();
        self.shared.metrics.instance_halted.get_or_create(&metrics::channel(&self.id)).set(0);
        let mut first = vec![Event::Started { generation: number }];
        // What waited while no generation ran goes first, a batch at a time (the rest
        // follows right after this one, see `feed_parked`).
        let from_parked = self.parked.len().min(BATCH - 1);
        first.extend(self.parked.drain(..from_parked));
        while self.parked.is_empty() && first.len() < BATCH {
            match self.events.try_recv() {
                Ok(event) => first.push(event),
                Err(_) => break,
            }
        }
        let first = self.hold_back_deliveries(first);
        self.handled_at = None;
        // On trial until its first batch went through: the old generation is kept (not yet
        // told it was replaced) to take over again with the same events if it fails.
        let held = previous.as_ref().map(|_| first.clone());
        self.trial = held.as_ref().map(|_| None);
        self.dispatch(first).await;
        if let (Some(Some(failure)), Some(held)) = (self.trial.take(), held) {
            return self.roll_back(number, previous, previous_config, held, failure, done).await;
        }
        self.trial = None;
        self.settle().await;
        // Paused until the new generation has handled what queued up; storing the batch and
        // carrying out what it asked for follows as for any batch (`swap_settled_us`).
        let settled = paused_at.elapsed();
        let pause = self.handled_at.map_or(settled, |at| at.duration_since(paused_at));
        self.shared.metrics.swap_pause_seconds.observe(pause.as_secs_f64());
        self.shared.ledger.update(&self.id, number, |r| {
            r.swap_pause_us = Some(pause.as_micros() as u64);
            r.swap_settled_us = Some(settled.as_micros() as u64);
        });
        if let Some(old) = previous {
            if let Ok(outcomes) = old
                .apartment
                .run(|resident| resident.handle_all(vec![Event::Shutdown { reason: ShutdownReason::Replaced }]))
                .await
            {
                for command in outcomes.into_iter().flatten().flatten() {
                    // Only its last words: anything else would act for a generation that is gone.
                    if let Command::Log { level, message } = command {
                        emit_adapter_log(&self.id, old.number, level, &message);
                    }
                }
            }
            self.retire(old, true);
        }
        tracing::info!(
            channel = %self.id,
            generation = number,
            adapter = %manifest.adapter_name,
            version = %manifest.adapter_version,
            build = %manifest.build,
            sha256 = %digest.short(),
            pause_us = pause.as_micros() as u64,
            exported_after_us = exported_after.as_micros() as u64,
            constructed_after_us = constructed_after.as_micros() as u64,
            "generation started"
        );
        let _ = done.send(Ok(()));
    }

    /// The new generation `number` failed its first batch: the one it replaced serves again,
    /// handed the same events (nothing the failed batch asked for was carried out).
    pub(super) async fn roll_back(
        &mut self,
        number: u64,
        previous: Option<Running>,
        previous_config: ChannelConfig,
        held: Vec<Event>,
        failure: String,
        done: oneshot::Sender<Result<(), String>>,
    ) {
        let Some(failed) = std::mem::replace(&mut self.current, previous) else { return };
        self.use_config(previous_config);
        self.discard(
            number,
            failed.apartment,
            &format!("new adapter generation failed its first batch, rolled back: {failure}"),
        );
        let events: Vec<Event> = held.into_iter().filter(|e| !matches!(e, Event::Started { .. })).collect();
        self.dispatch(events).await;
        self.settle().await;
        let _ = done.send(Err(format!("the new generation failed its first batch: {failure}")));
    }

    pub(super) fn refuse(
        &mut self,
        number: u64,
        apartment: Apartment,
        reason: String,
        done: oneshot::Sender<Result<(), String>>,
    ) {
        self.discard(number, apartment, &format!("new adapter generation refused, rolled back: {reason}"));
        let _ = done.send(Err(reason));
    }

    /// Generation `number` never serves: say why (with who still does) and tear it down.
    pub(super) fn discard(&mut self, number: u64, apartment: Apartment, why: &str) {
        self.shared.metrics.generations_refused.inc();
        let serving = self.current.as_ref().map(|r| r.number);
        tracing::error!(channel = %self.id, generation = number, still_serving = ?serving, "{why}");
        self.shared.ledger.update(&self.id, number, |r| r.state = GenerationState::Refused);
        self.tear_down_later(number, apartment, GenerationState::Refused);
    }

    /// Take `config` as the instance's, with the roots its `ca_file` says for new connections.
    pub(super) fn use_config(&mut self, config: ChannelConfig) -> ChannelConfig {
        if config.ca_file != self.config.ca_file {
            self.transport.set_tls(crate::tls::ChannelTls::for_channel(
                &self.id,
                config.ca_file.as_ref(),
                &self.shared.tls,
            ));
            tracing::info!(channel = %self.id, "ca_file changed: new connections trust the new roots");
        }
        std::mem::replace(&mut self.config, config)
    }

    pub(super) fn retire_current(&mut self, replaced: bool) {
        if let Some(old) = self.current.take() {
            self.retire(old, replaced);
        }
    }

    pub(super) fn retire(&mut self, old: Running, replaced: bool) {
        tracing::info!(channel = %self.id, generation = old.number, events_handled = old.events_handled, replaced, "retiring generation");
        self.shared.ledger.update(&self.id, old.number, |r| r.state = GenerationState::Retiring);
        self.tear_down_later(old.number, old.apartment, GenerationState::Unloaded);
    }

    /// Join the apartment and close the library off the event path, then check the maps.
    pub(super) fn tear_down_later(&self, number: u64, mut apartment: Apartment, final_state: GenerationState) {
        let channel = self.id.clone();
        let ledger = self.shared.ledger.clone();
        let metrics = self.shared.metrics.clone();
        tokio::task::spawn_blocking(move || {
            let result = apartment.tear_down();
            if result.abandoned {
                // Its thread may still run in the library: the copy stays, and so does the
                // mapping, until the process exits (or re-executes for the budget).
                metrics.generations_abandoned.inc();
                tracing::warn!(channel, generation = number, copy = %result.copy_path.display(), "generation abandoned: its thread and library are left loaded");
                ledger.update(&channel, number, |r| {
                    r.state = GenerationState::Abandoned;
                    r.mapped = result.still_mapped;
                });
                return;
            }
            metrics.generations_loaded.dec();
            match result.still_mapped {
                Some(true) => {
                    metrics.generations_still_mapped.inc();
                    tracing::warn!(channel, generation = number, copy = %result.copy_path.display(), "generation torn down but its copy is still mapped");
                    ledger.update(&channel, number, |r| {
                        r.state = GenerationState::StillMapped;
                        r.mapped = Some(true);
                    });
                }
                mapped => {
                    metrics.generations_unloaded.inc();
                    let _ = std::fs::remove_file(&result.copy_path);
                    tracing::info!(channel, generation = number, copy = %result.copy_path.display(), unmapped = mapped.is_some(), "generation unloaded");
                    ledger.update(&channel, number, |r| {
                        if r.state != GenerationState::Refused {
                            r.state = final_state;
                        }
                        r.mapped = mapped;
                    });
                }
            }
        });
    }
}
