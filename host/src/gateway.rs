//! The gateway: start-up, the reload controller and shutdown.
//!
//! Every reload trigger — SIGUSR1, SIGHUP, the admin API — becomes one [`ControlMessage`]
//! handled by one controller task (Vector's rule). A reload re-reads the config and the plugin
//! directory, validates *everything* (collecting all errors; the running config stays on any
//! error), then diffs by channel instance: only instances whose config or plugin file changed
//! get a new adapter generation; the others are not touched.
//!
//! Stopping is graceful: new inbound is only recorded, running turns and the delivery queue
//! get `gateway.stop_deadline_ms` to finish, the adapters store their last state. A restart
//! is the same stop followed by the caller starting the binary again ([`Exit::Restart`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    admin::{self, AdminState},
    catalog::{Catalog, Entry},
    channel::{self, InstanceHandle, Shared},
    config::{ChannelConfig, Config, ConfigError, ConfigErrors},
    ledger::Ledger,
    loader::FileDigest,
    metrics::Metrics,
    notify::Notifier,
    routing::Router,
    session::DurableSessions,
    store::{Store, StoreError, StoreWriter},
    watch::PluginWatch,
};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("state directory {dir}: {reason}")]
    StateDir { dir: PathBuf, reason: String },
    #[error("plugin directory {dir}: {reason}")]
    PluginDir { dir: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A request to the controller.
pub enum ControlMessage {
    Reload {
        trigger: &'static str,
        done: Option<oneshot::Sender<ReloadOutcome>>,
    },
    /// Stop gracefully, then have the caller start the binary again.
    Restart {
        trigger: &'static str,
    },
    /// Files in the plugin directory changed (from the watch): load changed builds, with
    /// the running config.
    PluginsChanged {
        files: Vec<PathBuf>,
    },
    /// A channel instance's task died (a panic in host code): restart it from the store.
    InstanceDied {
        channel: String,
        reason: String,
    },
    /// A channel instance abandoned its generation (a call into it did not return in time)
    /// and waits for a new one of the current build.
    GenerationAbandoned {
        channel: String,
    },
    /// The service manager's watchdog asks whether the controller still turns; the answer
    /// lists the running channel instances, whose tasks it asks next ([`crate::notify`]).
    Heartbeat {
        answer: oneshot::Sender<Vec<InstanceHandle>>,
    },
}

/// Where a reload takes its config from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigSource {
    /// Re-read the config file (signals, admin API).
    File,
    /// Keep the running config (a plugin file changed).
    Running,
}

/// How [`run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    Stopped,
    /// Stopped so the same binary can be started again (everything is in the store).
    Restart,
    /// Stopped because the gateway cannot go on (channel tasks died past their budget): the
    /// process exits non-zero for its supervisor to start it again.
    Failed(String),
}

#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReloadOutcome {
    Applied {
        changed: Vec<String>,
        added: Vec<String>,
        removed: Vec<String>,
        unchanged: Vec<String>,
        failed: Vec<String>,
    },
    Rejected {
        errors: Vec<String>,
    },
}

struct RunningChannel {
    handle: InstanceHandle,
    config: ChannelConfig,
    digest: FileDigest,
}

struct Controller {
    config_path: PathBuf,
    config: Config,
    catalog: Catalog,
    channels: BTreeMap<String, RunningChannel>,
    next_generation: BTreeMap<String, u64>,
    shared: Arc<Shared>,
    expected_channels: Arc<RwLock<BTreeSet<String>>>,
    /// What `GET /plugins` reports the plugin files against (a reload changes it).
    plugin_settings: Arc<RwLock<admin::PluginSettings>>,
    control: mpsc::Sender<ControlMessage>,
    watch: Option<PluginWatch>,
    /// The generation budget warning was logged (once per process).
    budget_warned: bool,
    /// When each channel instance's task died, within the restart window.
    instance_deaths: BTreeMap<String, Vec<std::time::Instant>>,
    /// The service manager's notifications (reloads are announced there).
    notifier: Notifier,
    /// `[retention]` as the hourly pruning reads it (a reload changes it).
    retention: Arc<std::sync::RwLock<crate::config::Retention>>,
    /// Libraries loaded by the start-up itself: a process that only started never re-executes
    /// for the budget (it would loop).
    opened_at_start: u64,
}

