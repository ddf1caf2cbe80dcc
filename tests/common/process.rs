//! A child process whose output goes to a log file, killed when the handle is dropped.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::poll_until;

/// Why a server did not come up, and whether trying again on other ports may help.
#[derive(Debug)]
pub struct StartFailure {
    /// The server exited complaining that an address was taken: another process bound
    /// the port between `free_loopback_addr` and the server's own bind.
    pub lost_port_race: bool,
    /// What happened, with the server's output.
    pub report: String,
}

pub struct Supervised {
    name: String,
    child: Child,
    log_path: PathBuf,
    // Keeps the log, and files the caller put there for the process (Envoy's bootstrap),
    // until the process is gone.
    _dir: TempDir,
}

impl Supervised {
    /// Spawns `command` with no stdin and stdout + stderr written to `<dir>/<name>.log`.
    pub fn spawn(name: &str, mut command: Command, dir: TempDir) -> Supervised {
        let log_path = dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path).expect("create the process log");
        let log_for_stderr = log.try_clone().expect("share the process log");
        // Both streams share one file handle, so lines keep the order they were written in.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_for_stderr));
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("failed to spawn {name} ({command:?}): {err}"));
        Supervised {
            name: name.to_owned(),
            child,
            log_path,
            _dir: dir,
        }
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_else(|err| format!("<no log: {err}>"))
    }

    /// Waits until `ready` returns true, polling for at most `timeout`; fails early when
    /// the process exits. `what` names the readiness check in the failure report.
    pub fn wait_ready(
        &mut self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), StartFailure> {
        let outcome = poll_until(timeout, || {
            if let Some(status) = self.exited() {
                return Some(Err(status));
            }
            ready().then_some(Ok(()))
        });
        let (lost_port_race, why) = match outcome {
            Some(Ok(())) => return Ok(()),
            Some(Err(status)) => (
                self.log().contains("in use"),
                format!("{} exited with {status} before {what}", self.name),
            ),
            None => (false, format!("{what} did not happen within {timeout:?}")),
        };
        Err(StartFailure {
            lost_port_race,
            report: format!("{why}\n{}", self.describe()),
        })
    }

    /// The exit status once the process has ended on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A report for a failed assertion: the name, pid and log, framed so it stands out in
    /// test output.
    pub fn describe(&self) -> String {
        format!(
            "----- {} (pid {}) output -----\n{}\n----- end of {} output -----",
            self.name,
            self.pid(),
            self.log(),
            self.name
        )
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // SIGKILL: nothing here needs a graceful shutdown, and a server that ignored
        // SIGTERM would otherwise outlive the test and keep its ports.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
