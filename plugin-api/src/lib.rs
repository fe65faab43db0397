//! # switchboard-plugin-api — the ABI between the switchboard host and its channel adapters
//!
//! A channel adapter is a dynamic library that exports one root module ([`AdapterModule`]).
//! The host loads it with `dlopen`, checks its layout, and drives it as a synchronous state
//! machine: *events in, actions out*. The adapter does no I/O of its own — the host owns the
//! WebSocket connections, HTTP requests, timers and the session registry, which is what lets a
//! new build of an adapter replace the old one without dropping a connection or a message.
//!
//! Modules:
//! - [`module`]: the root module (manifest, config validation, constructor) and the handover
//!   a new generation receives from the previous one.
//! - [`event`]: what the host hands an adapter (frames, HTTP responses, timers, replies to
//!   deliver, shutdown).
//! - [`action`]: what an adapter asks of the host (open/send/close a WebSocket, HTTP request,
//!   timers, inbound messages for routing, reply outcomes, state to save, log records).
//! - [`host`]: the host handle an adapter holds: session registry, secrets, clock, log bridge.
//! - [`key`]: the session key grammar (escaping, parsing, prefixes that end at a part
//!   boundary), shared by the host and adapters.
//! - [`adapter`]: the adapter trait object and [`PluginError`].
//! - [`export`]: [`AdapterPlugin`], the plain-Rust trait plugin authors implement, and
//!   [`export_adapter!`], which exports it with every entry point behind `catch_unwind`.
//! - [`conformance`]: a harness that drives any [`AdapterPlugin`] in-process and checks the
//!   contract; every adapter crate runs it in its own tests.
//!
//! ## Versions
//! This crate's version *is* the ABI version: major [`ABI_VERSION`], minor [`ABI_MINOR`]
//! (it does not follow the workspace's version). A host loads a plugin of the same major
//! built against any minor, older or newer: a newer plugin falls back to defaults for what an
//! older host lacks, an older plugin is never sent what it cannot know. The rules that keep it
//! so (what may change in a minor, what needs a major) are in `docs/abi-evolution.md`: in
//! short, fields are only appended to prefix types after `last_prefix_field` and read as
//! optional; trait methods are only appended, with a default body; [`Event`] and [`Action`]
//! only gain variants at the end; by-value structs and closed enums never change, and kinds
//! that must grow are `#[repr(transparent)]` codes or names with constants. Host and plugins
//! must use the same `abi_stable` 0.11 line; this crate re-exports it.

pub mod action;
pub mod adapter;
pub mod conformance;
pub mod event;
pub mod export;
pub mod host;
pub mod key;
pub mod module;

pub use abi_stable;

pub use action::{
    Action, Action_NE, ErrorKind, Framing, HttpCall, InboundMessage, LogLevel, PeerKind, PeerKindName, ResponseBody,
    StreamOpen,
};
pub use adapter::{Adapter, AdapterBox, Adapter_TO, PluginError};
pub use event::{Event, Event_NE, OutboundReply, ShutdownReason};
pub use export::AdapterPlugin;
pub use host::{HostApi, HostApi_TO, HostHandle, OpenResource, ResourceKind, SessionInfo};
pub use module::{
    AdapterModule, AdapterModuleRef, BuildFlags, ConfigProblem, Handover, Manifest, OpenConnection, StateBlob,
};

/// The major version of the adapter contract. A plugin whose manifest names another major
/// is refused by the host even when its layout happens to check out.
pub const ABI_VERSION: u32 = 1;

/// The minor version of the adapter contract: what this crate adds to v1.0 (reported by the
/// root module's `abi_minor`). 1: bytes bodies and frames, response size limits, named peer
/// kinds, error kinds, the generalised handover, the build flags. 2: host-owned TCP/TLS
/// streams (`StreamOpen`, line framing), handed over like WebSockets; replayed frames
/// ([`Event::WsFrameReplayed`]).
pub const ABI_MINOR: u32 = 2;

use abi_stable::{std_types::RString, StableAbi};

/// An HTTP or WebSocket-upgrade header.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: RString,
    pub value: RString,
}

impl Header {
    pub fn new(name: &str, value: &str) -> Self {
        Self { name: name.into(), value: value.into() }
    }
}

/// Where a reply goes: a conversation on the platform (channel, group or DM id) and, when the
/// message it answers was in a thread, that thread's root message id (empty when none).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplyTarget {
    pub conversation_id: RString,
    pub thread_root_id: RString,
}

impl ReplyTarget {
    pub fn new(conversation_id: &str, thread_root_id: &str) -> Self {
        Self { conversation_id: conversation_id.into(), thread_root_id: thread_root_id.into() }
    }
}

#[cfg(test)]
mod tests {
    /// The package version and the ABI constants tell the same story (abi_stable checks the
    /// package version; the host reads the constants).
    #[test]
    fn the_crate_version_is_the_abi_version() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(version, format!("{}.{}.0", super::ABI_VERSION, super::ABI_MINOR));
    }
}
