//! # switchboard-mattermost — the Mattermost channel adapter
//!
//! A dynamic library the switchboard host loads (ABI v1, `switchboard-plugin-api`). It speaks
//! the Mattermost WebSocket and REST APIs (`shared/design/MATTERMOST.md`) through the host's
//! transport: event in, actions out, no I/O of its own.
//!
//! Modules:
//! - [`settings`]: the channel config keys and their validation (every problem, key paths).
//! - [`adapter`]: the state machine, a module per concern — connection (hello, seq,
//!   keepalive, resume, backoff proven per connection), requests (one queue honouring
//!   `Retry-After`, bounded background concurrency), catch-up after a gap (UpdateAt
//!   semantics, paging, conversations never seen), policy (what is answered), delivery
//!   (in order per conversation, looked for before it is sent again); state handed to the
//!   next generation.
//! - [`text`]: mentions, prefixes, splitting long replies.
//!
//! Cargo feature `export` (on by default) exports the root module the host loads. The host's
//! test fixtures (`tests/fixtures/`: a second, tagged build, builds that panic or hang on one
//! message) wrap [`MattermostAdapter`] in libraries of their own and link this crate without
//! it.

pub mod adapter;
pub mod settings;
pub mod text;

use switchboard_plugin_api::{
    export::AdapterPlugin, Action, ConfigProblem, Event, Handover, HostHandle, Manifest, StateBlob, ABI_VERSION,
};

pub const ADAPTER_NAME: &str = "mattermost";

/// The adapter as the host sees it.
pub struct MattermostAdapter {
    inner: adapter::Adapter,
}

impl AdapterPlugin for MattermostAdapter {
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
            format!("invalid config: {}", listed.join("; "))
        })?;
        Ok(Self { inner: adapter::Adapter::new(host, settings, handover)? })
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
const SAMPLE_CONFIG: &str = r#"plugin = "mattermost"
base_url = "http://127.0.0.1:8065"
bot_token_env = "MM_BOT_TOKEN"
chatmode = "oncall"
"#;

#[cfg(feature = "export")]
switchboard_plugin_api::export_adapter!(MattermostAdapter);