/// Run the gateway until `shutdown` completes. The admin listener, when given, is served
/// for the whole run (tests bind it on port 0).
pub async fn run(
    config_path: PathBuf,
    exe: PathBuf,
    admin_listeners: admin::Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<Exit, GatewayError> {
    let config = Config::load(&config_path)?;
    let (control_tx, mut control_rx) = mpsc::channel(16);
    let notifier = Notifier::from_env();
    notifier.status("starting: loading the channel instances' adapters");
    if let Some(interval) = crate::notify::watchdog_interval() {
        let answer_limit = crate::notify::instance_answer_limit(config.gateway.adapter_call_timeout);
        crate::notify::spawn_watchdog(notifier.clone(), interval, control_tx.clone(), answer_limit);
    }
    let mut controller = Controller::start(config_path, config, exe, control_tx.clone(), notifier.clone()).await?;
    let (ledger, expected) = (controller.shared.ledger.clone(), controller.expected_channels.clone());
    crate::notify::spawn_readiness(notifier.clone(), ledger, expected, controller.shared.disconnected_grace);
    spawn_signal_triggers(control_tx.clone());
    let state = AdminState {
        shared: controller.shared.clone(),
        control: control_tx.clone(),
        expected_channels: controller.expected_channels.clone(),
        plugin_settings: controller.plugin_settings.clone(),
    };
    if let Some((_, path)) = &admin_listeners.unix {
        tracing::info!("admin socket at {}", path.display());
    }
    if let Some(listener) = &admin_listeners.tcp {
        match listener.local_addr() {
            Ok(addr) => tracing::info!("admin listening on {addr}"),
            Err(e) => tracing::warn!("admin listener has no local address: {e}"),
        }
    }
    admin::serve(admin_listeners, state);
    tracing::info!(channels = controller.channels.len(), "gateway running");
    let exit = tokio::select! {
        exit = controller.serve(&mut control_rx) => exit,
        _ = shutdown => {
            tracing::info!("stop requested");
            Exit::Stopped
        }
    };
    match &exit {
        // The same process runs on (an exec keeps the PID): a reload to the service manager.
        Exit::Restart => notifier.reloading("restarting: stopping to re-execute the binary at the start-up path"),
        Exit::Stopped => notifier.stopping("stopping: finishing running turns and queued replies"),
        Exit::Failed(failure) => notifier.stopping(&format!("stopping for the supervisor: {failure}")),
    }
    controller.stop().await;
    Ok(exit)
}

fn spawn_signal_triggers(control: mpsc::Sender<ControlMessage>) {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, name) in [
        (SignalKind::user_defined1(), "SIGUSR1"),
        (SignalKind::hangup(), "SIGHUP"),
        (SignalKind::user_defined2(), "SIGUSR2"),
    ] {
        let control = control.clone();
        match signal(kind) {
            Ok(mut stream) => {
                tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        let message = if name == "SIGUSR2" {
                            ControlMessage::Restart { trigger: name }
                        } else {
                            ControlMessage::Reload { trigger: name, done: None }
                        };
                        if control.send(message).await.is_err() {
                            return;
                        }
                    }
                });
            }
            Err(e) => tracing::warn!("cannot listen for {name}: {e}"),
        }
    }
}

