//! The plugin directory watch: new adapter builds are picked up by themselves.
//!
//! File events come from the OS (inotify through `notify`: nothing polls, so an idle gateway
//! is not woken by the watch) and are gathered for `DEBOUNCE`; hidden and temporary files are ignored
//! (deployers copy to a temporary name and rename it into place), and a changed library must
//! hold its size and mtime still for `plugins.settle_ms` before anything is loaded, so a slow
//! `cp` straight into the directory is not loaded half-written. Then the watch sends one
//! [`ControlMessage::PluginsChanged`]: the same control path as every other reload trigger.
//! Whether the content really changed is the controller's call (it hashes every file).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::{catalog::is_candidate, gateway::ControlMessage};

/// How long file events are gathered before they are acted on.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A file still changing after this long is loaded anyway (and refused if it is broken).
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// A running watch; dropping it stops it.
pub struct PluginWatch {
    dir: PathBuf,
    _watcher: RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl PluginWatch {
    pub fn start(dir: &Path, settle: Duration, control: mpsc::Sender<ControlMessage>) -> Result<Self, String> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
                let paths: Vec<PathBuf> = event.paths.into_iter().filter(|p| is_candidate(p)).collect();
                if !paths.is_empty() {
                    let _ = tx.send(paths);
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!("plugin directory watch: {error}"),
        })
        .map_err(|e| e.to_string())?;
        watcher.watch(dir, RecursiveMode::NonRecursive).map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            while let Some(mut paths) = rx.recv().await {
                // A copy or rename is several events: gather them, and whatever else arrives
                // meanwhile is handled by the same reload.
                tokio::time::sleep(DEBOUNCE).await;
                while let Ok(more) = rx.try_recv() {
                    paths.extend(more);
                }
                paths.sort();
                paths.dedup();
                for path in &paths {
                    settle_file(path, settle).await;
                }
                tracing::info!(files = ?paths, "plugin directory changed");
                if control.send(ControlMessage::PluginsChanged { files: paths }).await.is_err() {
                    return;
                }
            }
        });
        tracing::info!(dir = %dir.display(), "watching the plugin directory");
        Ok(Self { dir: dir.to_path_buf(), _watcher: watcher, task })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PluginWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wait until `path`'s size, times and inode stay the same for `settle` (or it is gone).
async fn settle_file(path: &Path, settle: Duration) {
    let look = |path: &Path| std::fs::metadata(path).ok().map(|m| crate::catalog::FileStamp::of(&m));
    let started = tokio::time::Instant::now();
    let mut last = look(path);
    loop {
        tokio::time::sleep(settle).await;
        let now = look(path);
        if now.is_none() || now == last || started.elapsed() > SETTLE_LIMIT {
            return;
        }
        tracing::debug!(file = %path.display(), "plugin file still being written; waiting");
        last = now;
    }
}
