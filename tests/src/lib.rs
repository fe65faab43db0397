//! # switchboard-tests — end-to-end tests and their harness
//!
//! Modules:
//! - [`sim`]: a Mattermost server simulator on `127.0.0.1:0` (WebSocket + REST + a
//!   control API), faithful to `shared/design/MATTERMOST.md`.
//! - [`harness`]: runs the real `switchboard` binary as a child process, captures its log,
//!   and waits with [`assert_eventually!`] instead of sleeping.
//!
//! Binaries: `mm-sim` (the simulator on its own, printing its demo world as JSON) and `demo`
//! (what `cargo xtask demo` runs).
pub mod harness;
pub mod sim;
