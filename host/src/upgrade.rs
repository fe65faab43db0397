//! Re-executing the gateway (SIGUSR2, `POST /restart`, the generation budget) the way nginx
//! and haproxy apply an upgrade: the binary *now* at the path it was started from runs next.
//! After a package upgrade the running binary's own file is gone (`current_exe()` then says
//! `…/switchboard (deleted)`), so that path is remembered at start. Before stopping, the new
//! binary must check the config (`check-config`): when it cannot run or refuses the config,
//! the gateway keeps running and says why. Plugin probes run the *running* binary
//! (`/proc/self/exe`), whose ABI is the one the plugins will be loaded into.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

static START_PATH: OnceLock<PathBuf> = OnceLock::new();

/// How long the new binary may take to check the config.
const CHECK_TIMEOUT: Duration = Duration::from_secs(60);

/// Remember the path this process was started from; call first thing in `main`.
pub fn remember_start_path() {
    if let Ok(path) = std::env::current_exe() {
        let _ = START_PATH.set(path);
    }
}

/// The path the gateway was started from (where an upgrade puts the new binary).
pub fn start_path() -> PathBuf {
    START_PATH.get().cloned().unwrap_or_else(|| PathBuf::from("switchboard"))
}

/// The binary this process runs, even after its file was replaced or removed.
pub fn running_binary() -> PathBuf {
    if cfg!(target_os = "linux") {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("switchboard"))
    }
}

/// Whether the binary at the start-up path can take over: it runs and accepts `config_path`.
pub async fn check_successor(config_path: &Path) -> Result<PathBuf, String> {
    let path = start_path();
    let check = tokio::process::Command::new(&path)
        .arg("check-config")
        .arg(config_path)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Err(_) => Err(format!("{} check-config did not finish within {CHECK_TIMEOUT:?}", path.display())),
        Ok(Err(e)) => Err(format!("{} cannot be run: {e}", path.display())),
        Ok(Ok(output)) if output.status.success() => Ok(path),
        Ok(Ok(output)) => {
            let said = String::from_utf8_lossy(&output.stdout);
            let said: String = said.lines().take(5).collect::<Vec<_>>().join("; ");
            Err(format!("{} check-config failed ({}): {said}", path.display(), output.status))
        }
    }
}

/// Replace this process with the binary at the start-up path, same arguments. Returns only on
/// error (the runtime, adapters and sockets are gone by now; everything else is in the store).
pub fn exec() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let path = start_path();
    tracing::info!(exe = %path.display(), "starting the gateway again");
    std::process::Command::new(path).args(std::env::args_os().skip(1)).exec()
}
