//! The Rust canary passes the same scenarios as its Rhai twin: `cargo test -p canary`.

#[test]
fn canary_component_passes_the_shared_scenarios() {
    flotilla_sdk::assert_scenarios!("../scenarios/canary");
}
