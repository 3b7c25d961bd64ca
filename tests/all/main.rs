//! Flotilla's end-to-end tests, one binary (one link of wasmtime), a module per topic.

mod api;
mod cli_remote;
mod e2e;
mod edge;
mod engine_on_sled;
mod hardening_faults;
mod policy_load;
mod policy_safety;
mod policy_twins;
mod scenarios;
mod trust;
