//! `meshlimit validate`: the check a user runs on a config directory before deploying it.

mod common;

use common::fixture;
use common::meshlimit::command;

#[test]
fn validate_accepts_the_test_fixtures() {
    let output = command()
        .arg("validate")
        .arg(fixture("config"))
        .output()
        .expect("run meshlimit validate");
    assert!(
        output.status.success(),
        "meshlimit validate rejected tests/fixtures/config:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn validate_points_at_the_broken_line() {
    let output = command()
        .arg("validate")
        .arg(fixture("config_invalid"))
        .output()
        .expect("run meshlimit validate");
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "a broken config passed validation:\n{messages}"
    );
    // file:line:column, so an editor can jump there; the column depends on whether the
    // key or the value is blamed, so only the line is pinned.
    assert!(
        messages.contains("broken.yaml:9:"),
        "expected a message naming broken.yaml:9:<column>, got:\n{messages}"
    );
}
