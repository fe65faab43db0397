//! The root module every adapter library exports, and what a new generation is handed.

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RStr, RString, RVec},
    StableAbi,
};

use crate::{adapter::AdapterBox, host::HostHandle, PluginError};

/// Who the adapter is. `abi_version` is compared with [`crate::ABI_VERSION`] by the host.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The name channel instances use in `plugin = "<name>"`.
    pub adapter_name: RString,
    pub adapter_version: RString,
    pub abi_version: u32,
    /// Free-form build identification (commit, build tag); shown in generation status.
    pub build: RString,
}

/// One problem with an adapter's config, with the key path it concerns
/// (relative to the channel instance table, e.g. `chatmode` or `allow_from[2]`).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key_path: RString,
    pub message: RString,
}

impl ConfigProblem {
    pub fn new(key_path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key_path: key_path.into().into(), message: message.into().into() }
    }
}

/// An adapter's private state, exported by one generation and handed to the next.
/// The format of `data` is the adapter's own; `format_version` lets it read older blobs.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct StateBlob {
    pub format_version: u32,
    pub data: RString,
}

/// A connection the host holds open for this channel instance, which the new generation
/// inherits instead of reconnecting.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct OpenConnection {
    pub conn: u64,
    pub url: RString,
}

/// What a new generation starts from.
///
/// Warm (`cold == false`): the previous generation of this process just stopped; its
/// connections, HTTP requests and timers are still the host's and their results will reach the
/// new generation. Cold (`cold == true`): nothing of an earlier generation survives (a new
/// process, or the instance was stopped); `previous_state` is then the last state the host
/// stored for this channel instance, or none on the very first start.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct Handover {
    /// 1 for the first generation of a channel instance in this process, then counting up.
    pub generation: u64,
    pub previous_state: ROption<StateBlob>,
    pub connections: RVec<OpenConnection>,
    pub cold: bool,
}

/// The root module. Config crosses the boundary as JSON text of the channel instance's table
/// (host keys removed), so adapters can grow their config without growing the ABI.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = AdapterModuleRef)))]
#[sabi(missing_field(panic))]
pub struct AdapterModule {
    pub manifest: extern "C" fn() -> RResult<Manifest, PluginError>,
    /// Pure: returns every problem with the config, or none.
    pub validate_config: extern "C" fn(config_json: RStr<'_>) -> RResult<RVec<ConfigProblem>, PluginError>,
    #[sabi(last_prefix_field)]
    pub new_adapter:
        extern "C" fn(host: HostHandle, config_json: RStr<'_>, handover: Handover) -> RResult<AdapterBox, PluginError>,
    // ---- v1.1: fields after the prefix are optional; a library built before them reads as
    // `None`, which the host takes for ABI minor 0 and unknown build flags. ----
    /// The ABI minor version the library was built against ([`crate::ABI_MINOR`] of its
    /// plugin-api). The host sends events of a minor only to libraries of that minor or later.
    #[sabi(missing_field(option))]
    pub abi_minor: extern "C" fn() -> u32,
    /// How the library was built ([`BuildFlags`]).
    #[sabi(missing_field(option))]
    pub build_flags: extern "C" fn() -> BuildFlags,
    /// A channel instance table (TOML) this adapter can be built from, for `switchboard
    /// check-plugin --conformance` when the operator gives none (`AdapterPlugin::sample_config`).
    #[sabi(missing_field(option))]
    pub sample_config: extern "C" fn() -> RResult<ROption<RString>, PluginError>,
}

/// How an adapter library was built, as far as the host must know.
#[repr(transparent)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BuildFlags(pub u64);

impl BuildFlags {
    /// Built with `panic = "abort"`: a panic would end the host process, so the host refuses
    /// the library (`catch_unwind` at the ABI edge needs unwinding).
    pub const PANIC_ABORT: u64 = 1;

    /// The flags of the code calling this: `export_adapter!` reports them for the plugin.
    pub fn of_this_build() -> Self {
        Self(if cfg!(panic = "abort") { Self::PANIC_ABORT } else { 0 })
    }

    pub fn panic_abort(self) -> bool {
        self.0 & Self::PANIC_ABORT != 0
    }
}

impl RootModule for AdapterModuleRef {
    declare_root_module_statics! {AdapterModuleRef}
    const BASE_NAME: &'static str = "switchboard_adapter";
    const NAME: &'static str = "switchboard_adapter";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}
