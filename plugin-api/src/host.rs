//! The host handle: the host's services an adapter may call, implemented by the host.
//! Calls run host code on the adapter's apartment thread and never block on I/O.

use abi_stable::{
    sabi_trait,
    std_types::{RArc, ROption, RStr, RString, RVec},
    StableAbi,
};

use crate::{action::LogLevel, ReplyTarget};

/// A session as the registry knows it. Keys follow
/// `agent:<agent>:<channel instance>:<channel|group|dm>:<peer id>[:thread:<root id>]`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub key: RString,
    pub agent_id: RString,
    pub channel_instance: RString,
    pub target: ReplyTarget,
    pub created_at_ms: i64,
    pub last_active_ms: i64,
}

#[sabi_trait]
pub trait HostApi: Send + Sync {
    /// The log bridge: the host re-emits the record under the adapter's instance and generation
    /// (a plugin's own `tracing` dispatcher goes nowhere, ARCHITECTURE.md §3.8).
    fn log(&self, level: LogLevel, message: RStr<'_>);

    /// A secret the operator configured by name (e.g. an environment variable name);
    /// never log it.
    fn secret(&self, name: RStr<'_>) -> ROption<RString>;

    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;

    /// Look up a session by key.
    fn session(&self, key: RStr<'_>) -> ROption<SessionInfo>;

    /// Every session of this adapter's channel instance whose key starts with `key_prefix`.
    fn sessions(&self, key_prefix: RStr<'_>) -> RVec<SessionInfo>;

    /// Look up a session, creating it for `agent_id` with `target` when it does not exist.
    #[sabi(last_prefix_field)]
    fn open_session(&self, key: RStr<'_>, agent_id: RStr<'_>, target: ReplyTarget) -> SessionInfo;
}

/// The host handle as handed to an adapter (host-made, cheap to clone).
pub type HostHandle = HostApi_TO<'static, RArc<()>>;
