//! # switchboard — a gateway between chat platforms and AI agents
//!
//! Channel adapters are dynamic libraries (see `switchboard-plugin-api`); the host owns
//! everything that must outlive one: connections, sessions, queues. An adapter can therefore
//! be replaced while the gateway runs without losing, duplicating or misrouting a message.
//!
//! Modules, from the outside in:
//! - [`gateway`]: start-up, the reload controller (signals, plugin directory watch and admin
//!   API → one control path, diff by channel instance, roll back on failure), the generation
//!   budget (graceful re-exec before the process runs out of TLS keys) and shutdown.
//! - [`watch`]: the plugin directory watch (debounce, settle, ignore temporary files).
//! - [`config`]: the TOML config and its validation (all errors at once, with key paths).
//! - [`env_refs`]: the environment variables a config names (`*_env` keys), which
//!   `check-config` reports when unset.
//! - [`catalog`]: adapter files in the plugin directory, found by manifest name; a private
//!   snapshot of each file, probed and its configs validated in a child process (`switchboard
//!   check-plugin`) and staged from, so what loads is what was checked.
//! - [`conformance`]: `switchboard check-plugin --conformance`: the plugin API's conformance
//!   checks run against a built library in a child process (crashes and hangs reported).
//! - [`loader`]: staging a unique copy per generation, `dlopen`, the fresh layout check,
//!   the ABI handshake, and the "is it still mapped" check.
//! - [`apartment`]: one thread per adapter generation that runs all of its code, every call
//!   with a deadline (a hung apartment is abandoned, never joined).
//! - [`channel`]: a channel instance: its event queue, transport and current generation;
//!   the generation swap; containment (restart from the last good state, retry once, dead
//!   letter, restart budget, the watchdog); the write-ahead commit pipeline; the delivery
//!   window.
//! - [`transport`]: WebSocket, HTTP and timers carried out for adapters.
//! - [`tls`]: the roots HTTPS and WSS trust (built-in public, system, a channel's `ca_file`).
//! - [`bridge`]: the host handle adapters hold (sessions, secrets, clock, log bridge).
//! - [`routing`]: inbound → binding → session key → lane → agent → reply delivery.
//! - [`session`]: the session registry (a bounded cache over the store, which has every
//!   session) and the session key grammar.
//! - [`store`]: the durable store (SQLite, WAL): sessions, transcripts, inbound ids, the
//!   delivery queue and adapter state; the transactions that keep the ordering rules; the
//!   writer thread every write goes through in submission order, so that neither an async
//!   worker nor an adapter's thread waits for the disk.
//! - [`lane`]: per-session ordered turns under a global concurrency cap.
//! - [`agent`]: the agents (`echo`, `command`, `openai`, `http`).
//! - [`upgrade`]: re-executing the binary at the start-up path (SIGUSR2, the generation
//!   budget) once it has accepted the config; probes run the running binary.
//! - [`admin`], [`metrics`], [`ledger`]: `/livez`, `/readyz`, `/metrics`, `/status`.
//! - [`notify`]: the service manager's notifications (systemd `Type=notify`: readiness,
//!   reloads, stopping, the status line) and its watchdog.

pub mod admin;
pub mod agent;
pub mod apartment;
pub mod bridge;
pub mod catalog;
pub mod channel;
pub mod config;
pub mod conformance;
pub mod env_refs;
pub mod gateway;
pub mod lane;
pub mod ledger;
pub mod loader;
pub mod metrics;
pub mod notify;
pub mod routing;
pub mod session;
pub mod store;
pub mod tls;
pub mod transport;
pub mod upgrade;
pub mod watch;