impl Controller {
    async fn start(
        config_path: PathBuf,
        config: Config,
        exe: PathBuf,
        control: mpsc::Sender<ControlMessage>,
        notifier: Notifier,
    ) -> Result<Controller, GatewayError> {
        prepare_state_dir(&config.gateway.state_dir)?;
        let snapshots = snapshots_dir(&config.gateway.state_dir);
        let mut catalog =
            Catalog::new(config.plugins.dir.clone(), exe, &snapshots).map_err(|e| GatewayError::StateDir {
                dir: config.gateway.state_dir.clone(),
                reason: format!("cannot make a catalog directory in {}: {e}", snapshots.display()),
            })?;
        let entries = resolve(&config, &mut catalog)
            .await
            .map_err(|errors| GatewayError::Config(ConfigErrors { file: config_path.clone(), errors }))?;
        let metrics = Arc::new(Metrics::new());
        // Opening, checking, pruning and warming the session cache read and write the disk:
        // on a blocking thread, not an async worker.
        let (state_dir, durability, retention) =
            (config.gateway.state_dir.clone(), config.gateway.durability, config.retention);
        let (cache_capacity, sync_seconds) =
            (config.gateway.session_cache_capacity, metrics.store_wal_sync_seconds.clone());
        let (writer, sessions) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let store = Arc::new(Store::open(&state_dir, durability)?);
            let counts = store.counts()?;
            tracing::info!(
                database = %store.path().display(),
                sessions = counts.sessions,
                turns = counts.turns,
                inbound_pending = counts.inbound_pending,
                outbound_queued = counts.outbound_queued,
                "state loaded"
            );
            prune(&store, retention);
            if let Err(e) = store.truncate_wal() {
                tracing::warn!("cannot write the WAL back at start-up: {e}");
            }
            let writer = Arc::new(StoreWriter::start(store, sync_seconds));
            let sessions = DurableSessions::with_writer(writer.clone(), cache_capacity)?;
            Ok((writer, sessions))
        })
        .await
        .map_err(|e| StoreError::Open {
            path: config.gateway.state_dir.join(crate::store::DATABASE_FILE),
            reason: format!("start-up thread: {e}"),
        })??;
        let retention = Arc::new(std::sync::RwLock::new(config.retention));
        spawn_pruning(writer.store().clone(), retention.clone());
        let tls = crate::tls::client_config(&[]);
        let http = crate::tls::http_client(&tls).map_err(|e| GatewayError::StateDir {
            dir: config.gateway.state_dir.clone(),
            reason: format!("HTTP client: {e}"),
        })?;
        let tls = crate::tls::ChannelTls { http: http.clone(), ws: tls };
        let router = Router::new(&config, Arc::new(sessions), writer, metrics.clone(), http.clone());
        let shared = Arc::new(Shared {
            router,
            metrics,
            ledger: Ledger::default(),
            http,
            tls,
            ws_max_message_bytes: config.gateway.ws_max_message_bytes,
            supervisor: control.clone(),
            adapter_restarts: (config.gateway.adapter_restart_budget, config.gateway.adapter_restart_window),
            adapter_call_timeout: config.gateway.adapter_call_timeout,
            disconnected_grace: config.gateway.disconnected_grace,
        });
        let mut controller = Controller {
            config_path,
            config: config.clone(),
            catalog,
            channels: BTreeMap::new(),
            next_generation: BTreeMap::new(),
            shared,
            expected_channels: Arc::new(RwLock::new(config.channels.keys().cloned().collect())),
            plugin_settings: Arc::new(RwLock::new(admin::PluginSettings::of(&config))),
            control,
            watch: None,
            budget_warned: false,
            instance_deaths: BTreeMap::new(),
            notifier,
            retention,
            opened_at_start: 0,
        };
        for (id, channel) in &config.channels {
            controller.add_channel(id, channel.clone(), &entries[id]).await;
        }
        controller.opened_at_start = crate::loader::libraries_opened();
        if controller.opened_at_start >= config.gateway.generation_budget {
            tracing::error!(
                budget = config.gateway.generation_budget,
                channels = config.channels.len(),
                "gateway.generation_budget is too small for the configured channels; it cannot be kept"
            );
        }
        controller.update_watch();
        Ok(controller)
    }

    async fn serve(&mut self, control: &mut mpsc::Receiver<ControlMessage>) -> Exit {
        let mut budget_restart_refused = false;
        loop {
            if !budget_restart_refused && self.generation_budget_spent() {
                if self.may_restart("generation_budget").await {
                    return Exit::Restart;
                }
                budget_restart_refused = true;
            }
            let Some(message) = control.recv().await else { break };
            match message {
                ControlMessage::Restart { trigger } => {
                    tracing::info!(trigger, "restart requested");
                    if self.may_restart(trigger).await {
                        return Exit::Restart;
                    }
                }
                ControlMessage::InstanceDied { channel, reason } => {
                    if let Some(failure) = self.instance_died(&channel, &reason).await {
                        return Exit::Failed(failure);
                    }
                }
                ControlMessage::GenerationAbandoned { channel } => self.replace_abandoned(&channel).await,
                ControlMessage::Heartbeat { answer } => {
                    let _ = answer.send(self.channels.values().map(|running| running.handle.clone()).collect());
                }
                ControlMessage::PluginsChanged { files } => {
                    self.notifier.reloading("reloading: a plugin file changed");
                    let outcome = self.reload("plugin_dir", ConfigSource::Running).await;
                    if let Some(outcome) = outcome {
                        self.count_reload("plugin_dir", &outcome);
                        self.notifier.reloaded(&crate::notify::reload_status("plugin_dir", &outcome));
                    } else {
                        tracing::info!(files = ?files, "plugin files touched but no adapter changed in content; nothing to do");
                        self.notifier.reloaded("reload (plugin_dir): no adapter changed in content");
                    }
                }
                ControlMessage::Reload { trigger, done } => {
                    self.notifier.reloading(&format!("reloading ({trigger})"));
                    let outcome =
                        self.reload(trigger, ConfigSource::File).await.unwrap_or_else(|| ReloadOutcome::Applied {
                            changed: vec![],
                            added: vec![],
                            removed: vec![],
                            unchanged: self.channels.keys().cloned().collect(),
                            failed: vec![],
                        });
                    self.count_reload(trigger, &outcome);
                    self.notifier.reloaded(&crate::notify::reload_status(trigger, &outcome));
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
            }
        }
        std::future::pending().await
    }

    fn count_reload(&self, trigger: &'static str, outcome: &ReloadOutcome) {
        let label = match outcome {
            ReloadOutcome::Applied { failed, .. } if failed.is_empty() => "applied",
            ReloadOutcome::Applied { .. } => "partly_applied",
            ReloadOutcome::Rejected { .. } => "rejected",
        };
        self.shared
            .metrics
            .reloads
            .get_or_create(&vec![("trigger", trigger.to_string()), ("outcome", label.to_string())])
            .inc();
    }

    /// Whether this process has loaded as many adapter generations as it may (each costs a
    /// TLS key for good, ARCHITECTURE.md §3.5); warns once at 80 % of the budget.
    fn generation_budget_spent(&mut self) -> bool {
        let budget = self.config.gateway.generation_budget;
        let loaded = crate::loader::libraries_opened();
        if loaded >= budget && loaded > self.opened_at_start {
            tracing::warn!(
                loaded,
                budget,
                "generation budget reached: restarting the gateway in place to free the TLS keys (nothing is lost)"
            );
            return true;
        }
        if !self.budget_warned && loaded * 5 >= budget * 4 {
            self.budget_warned = true;
            tracing::warn!(
                loaded,
                budget,
                "80% of the generation budget used; the gateway re-executes itself at the budget"
            );
        }
        false
    }

    /// Start, stop or move the plugin directory watch to match the config.
    fn update_watch(&mut self) {
        let plugins = &self.config.plugins;
        let wanted = plugins.watch.then_some(&plugins.dir);
        if self.watch.as_ref().map(PluginWatch::dir) == wanted.map(PathBuf::as_path) {
            return;
        }
        self.watch = None;
        if let Some(dir) = wanted {
            match PluginWatch::start(dir, plugins.settle, self.control.clone()) {
                Ok(watch) => self.watch = Some(watch),
                Err(e) => tracing::error!(
                    dir = %dir.display(),
                    "cannot watch the plugin directory ({e}); new builds are loaded on SIGHUP, SIGUSR1 or POST /reload"
                ),
            }
        }
    }

    /// Re-resolve the plugin directory (and re-read the config for `ConfigSource::File`) and
    /// apply the difference. `None` when the running config was used and no adapter file
    /// changed in content (nothing to do).
    async fn reload(&mut self, trigger: &'static str, source: ConfigSource) -> Option<ReloadOutcome> {
        let (new, mut errors) = match source {
            ConfigSource::File => {
                tracing::info!(trigger, config = %self.config_path.display(), "reload requested");
                Config::load_best_effort(&self.config_path)
            }
            ConfigSource::Running => (Some(self.config.clone()), Vec::new()),
        };
        let Some(new) = new else { return Some(self.reject(trigger, errors)) };
        let plugin_dir_changed = new.plugins.dir != self.catalog.dir();
        let mut other_catalog = None;
        if plugin_dir_changed {
            let snapshots = snapshots_dir(&self.config.gateway.state_dir);
            match Catalog::new(new.plugins.dir.clone(), self.catalog_exe(), &snapshots) {
                Ok(catalog) => other_catalog = Some(catalog),
                Err(e) => {
                    let message = format!("cannot make a catalog directory in {}: {e}", snapshots.display());
                    errors.push(ConfigError { key_path: "plugins.dir".into(), message });
                    return Some(self.reject(trigger, errors));
                }
            }
        }
        let resolved = resolve(&new, other_catalog.as_mut().unwrap_or(&mut self.catalog)).await;
        // Adapter problems are reported together with the host's, all in one pass.
        let entries = match resolved {
            Ok(entries) if errors.is_empty() => entries,
            Ok(_) => return Some(self.reject(trigger, errors)),
            Err(more) => {
                errors.extend(more);
                errors.sort();
                errors.dedup();
                return Some(self.reject(trigger, errors));
            }
        };
        if source == ConfigSource::Running
            && new.channels.keys().all(|id| self.channels.contains_key(id))
            && self.channels.iter().all(|(id, running)| entries.get(id).is_some_and(|e| e.digest == running.digest))
        {
            return None;
        }
        if source == ConfigSource::Running {
            tracing::info!(trigger, "reload requested: a plugin file changed");
        }
        if let Some(catalog) = other_catalog {
            self.catalog = catalog;
        }
        let at_next_start: Vec<&str> = [
            ("gateway.state_dir", new.gateway.state_dir != self.config.gateway.state_dir),
            ("gateway.admin_listen", new.gateway.admin_listen != self.config.gateway.admin_listen),
            ("gateway.admin_socket", new.gateway.admin_socket != self.config.gateway.admin_socket),
            ("gateway.admin_token_env", new.gateway.admin_token_env != self.config.gateway.admin_token_env),
            ("gateway.durability", new.gateway.durability != self.config.gateway.durability),
            ("gateway.io_threads", new.gateway.io_threads != self.config.gateway.io_threads),
            ("gateway.log_format", new.gateway.log_format != self.config.gateway.log_format),
            (
                "gateway.adapter_call_timeout_ms",
                new.gateway.adapter_call_timeout != self.config.gateway.adapter_call_timeout,
            ),
            ("gateway.disconnected_grace_ms", new.gateway.disconnected_grace != self.config.gateway.disconnected_grace),
            (
                "gateway.session_cache_capacity",
                new.gateway.session_cache_capacity != self.config.gateway.session_cache_capacity,
            ),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect();
        if !at_next_start.is_empty() {
            tracing::warn!(keys = ?at_next_start, "these changed keys take effect at the next start");
        }
        self.shared.router.apply(&new);

        let (mut changed, mut added, mut removed, mut unchanged, mut failed) = (vec![], vec![], vec![], vec![], vec![]);
        let gone: Vec<String> = self.channels.keys().filter(|id| !new.channels.contains_key(*id)).cloned().collect();
        for id in gone {
            if let Some(running) = self.channels.remove(&id) {
                running.handle.stop(tokio::time::Instant::now() + self.config.gateway.stop_deadline).await;
                tracing::info!(channel = %id, "channel instance removed");
                removed.push(id);
            }
        }
        for (id, channel) in &new.channels {
            let entry = &entries[id];
            match self.channels.get(id) {
                None => {
                    if self.add_channel(id, channel.clone(), entry).await {
                        added.push(id.clone());
                    } else {
                        failed.push(id.clone());
                    }
                }
                Some(running) if running.config == *channel && running.digest == entry.digest => {
                    unchanged.push(id.clone())
                }
                Some(_) => {
                    if self.replace_channel(id, channel.clone(), entry).await {
                        changed.push(id.clone());
                    } else {
                        failed.push(id.clone());
                    }
                }
            }
        }
        // Every configured instance is expected, also one that failed to start: /readyz says so.
        *self.expected_channels.write().unwrap() = new.channels.keys().cloned().collect();
        *self.retention.write().unwrap() = new.retention;
        *self.plugin_settings.write().unwrap() = admin::PluginSettings::of(&new);
        self.config = new;
        tracing::info!(
            trigger,
            changed = ?changed,
            added = ?added,
            removed = ?removed,
            unchanged = ?unchanged,
            failed = ?failed,
            "reload applied"
        );
        self.update_watch();
        Some(ReloadOutcome::Applied { changed, added, removed, unchanged, failed })
    }

    fn reject(&self, trigger: &'static str, errors: Vec<ConfigError>) -> ReloadOutcome {
        for error in &errors {
            tracing::error!(trigger, key = %error.key_path, "config error: {}", error.message);
        }
        tracing::error!(
            trigger,
            problems = errors.len(),
            "reload rejected: {} problem(s) in {}; the running config stays in force",
            errors.len(),
            self.config_path.display()
        );
        ReloadOutcome::Rejected { errors: errors.iter().map(ToString::to_string).collect() }
    }

    /// A channel instance's task died: everything it had accepted is in the store, so it is
    /// started again from there (a new generation, cold, as after a restart) — unless its
    /// tasks died more than `adapter_restart_budget` times within the window: then the
    /// gateway stops for its supervisor (the reason is returned).
    async fn instance_died(&mut self, id: &str, reason: &str) -> Option<String> {
        self.shared.metrics.instance_restarts.get_or_create(&crate::metrics::channel(id)).inc();
        let (budget, window) = self.shared.adapter_restarts;
        let now = std::time::Instant::now();
        let deaths = self.instance_deaths.entry(id.to_string()).or_default();
        deaths.retain(|at| now.duration_since(*at) < window);
        deaths.push(now);
        if deaths.len() > budget as usize {
            let failure =
                format!("the task of channel instance {id} died {} times within {window:?}: {reason}", deaths.len());
            tracing::error!(channel = %id, "{failure}; stopping the gateway for its supervisor");
            return Some(failure);
        }
        tracing::error!(channel = %id, "the channel instance's task died ({reason}); starting it again from the store");
        let old = self.channels.remove(id)?;
        for record in self.shared.ledger.snapshot().into_iter().filter(|r| r.channel == id) {
            if record.state == crate::ledger::GenerationState::Running {
                self.shared.ledger.update(id, record.generation, |r| r.state = crate::ledger::GenerationState::Halted);
            }
        }
        let entry = match self.catalog.find(&old.config.plugin) {
            Ok(entry) => entry.clone(),
            Err(e) => {
                tracing::error!(channel = %id, "cannot start the channel instance again: {e}");
                self.shared.ledger.set_problem(id, Some(format!("its task died and it cannot start again: {e}")));
                return None;
            }
        };
        if self.add_channel(id, old.config, &entry).await {
            tracing::info!(channel = %id, "channel instance started again after its task died");
        }
        None
    }

    /// Start a new generation of the current build for an instance whose generation was
    /// abandoned; it takes up, from the last good state, what waited meanwhile.
    async fn replace_abandoned(&mut self, id: &str) {
        let Some(running) = self.channels.get(id) else { return };
        if !running.handle.is_vacant() {
            return;
        }
        let config = running.config.clone();
        // A fixed build may have been dropped in meanwhile: look before loading.
        if let Err(e) = self.catalog.scan().await {
            tracing::warn!(channel = %id, "cannot read the plugin directory: {e}");
        }
        let entry = match self.catalog.find(&config.plugin) {
            Ok(entry) => entry.clone(),
            Err(e) => {
                tracing::error!(channel = %id, "cannot start a new generation after the last was abandoned: {e}");
                self.shared.ledger.set_problem(id, Some(format!("its generation hung and no build can start: {e}")));
                return;
            }
        };
        if self.replace_channel(id, config, &entry).await {
            tracing::info!(channel = %id, "new generation started after the last one was abandoned");
        }
    }

    /// Whether the binary at the start-up path can take over (else the gateway keeps running).
    async fn may_restart(&self, trigger: &str) -> bool {
        match crate::upgrade::check_successor(&self.config_path).await {
            Ok(path) => {
                tracing::info!(trigger, exe = %path.display(), "the binary at the start-up path accepts the config; stopping to start it");
                true
            }
            Err(why) => {
                tracing::error!(trigger, "restart refused, the gateway keeps running: {why}");
                false
            }
        }
    }

    fn catalog_exe(&self) -> PathBuf {
        crate::upgrade::running_binary()
    }

    fn generation_number(&mut self, id: &str) -> u64 {
        let next = self.next_generation.entry(id.to_string()).or_insert(1);
        let number = *next;
        *next += 1;
        number
    }

    async fn add_channel(&mut self, id: &str, config: ChannelConfig, entry: &Entry) -> bool {
        let number = self.generation_number(id);
        let generations = generations_dir(&self.config.gateway.state_dir);
        match channel::prepare(entry, generations, id, number, self.shared.adapter_call_timeout).await {
            Ok(prepared) => {
                let digest = prepared.digest.clone();
                let handle = channel::spawn(id.to_string(), config.clone(), prepared, self.shared.clone()).await;
                self.channels.insert(id.to_string(), RunningChannel { handle, config, digest });
                self.shared.ledger.set_problem(id, None);
                true
            }
            Err(e) => {
                self.shared.metrics.generations_refused.inc();
                tracing::error!(channel = %id, "cannot start the channel instance: {e}");
                self.shared.ledger.set_problem(id, Some(format!("cannot start: {e}")));
                false
            }
        }
    }

    async fn replace_channel(&mut self, id: &str, config: ChannelConfig, entry: &Entry) -> bool {
        let number = self.generation_number(id);
        let generations = generations_dir(&self.config.gateway.state_dir);
        let prepared = match channel::prepare(entry, generations, id, number, self.shared.adapter_call_timeout).await {
            Ok(prepared) => prepared,
            Err(e) => {
                self.shared.metrics.generations_refused.inc();
                tracing::error!(channel = %id, "new generation refused; the running one keeps serving: {e}");
                return false;
            }
        };
        let digest = prepared.digest.clone();
        let Some(running) = self.channels.get_mut(id) else { return false };
        match running.handle.replace(prepared, config.clone()).await {
            Ok(()) => {
                running.config = config;
                running.digest = digest;
                true
            }
            // The instance logged why and kept its generation.
            Err(_) => false,
        }
    }

    async fn stop(&mut self) {
        let router = self.shared.router.clone();
        // The whole stop ends by `stop_deadline_ms`, whatever an adapter does: turns and
        // queued replies get it less what the instances need to store their adapters' last
        // state, and the instances stop together, each by the end.
        let stop_deadline = self.config.gateway.stop_deadline;
        let end = tokio::time::Instant::now() + stop_deadline;
        let reserve = (stop_deadline / 4).min(std::time::Duration::from_secs(3));
        let deadline = end - reserve;
        let instances_by = end - (reserve / 5);
        router.drain();
        let turns_done = wait_until(deadline, || router.busy_turns() == 0).await;
        if !turns_done {
            tracing::warn!(
                turns = router.busy_turns(),
                "stop deadline reached with turns still running; they are answered after the next start"
            );
        }
        let channels: Vec<String> = self.channels.keys().cloned().collect();
        // Read in order through the writer: a confirmation already submitted counts.
        let queued = || async {
            let mut queued = 0;
            for channel in &channels {
                queued += router.queued_replies_async(channel).await.map_or(0, |q| q.len());
            }
            queued
        };
        let mut replies = queued().await;
        while replies > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            replies = queued().await;
        }
        if replies > 0 {
            tracing::warn!(
                replies,
                "stop deadline reached with replies still queued; they are sent after the next start"
            );
        }
        let stops = std::mem::take(&mut self.channels).into_iter().map(|(id, running)| async move {
            running.handle.stop(instances_by).await;
            tracing::info!(channel = %id, "channel instance stopped");
        });
        futures_util::future::join_all(stops).await;
        // Let tear-downs started by the stops finish before the process exits.
        let torn_down =
            || self.shared.ledger.snapshot().iter().all(|r| r.state != crate::ledger::GenerationState::Retiring);
        wait_until(end, torn_down).await;
        // Writes nobody waits for (a session insert, a reply marked failed) go before the
        // process does: the writer thread is not joined at exit.
        match tokio::time::timeout_at(end, router.writer().flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("the store's last writes failed: {e}"),
            Err(_) => tracing::warn!("stop deadline reached with store writes still queued"),
        }
        match router.counts_async().await {
            Ok(counts) => tracing::info!(
                sessions = counts.sessions,
                inbound_pending = counts.inbound_pending,
                outbound_queued = counts.outbound_queued,
                "gateway stopped; state stored"
            ),
            Err(e) => tracing::error!("gateway stopped; the store cannot be read: {e}"),
        }
    }
}

