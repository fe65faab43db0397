//! # switchboard-tests — end-to-end tests and their harness
//!
//! Modules:
//! - [`sim`]: a Mattermost server simulator on `127.0.0.1:0` (WebSocket + REST + a
//!   control API), faithful to `shared/design/MATTERMOST.md`.
//! - [`model`]: a fake OpenAI-compatible model server (streaming and not) that shows in its
//!   answer what history it was given.
//! - [`harness`]: runs the real `switchboard` binary as a child process, captures its log,
//!   and waits with [`assert_eventually!`] instead of sleeping.
//! - [`matrix`]: a real Synapse (Matrix homeserver) per test, from the venv that
//!   `cargo xtask real-servers synapse` installs, and a small Matrix client for it (users by
//!   shared-secret registration, rooms, messages, `/sync`).
//! - [`tls`]: a TLS front (private CA made at start, tokio-rustls) that forwards decrypted
//!   connections to a plain backend, like nginx in front of a self-hosted Mattermost.
//!
//! Binaries: `mm-sim` (the simulator on its own, printing its demo world as JSON) and `demo`
//! (what `cargo xtask demo` runs).
pub mod harness;
pub mod matrix;
pub mod model;
pub mod sim;
pub mod tls;
