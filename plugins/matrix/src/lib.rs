//! # switchboard-matrix — the Matrix channel adapter
//!
//! A dynamic library the switchboard host loads (ABI v1, `switchboard-plugin-api`). It speaks
//! the Matrix client-server API v3 (`/sync` long-polling, `PUT …/send` with transaction ids)
//! through the host's HTTP transport: events in, actions out, no I/O of its own.
//!
//! Modules:
//! - [`settings`]: the channel config keys and their validation (every problem, key paths).
//! - [`adapter`]: the state machine, a module per concern — requests (every HTTP request is
//!   built in one place), sync (the `since` cursor, the first sync that answers no history,
//!   limited timelines filled from `/messages`, backoff), rooms (what a room is: public, group
//!   or DM; invites and auto-join), policy (which messages are answered, and as what inbound
//!   message), delivery (replies in order per room and thread, split, idempotent by
//!   transaction id, rate limits); the state handed to the next generation.
//! - [`text`]: mentions of the bot, reply fallbacks, splitting long replies.
//!
//! Cargo feature `export` (on by default) exports the root module the host loads.

pub mod adapter;
pub mod settings;
pub mod text;

use switchboard_plugin_api::{
    export::AdapterPlugin, Action, ConfigProblem, Event, Handover, HostHandle, Manifest, StateBlob, ABI_VERSION,
};

pub const ADAPTER_NAME: &str = "matrix";

/// Why a generation cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    #[error("the environment variable {0} (access_token_env) is not set")]
    MissingToken(String),
}

/// The adapter as the host sees it.
pub struct MatrixAdapter {
    inner: adapter::Adapter,
}

impl AdapterPlugin for MatrixAdapter {
    fn manifest() -> Manifest {
        Manifest {
            adapter_name: ADAPTER_NAME.into(),
            adapter_version: env!("CARGO_PKG_VERSION").into(),
            abi_version: ABI_VERSION,
            build: option_env!("SWITCHBOARD_BUILD_TAG").unwrap_or("dev").into(),
        }
    }

    fn validate_config(config_json: &str) -> Vec<ConfigProblem> {
        settings::parse(config_json).err().unwrap_or_default()
    }

    fn new(host: HostHandle, config_json: &str, handover: Handover) -> Result<Self, String> {
        let settings = settings::parse(config_json).map_err(|problems| {
            let listed: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key_path, p.message)).collect();
            StartError::InvalidConfig(listed.join("; ")).to_string()
        })?;
        let inner = adapter::Adapter::new(host, settings, handover).map_err(|e| e.to_string())?;
        Ok(Self { inner })
    }

    fn handle(&mut self, event: Event) -> Vec<Action> {
        self.inner.handle(event)
    }

    fn export_state(&mut self) -> StateBlob {
        self.inner.export_state()
    }

    fn conversation_of(&self, event: &Event) -> Option<String> {
        self.inner.conversation_of(event)
    }

    fn sample_config() -> Option<String> {
        Some(SAMPLE_CONFIG.to_string())
    }
}

/// A channel instance table for checks (`switchboard check-plugin --conformance`): the checker
/// supplies a placeholder token and does no I/O, so the address need not answer.
const SAMPLE_CONFIG: &str = r#"plugin = "matrix"
homeserver_url = "http://127.0.0.1:8008"
user_id = "@switchboard:localhost"
access_token_env = "MATRIX_ACCESS_TOKEN"
chatmode = "oncall"
"#;

#[cfg(feature = "export")]
switchboard_plugin_api::export_adapter!(MatrixAdapter);