/// Poll `done` until it holds or `deadline` passes; whether it held.
async fn wait_until(deadline: tokio::time::Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Validate `config` against the plugin directory: every channel's adapter must be found,
/// and must accept its config. Returns each channel's plugin file, or every problem.
pub async fn resolve(config: &Config, catalog: &mut Catalog) -> Result<BTreeMap<String, Entry>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    match catalog.scan().await {
        Ok(refused) => {
            for (file, reason) in refused {
                tracing::warn!(file = %file.display(), "plugin file refused: {reason}");
            }
        }
        Err(e) => errors.push(ConfigError {
            key_path: "plugins.dir".into(),
            message: format!("cannot read {}: {e}", catalog.dir().display()),
        }),
    }
    let mut entries = BTreeMap::new();
    let mut by_file: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for (id, channel) in &config.channels {
        match catalog.find(&channel.plugin) {
            Ok(entry) => {
                by_file.entry(entry.path.clone()).or_default().push(id.clone());
                entries.insert(id.clone(), entry.clone());
            }
            Err(e) if errors.iter().all(|e| e.key_path != "plugins.dir") => {
                errors.push(ConfigError { key_path: format!("channels.{id}.plugin"), message: e.to_string() })
            }
            Err(_) => {}
        }
    }
    for ids in by_file.values() {
        let entry = &entries[&ids[0]];
        let configs: Vec<String> = ids.iter().map(|id| config.channels[id].adapter_config_json()).collect();
        match catalog.validate(entry, &configs).await {
            Ok(results) => {
                for (id, problems) in ids.iter().zip(results) {
                    for problem in problems {
                        let key_path = if problem.key_path.is_empty() {
                            format!("channels.{id}")
                        } else {
                            format!("channels.{id}.{}", problem.key_path)
                        };
                        errors.push(ConfigError { key_path, message: problem.message });
                    }
                }
            }
            Err(reason) => {
                for id in ids {
                    errors.push(ConfigError {
                        key_path: format!("channels.{id}.plugin"),
                        message: format!("{} could not validate this config: {reason}", entry.path.display()),
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        errors.sort();
        Err(errors)
    }
}

/// How often finished records are pruned (`[retention]`).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Prune what `[retention]` no longer keeps, and say what went.
fn prune(store: &Store, retention: crate::config::Retention) {
    let day_ms = 24 * 3600 * 1000;
    let now = crate::session::now_ms();
    let before = |days: u64| (days > 0).then(|| now - days as i64 * day_ms);
    match store.prune(
        before(retention.transcripts_days),
        before(retention.dead_letters_days),
        before(retention.delivered_days),
    ) {
        Ok(pruned) if pruned == Default::default() => {}
        Ok(pruned) => tracing::info!(
            turns = pruned.turns,
            dead_letters = pruned.dead_letters,
            inbound = pruned.inbound,
            outbound = pruned.outbound,
            "pruned records older than [retention] keeps"
        ),
        Err(e) => tracing::warn!("cannot prune old records: {e}"),
    }
}

/// Prune every [`PRUNE_EVERY`] for as long as the store is in use, off the async workers.
fn spawn_pruning(store: Arc<Store>, retention: Arc<std::sync::RwLock<crate::config::Retention>>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_EVERY, PRUNE_EVERY);
        loop {
            every.tick().await;
            let store = store.clone();
            let retention = *retention.read().unwrap();
            let _ = tokio::task::spawn_blocking(move || prune(&store, retention)).await;
        }
    });
}

pub fn generations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("generations")
}

/// Where catalogs keep the snapshots of plugin files they probe (see [`Catalog`]).
pub fn snapshots_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("plugin-snapshots")
}

/// Create the state directory and clear copies left by an earlier process.
pub fn prepare_state_dir(state_dir: &Path) -> Result<(), GatewayError> {
    let failed = |reason: String| GatewayError::StateDir { dir: state_dir.to_path_buf(), reason };
    let generations = generations_dir(state_dir);
    std::fs::create_dir_all(&generations)
        .map_err(|e| failed(format!("cannot create {}: {e}", generations.display())))?;
    let probe = state_dir.join(".write-test");
    std::fs::write(&probe, b"ok").map_err(|e| failed(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(probe);
    if let Ok(stale) = std::fs::read_dir(&generations) {
        for entry in stale.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // Catalogs of an earlier process (a re-exec runs no destructors).
    if let Ok(stale) = std::fs::read_dir(snapshots_dir(state_dir)) {
        for entry in stale.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}
