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
//! Cargo features `fixture-*` build variants for the host's tests: deliberately broken ones
//! (refusals, a panic on one message) and a second good build whose replies are tagged, so a
//! test can tell which build answered.

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
        let abi_version = if cfg!(feature = "fixture-abi-version") { ABI_VERSION + 1 } else { ABI_VERSION };
        Manifest {
            adapter_name: ADAPTER_NAME.into(),
            adapter_version: env!("CARGO_PKG_VERSION").into(),
            abi_version,
            build: if cfg!(feature = "fixture-build-b") {
                "b".into()
            } else {
                option_env!("SWITCHBOARD_BUILD_TAG").unwrap_or("dev").into()
            },
        }
    }

    fn validate_config(config_json: &str) -> Vec<ConfigProblem> {
        settings::parse(config_json).err().unwrap_or_default()
    }

    fn new(host: HostHandle, config_json: &str, handover: Handover) -> Result<Self, String> {
        if cfg!(feature = "fixture-panicking-constructor") {
            panic!("fixture: constructor panics on purpose");
        }
        let settings = settings::parse(config_json).map_err(|problems| {
            let listed: Vec<String> = problems.iter().map(|p| format!("{}: {}", p.key_path, p.message)).collect();
            format!("invalid config: {}", listed.join("; "))
        })?;
        Ok(Self { inner: adapter::Adapter::new(host, settings, handover)? })
    }

    fn handle(&mut self, event: Event) -> Vec<Action> {
        if cfg!(feature = "fixture-panic-on-started") && matches!(event, Event::Started { .. }) {
            panic!("fixture: this build panics when it is started");
        }
        self.inner.handle(event)
    }

    fn export_state(&mut self) -> StateBlob {
        self.inner.export_state()
    }

    fn conversation_of(&self, event: &Event) -> Option<String> {
        self.inner.conversation_of(event)
    }
}

#[cfg(all(feature = "export", not(feature = "fixture-abi-skew")))]
switchboard_plugin_api::export_adapter!(MattermostAdapter);

/// A root module under the adapter's name whose layout differs from ABI v1: the host's layout
/// check must refuse it.
#[cfg(feature = "fixture-abi-skew")]
pub mod skew {
    use abi_stable::{
        declare_root_module_statics, export_root_module, library::RootModule, package_version_strings,
        prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, std_types::RString, StableAbi,
    };

    #[repr(C)]
    #[derive(StableAbi)]
    #[sabi(kind(Prefix(prefix_ref = SkewedModuleRef)))]
    #[sabi(missing_field(panic))]
    pub struct SkewedModule {
        pub manifest: extern "C" fn() -> RString,
        #[sabi(last_prefix_field)]
        pub validate_config: extern "C" fn(u64) -> u64,
    }

    impl RootModule for SkewedModuleRef {
        declare_root_module_statics! {SkewedModuleRef}
        const BASE_NAME: &'static str = "switchboard_adapter";
        const NAME: &'static str = "switchboard_adapter";
        const VERSION_STRINGS: VersionStrings = package_version_strings!();
    }

    extern "C" fn manifest() -> RString {
        "skewed".into()
    }

    extern "C" fn validate_config(value: u64) -> u64 {
        value
    }

    #[export_root_module]
    pub fn skewed_root_module() -> SkewedModuleRef {
        SkewedModule { manifest, validate_config }.leak_into_prefix()
    }
}
