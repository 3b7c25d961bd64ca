//! The Rust policy passes the same scenario as the Rhai one.

#[test]
fn first_policy_passes_its_scenario() {
    flotilla_sdk::assert_scenarios!("../first-policy.yaml");
}
