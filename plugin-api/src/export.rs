//! Exporting an adapter: plugin authors implement [`AdapterPlugin`] with plain Rust and call
//! [`export_adapter!`](crate::export_adapter). Every entry point then runs inside
//! `catch_unwind`, so a panic becomes [`PluginError::Panicked`] instead of aborting the host
//! (ARCHITECTURE.md §3.6; plugins must build with `panic = "unwind"`).

use std::{
    cell::RefCell,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::Once,
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{RErr, ROk, ROption, RResult, RStr, RString, RVec},
};

use crate::{
    action::{Action, Action_NE},
    adapter::{Adapter, AdapterBox, Adapter_TO, PluginError},
    event::{Event, Event_NE},
    host::HostHandle,
    module::{AdapterModule, AdapterModuleRef, BuildFlags, ConfigProblem, Handover, Manifest, StateBlob},
};

/// An adapter, written as plain Rust. Each method is called from one thread at a time (the
/// generation's apartment), never concurrently.
pub trait AdapterPlugin: Sized + 'static {
    fn manifest() -> Manifest;

    /// Every problem with this config (JSON text of the channel instance table); pure.
    fn validate_config(config_json: &str) -> Vec<ConfigProblem>;

    /// Build a generation. `Err` refuses to start (the previous generation keeps running).
    fn new(host: HostHandle, config_json: &str, handover: Handover) -> Result<Self, String>;

    fn handle(&mut self, event: Event) -> Vec<Action>;

    fn export_state(&mut self) -> StateBlob;

    /// The platform conversation `event` concerns, if it concerns one (pure; for the host's
    /// dead-letter log line).
    fn conversation_of(&self, _event: &Event) -> Option<String> {
        None
    }

    /// A channel instance table this adapter can be built from for a check, as TOML (the keys
    /// an operator writes under `[channels.<id>]`), e.g. `base_url = "https://chat.example.com"`.
    /// `switchboard check-plugin --conformance` builds the adapter from it when it is given no
    /// `--config`. The checker answers every secret with a placeholder, and the adapter does no
    /// I/O, so nothing reaches a real platform: a placeholder address is fine.
    fn sample_config() -> Option<String> {
        None
    }
}

thread_local! {
    /// Where the last panic on this thread happened (set by the plugin's panic hook).
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replace the default panic hook of the plugin's own copy of std (the host's is untouched):
/// it only notes where the panic happened, for [`guard`]'s error. The default hook prints to
/// stderr and, with `RUST_BACKTRACE` set, symbolises a backtrace, which maps the library file
/// again and keeps it mapped after `dlclose` (seen: every panicked generation stayed mapped).
fn install_quiet_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line()));
            PANIC_LOCATION.with(|slot| *slot.borrow_mut() = location);
        }))
    });
}

/// Run `work`, turning a panic into [`PluginError::Panicked`] with the panic's message.
pub fn guard<T>(work: impl FnOnce() -> T) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(work)) {
        Ok(value) => ROk(value),
        Err(payload) => {
            let mut message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic with a non-string payload".to_string());
            if let Some(location) = PANIC_LOCATION.with(|slot| slot.borrow_mut().take()) {
                message = format!("{message} (at {location})");
            }
            RErr(PluginError::Panicked(message.into()))
        }
    }
}

/// The root module for adapter `A`, reporting the build flags of this crate's build (use
/// [`export_adapter!`](crate::export_adapter), whose code reports the plugin crate's own).
pub fn root_module<A: AdapterPlugin>() -> AdapterModuleRef {
    root_module_with_flags::<A>(build_flags_entry)
}

