//! `meshlimit validate` and `meshlimit explain`: the checks a user runs on a config directory
//! before deploying it.

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

#[test]
fn validate_refuses_a_config_naming_hundreds_of_time_zones_at_the_zone() {
    // A zone is kept in a byte-numbered table for the life of the process; a config
    // naming every zone of the database is refused where the table runs out, not panicked on.
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = String::from("domain: zones\ndescriptors:\n");
    for (i, zone) in jiff::tz::db().available().enumerate() {
        yaml.push_str(&format!(
            "  - key: k{i}\n    rate_limit: {{unit: day, requests_per_unit: 1, calendar: {}}}\n",
            zone.as_str()
        ));
    }
    std::fs::write(dir.path().join("zones.yaml"), yaml).unwrap();
    let output = command().arg("validate").arg(dir.path()).output().unwrap();
    let messages = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{messages}");
    let refused: Vec<&str> = messages
        .lines()
        .filter(|l| l.contains("257th time zone"))
        .collect();
    assert!(!refused.is_empty(), "{messages}");
    assert!(
        refused[0].contains("zones.yaml:"),
        "names the file and line: {messages}"
    );
}

/// `meshlimit explain` run from `tests/fixtures`, so the files it names are short relative
/// paths such as `config_tiers/tiers.yaml`: (success, stdout, stderr).
fn explain(args: &[&str]) -> (bool, String, String) {
    let output = command()
        .current_dir(fixture(""))
        .arg("explain")
        .args(args)
        .output()
        .expect("run meshlimit explain");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_lines(text: &str, expected: &[&str]) {
    for line in expected {
        assert!(
            text.lines().any(|actual| actual == *line),
            "no line {line:?} in:\n{text}"
        );
    }
}

#[test]
fn explain_shows_where_an_inherited_policy_comes_from_and_the_counter_key() {
    let (ok, stdout, stderr) = explain(&[
        "--config",
        "config_tiers",
        "--domain",
        "tiers",
        "plan=pro,user=alice",
    ]);
    assert!(ok, "explain failed:\n{stdout}{stderr}");
    assert_lines(
        &stdout,
        &[
            "domain tiers (config_tiers/tiers.yaml)",
            "descriptor 1: plan=pro,user=alice",
            "  `plan: pro`: matched `plan: pro` exactly",
            "  `user: alice`: matched `user` (any value)",
            "  matched node: `user` (any value) at config_tiers/tiers.yaml:27:25",
            // `user` sets nothing: the policy comes down from its parent node...
            "  policy — inherited: descriptor `plan: pro` (config_tiers/tiers.yaml:24:10)",
            // ...and each field from the policy that wrote it, through `extends`.
            "  limits: 4/hour — from policy `pro` (config_tiers/tiers.yaml:14:13)",
            "  algorithm: token_bucket — from policy `free` (config_tiers/tiers.yaml:10:16)",
            "  counter keys:",
            "    tiers|plan=pro|user=alice|1h/token_bucket",
        ],
    );
}

#[test]
fn explain_shows_shared_defaults_and_an_own_setting_that_beats_them() {
    let (ok, stdout, stderr) = explain(&[
        "--config",
        "config_tiers",
        "--domain",
        "shared_defaults",
        "plan=basic,user=sam",
        "plan=internal,user=sam",
    ]);
    assert!(ok, "explain failed:\n{stdout}{stderr}");
    assert_lines(
        &stdout,
        &[
            "descriptor 1: plan=basic,user=sam",
            "  limits: 3/hour — from policy `baseline` (config_tiers/shared.yaml:6:13)",
            "    shared_defaults|plan=basic|user=sam|1h/token_bucket",
            "descriptor 2: plan=internal,user=sam",
            "  unlimited — inherited: descriptor `plan: internal` (config_tiers/shared_defaults.yaml:8:10)",
        ],
    );
    // The defaults' own location is where their block is written in the shared file.
    assert!(
        stdout.contains("  policy — inherited: shared defaults (config_tiers/shared.yaml:"),
        "{stdout}"
    );
    // An unlimited descriptor is never counted, so it has no counter key.
    assert!(
        !stdout.contains("shared_defaults|plan=internal"),
        "{stdout}"
    );
}

/// `--at` shows the calendar window an instant falls in: noon UTC on 31 January is already
/// 1 February in Auckland (UTC+13 in its summer), so the month shown is February there.
/// A wrong instant is refused with how to write one.
#[test]
fn explain_shows_the_calendar_window_an_instant_falls_in() {
    let ask = |at: &str| {
        explain(&[
            "--config",
            "config_operations",
            "--domain",
            "operations",
            "plan_month=acme",
            "--at",
            at,
        ])
    };
    let (ok, stdout, stderr) = ask("2027-01-31T12:00:00Z");
    assert!(ok, "explain failed:\n{stdout}{stderr}");
    assert_lines(
        &stdout,
        &[
            // Counted in fixed windows, whatever the service's default algorithm.
            "  algorithm: sliding_window (its calendar limits: fixed_window) — the service default",
            "    operations|plan_month=acme|month@Pacific/Auckland/fixed_window",
            "      window now: 2027-02-01 00:00:00 +13:00 to 2027-03-01 00:00:00 +13:00 in Pacific/Auckland (resets in 27 d 23 h)",
        ],
    );

    let (ok, stdout, stderr) = ask("31/01/2027");
    assert!(!ok, "explain took a date with no time or offset:\n{stdout}");
    assert!(
        stderr.contains("`31/01/2027` is not an instant")
            && stderr.contains("e.g. 2027-01-31T23:30:00Z"),
        "{stderr}"
    );
}

#[test]
fn explain_refuses_an_invalid_or_missing_config_dir() {
    let (ok, stdout, stderr) = explain(&[
        "--config",
        "config_invalid",
        "--domain",
        "api",
        "user=alice",
    ]);
    assert!(!ok, "explain accepted a broken config:\n{stdout}{stderr}");
    assert!(
        stderr.contains("config_invalid/broken.yaml:9:"),
        "expected the broken line in the errors:\n{stderr}"
    );
    assert_eq!(stdout, "", "nothing is explained from a broken config");

    let (ok, stdout, stderr) =
        explain(&["--config", "no_such_dir", "--domain", "api", "user=alice"]);
    assert!(!ok, "explain accepted a missing dir:\n{stdout}{stderr}");
    assert!(stderr.contains("no_such_dir"), "{stderr}");
}

#[test]
fn validate_merges_files_of_one_domain_when_the_environment_says_so() {
    // Two files of one domain, as envoyproxy/ratelimit deployments split them.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let write = |name: &str, key: &str| {
        let text = format!(
            "domain: shop\ndescriptors:\n  - key: {key}\n    rate_limit: {{unit: minute, requests_per_unit: 5}}\n"
        );
        std::fs::write(dir.path().join(name), text).expect("write a config file");
    };
    write("a.yaml", "user");
    write("b.yaml", "ip");
    let run = |merge: Option<&str>| {
        let mut validate = command();
        validate.arg("validate").arg(dir.path());
        if let Some(value) = merge {
            validate.env("MERGE_DOMAIN_CONFIG", value);
        }
        let output = validate.output().expect("run meshlimit validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let (ok, text) = run(None);
    assert!(
        !ok && text.contains("domain `shop` is already defined in"),
        "{text}"
    );
    let (ok, text) = run(Some("true"));
    assert!(ok, "{text}");
    // One domain holding the rules of both files.
    assert!(
        text.contains("domain shop") && text.contains("2 rules"),
        "{text}"
    );
}

/// A reset token file that cannot be read, or holds nothing, stops the start with why,
/// rather than a service whose resets fail later.
#[test]
fn serve_refuses_a_reset_token_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.path().join("missing");
    for (file, says) in [(&empty, "is empty"), (&missing, "cannot read")] {
        let mut serve = command();
        serve
            .args(["serve", "--config"])
            .arg(fixture("config_operations"))
            .arg("--admin-reset-token-file")
            .arg(file)
            .args(["--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"]);
        let (code, stderr) = common::meshlimit::exit_of(serve);
        assert_eq!(code, Some(2), "{stderr}");
        assert!(
            stderr.contains("--admin-reset-token-file") && stderr.contains(says),
            "{stderr}"
        );
    }
}
