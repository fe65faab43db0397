//! The adapter trait object the constructor returns, and the error every entry point can give.

use abi_stable::{
    sabi_trait,
    std_types::{RBox, RNone, ROption, RResult, RString, RVec},
    StableAbi,
};

use crate::{action::Action_NE, event::Event_NE, module::StateBlob};

/// Why an entry point of a plugin did not do its job.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub enum PluginError {
    /// The plugin panicked; the panic was caught inside the plugin (ARCHITECTURE.md §3.6).
    Panicked(RString),
    /// The plugin refused (bad config, bad handed-over state, ...).
    Failed(RString),
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginError::Panicked(message) => write!(f, "adapter panicked: {message}"),
            PluginError::Failed(message) => write!(f, "{message}"),
        }
    }
}

impl std::error::Error for PluginError {}

/// A running adapter generation. All calls come from the generation's apartment thread.
#[sabi_trait]
pub trait Adapter {
    /// Handle one event and say what to do about it.
    fn handle(&mut self, event: Event_NE) -> RResult<RVec<Action_NE>, PluginError>;

    /// Export the private state the next generation needs (connection ids, cursors,
    /// pending work). Called after `Shutdown { reason: Replaced }`, and after each batch of
    /// events: the host stores it in the same transaction as the inbound messages of that
    /// batch, before it carries out the batch's actions, and hands it back (cold) after a
    /// restart. It must therefore be cheap and must not change the adapter.
    #[sabi(last_prefix_field)]
    fn export_state(&mut self) -> RResult<StateBlob, PluginError>;

    /// The platform conversation (channel, group or DM id) an event concerns, if the adapter
    /// can tell; used by the host to name the session in the log when it has to give up on
    /// an event (dead letter). Pure. Added after ABI v1's prefix: adapters built before it
    /// get this default through abi_stable's fallback.
    fn conversation_of(&self, _event: &Event_NE) -> RResult<ROption<RString>, PluginError> {
        abi_stable::std_types::ROk(RNone)
    }
}

/// The boxed adapter trait object, as returned across the ABI.
pub type AdapterBox = Adapter_TO<'static, RBox<()>>;
