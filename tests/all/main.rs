//! Flotilla's end-to-end tests, one binary (one link of wasmtime), a module per topic.

/// Rhai hooks are held to the memory cap through the counting allocator, as
/// in the `flotilla` binary.
#[global_allocator]
static ALLOC: flotilla_policy::alloc::Counting = flotilla_policy::alloc::Counting;

mod access;
mod api;
mod cli_remote;
mod dashboard;
mod e2e;
mod edge;
mod engine_on_sled;
mod hardening_faults;
mod hardening_policies;
mod policy_load;
mod policy_new;
mod policy_safety;
mod policy_twins;
mod scenarios;
mod signed_releases;
mod tls;
mod trust;
