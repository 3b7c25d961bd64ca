//! `cargo test`: builds this crate's component and runs every scenario.

#[test]
fn scenarios_pass() {
    flotilla_sdk::assert_scenarios!("scenarios");
}
