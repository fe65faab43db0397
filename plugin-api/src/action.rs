//! Actions: what an adapter asks of the host. These are plugin-made values; the host copies
//! them into its own types on the adapter's apartment thread (ARCHITECTURE.md §3.7).

use abi_stable::{
    std_types::{RString, RVec},
    StableAbi,
};

use crate::Header;

/// The kind of conversation, which decides the session key's `<kind>` part.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// A public channel.
    Channel,
    /// A private channel or a group DM.
    Group,
    /// A one-to-one direct message.
    Dm,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerKind::Channel => "channel",
            PeerKind::Group => "group",
            PeerKind::Dm => "dm",
        }
    }
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A message from a person, accepted by the adapter's policies and handed to the router.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The platform's message id; unique per platform, used to recognise redelivery.
    pub message_id: RString,
    pub peer_kind: PeerKind,
    /// The conversation (channel, group or DM) id.
    pub peer_id: RString,
    /// The thread this message belongs to and the reply should go to ("" when top level).
    pub thread_root_id: RString,
    pub sender_id: RString,
    pub sender_name: RString,
    /// The text for the agent (mention or trigger prefix already stripped).
    pub text: RString,
    pub created_at_ms: i64,
}

#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
#[sabi(kind(WithNonExhaustive(size = [u64; 40], traits(Debug, Clone))))]
#[non_exhaustive]
pub enum Action {
    /// Open a WebSocket; ids are chosen by the adapter and scoped to its channel instance.
    WsOpen {
        conn: u64,
        url: RString,
        headers: RVec<Header>,
    },
    WsSend {
        conn: u64,
        text: RString,
    },
    WsClose {
        conn: u64,
        code: u16,
        reason: RString,
    },
    HttpRequest {
        request: u64,
        method: RString,
        url: RString,
        headers: RVec<Header>,
        body: RString,
        timeout_ms: u64,
    },
    /// (Re)arm a one-shot timer; setting an armed timer again moves it.
    SetTimer {
        timer: u64,
        after_ms: u64,
    },
    CancelTimer {
        timer: u64,
    },
    Inbound(InboundMessage),
    ReplyDelivered {
        reply_id: u64,
        platform_message_id: RString,
    },
    ReplyFailed {
        reply_id: u64,
        error: RString,
        retryable: bool,
    },
    /// Persist this private state (handed back after a restart; the handover uses
    /// `export_state` instead).
    SaveState {
        state: crate::StateBlob,
    },
    Log {
        level: LogLevel,
        message: RString,
    },
    /// Whether the adapter can do its work (its platform accepts it and its connection holds).
    /// Unhealthy instances make the host's readiness check fail with `detail` (no secrets in
    /// it); the next `healthy: true` clears that. Adapters that never send it count as healthy.
    Health {
        healthy: bool,
        detail: RString,
    },
}

impl Action {
    pub fn into_ne(self) -> Action_NE {
        Action_NE::new(self)
    }
}
