//! The host handle: the host's services an adapter may call, implemented by the host.
//! Calls run host code on the adapter's apartment thread and never block on I/O.

use abi_stable::{
    sabi_trait,
    std_types::{RArc, RNone, ROption, RStr, RString, RVec},
    StableAbi,
};

use crate::{action::LogLevel, ReplyTarget};

/// A session as the registry knows it. Keys follow
/// `agent:<agent>:<channel instance>:<channel|group|dm>:<peer id>[:thread:<root id>]`, where
/// each `<…>` is its value with `%` written `%25` and `:` written `%3A` (upper case) and
/// nothing else escaped; any other `%` sequence makes the string no key. So a Matrix DM with
/// `@alice:example.org` is `agent:main:matrix:dm:@alice%3Aexample.org`, while values with
/// neither character (every Mattermost id) appear as they are. An empty thread root means no
/// thread: there is no `:thread:` part then. The host's `switchboard::session` module builds
/// and parses keys (`session_key`, `SessionKey::parse`).
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

    /// Every session of this adapter's channel instance whose key starts with `key_prefix`
    /// (bytes, not parts). End the prefix at a part boundary, i.e. with `:` after escaped
    /// parts, or it matches longer values too: `agent:main:matrix:dm:@alice%3Aexample.org`
    /// also starts the keys of `@alice:example.org.evil`. A peer's threads are under
    /// `…:dm:<peer>:`; its session without a thread is the exact key (see [`Self::session`]).
    /// `""` lists them all.
    fn sessions(&self, key_prefix: RStr<'_>) -> RVec<SessionInfo>;

    /// Look up a session, creating it for `agent_id` with `target` when it does not exist.
    #[sabi(last_prefix_field)]
    fn open_session(&self, key: RStr<'_>, agent_id: RStr<'_>, target: ReplyTarget) -> SessionInfo;

    /// v1.1: everything the previous generation left open that this one inherits, of every
    /// kind ([`OpenResource`]): WebSockets (as in [`crate::Handover::connections`]), HTTP
    /// requests whose answer will reach this generation, armed timers. Fixed at the
    /// handover; empty on a cold start. `None` from a host of ABI minor 0, which tells only
    /// the WebSockets, in the handover.
    fn handed_over(&self) -> ROption<RVec<OpenResource>> {
        RNone
    }
}

/// The kind of an [`OpenResource`]. Kinds this plugin does not know are to be ignored.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ResourceKind(pub u8);

impl ResourceKind {
    pub const WEBSOCKET: Self = Self(0);
    pub const HTTP_REQUEST: Self = Self(1);
    pub const TIMER: Self = Self(2);
    /// A TCP/TLS stream (v1.2): `detail` is `host:port`.
    pub const STREAM: Self = Self(3);
}

/// One thing the host holds open for a channel instance across a handover, by the id the
/// adapter gave it (`conn`, `request` or `timer`). `detail` is the URL for connections and
/// requests (no query string: it may carry credentials), empty for timers.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct OpenResource {
    pub kind: ResourceKind,
    pub id: u64,
    pub detail: RString,
}

/// The host handle as handed to an adapter (host-made, cheap to clone).
pub type HostHandle = HostApi_TO<'static, RArc<()>>;
