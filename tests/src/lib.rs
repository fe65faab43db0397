//! # switchboard-tests — end-to-end tests and their harness
//!
//! Modules:
//! - [`simulator`]: a Mattermost server simulator on `127.0.0.1:0` (WebSocket + REST + a
//!   control API), faithful to `shared/design/MATTERMOST.md`.
pub mod simulator;