/// The root module for adapter `A`; called by the code [`export_adapter!`](crate::export_adapter)
/// generates, with a `build_flags` function compiled in the plugin crate: `cfg!(panic = …)`
/// is the strategy of the crate it is compiled in, which is the plugin's when only the final
/// crate was built with `-C panic=abort`.
pub fn root_module_with_flags<A: AdapterPlugin>(build_flags: extern "C" fn() -> BuildFlags) -> AdapterModuleRef {
    install_quiet_panic_hook();
    AdapterModule {
        manifest: manifest_entry::<A>,
        validate_config: validate_config_entry::<A>,
        new_adapter: new_adapter_entry::<A>,
        abi_minor: abi_minor_entry,
        build_flags,
        sample_config: sample_config_entry::<A>,
    }
    .leak_into_prefix()
}

extern "C" fn abi_minor_entry() -> u32 {
    crate::ABI_MINOR
}

extern "C" fn build_flags_entry() -> BuildFlags {
    BuildFlags::of_this_build()
}

extern "C" fn manifest_entry<A: AdapterPlugin>() -> RResult<Manifest, PluginError> {
    guard(A::manifest)
}

extern "C" fn validate_config_entry<A: AdapterPlugin>(
    config_json: RStr<'_>,
) -> RResult<RVec<ConfigProblem>, PluginError> {
    guard(|| RVec::from(A::validate_config(config_json.as_str())))
}

extern "C" fn new_adapter_entry<A: AdapterPlugin>(
    host: HostHandle,
    config_json: RStr<'_>,
    handover: Handover,
) -> RResult<AdapterBox, PluginError> {
    match guard(|| A::new(host, config_json.as_str(), handover)) {
        ROk(Ok(adapter)) => ROk(boxed(adapter)),
        ROk(Err(reason)) => RErr(PluginError::Failed(reason.into())),
        RErr(panicked) => RErr(panicked),
    }
}

/// [`AdapterPlugin::sample_config`] behind the panic guard: the root module's (v1.1, optional)
/// `sample_config` field.
extern "C" fn sample_config_entry<A: AdapterPlugin>() -> RResult<ROption<RString>, PluginError> {
    guard(|| A::sample_config().map(RString::from).into())
}

/// Box an adapter as the ABI trait object, behind the panic guard. Also used by the
/// conformance harness so that in-process tests go through the same wrapper as the host.
pub fn boxed<A: AdapterPlugin>(adapter: A) -> AdapterBox {
    Adapter_TO::from_value(Guarded(adapter), TD_Opaque)
}

struct Guarded<A>(A);

impl<A: AdapterPlugin> Adapter for Guarded<A> {
    fn handle(&mut self, event: Event_NE) -> RResult<RVec<Action_NE>, PluginError> {
        let adapter = &mut self.0;
        guard(move || match event.into_enum() {
            Ok(event) => adapter.handle(event).into_iter().map(Action::into_ne).collect(),
            // An event from a newer host than this plugin knows: nothing to do.
            Err(_) => RVec::new(),
        })
    }

    fn export_state(&mut self) -> RResult<StateBlob, PluginError> {
        let adapter = &mut self.0;
        guard(move || adapter.export_state())
    }

    fn conversation_of(&self, event: &Event_NE) -> RResult<ROption<RString>, PluginError> {
        let adapter = &self.0;
        guard(move || match event.as_enum() {
            Ok(event) => adapter.conversation_of(event).map(RString::from).into(),
            Err(_) => ROption::RNone,
        })
    }
}

/// Export `$adapter` (an [`AdapterPlugin`]) as this library's root module.
/// The plugin crate must depend on `abi_stable` directly (the attribute expands to its paths).
#[macro_export]
macro_rules! export_adapter {
    ($adapter:ty) => {
        /// The root module of this adapter library.
        #[::abi_stable::export_root_module]
        pub fn switchboard_adapter_root_module() -> $crate::AdapterModuleRef {
            extern "C" fn build_flags() -> $crate::BuildFlags {
                $crate::BuildFlags(if cfg!(panic = "abort") { $crate::BuildFlags::PANIC_ABORT } else { 0 })
            }
            $crate::export::root_module_with_flags::<$adapter>(build_flags)
        }
    };
}
