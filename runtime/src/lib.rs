//! Flotilla: a runner for fleet upgrades whose rollout policy is code — a
//! WebAssembly component or a Rhai script. This crate is the runner's library;
//! the `flotilla` binary in `main.rs` is a thin shell over it.

pub mod agent;
pub mod cli;
pub mod client;
pub mod engine;
pub mod mem;
pub mod model;
pub mod policy;
pub mod protocol;
pub mod scenario;
pub mod server;
pub mod sim;
pub mod store;
pub mod window;
pub mod world;
