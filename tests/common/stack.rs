//! The end-to-end setup: meshlimit, the echo upstream, and a real Envoy in front of both
//! whose ratelimit filter asks meshlimit about every request.

use std::path::Path;

use super::envoy::Envoy;
use super::http::Response;
use super::meshlimit::Meshlimit;
use super::upstream::EchoUpstream;

pub struct Stack {
    // Declared first so it is dropped first: Envoy goes before what it routes to.
    pub envoy: Envoy,
    pub upstream: EchoUpstream,
    pub meshlimit: Meshlimit,
}

impl Stack {
    /// meshlimit serving `config_dir`, and Envoy from the bootstrap `template` (see
    /// `Envoy::start`) with its filter set to `domain`. The template's placeholders besides
    /// the two ports Envoy picks are `{{RLS_PORT}}`, `{{UPSTREAM_PORT}}` and `{{DOMAIN}}`.
    pub fn start(config_dir: impl AsRef<Path>, template: impl AsRef<Path>, domain: &str) -> Stack {
        Stack::start_around(Meshlimit::start(config_dir), template, domain, &[])
    }

    /// Like `start`, around a meshlimit the test started itself (with its own flags or
    /// environment), and with `more` placeholders for the template.
    pub fn start_around(
        meshlimit: Meshlimit,
        template: impl AsRef<Path>,
        domain: &str,
        more: &[(&str, String)],
    ) -> Stack {
        let upstream = EchoUpstream::start();
        let mut substitutions = vec![
            ("RLS_PORT", meshlimit.grpc_addr.port().to_string()),
            ("UPSTREAM_PORT", upstream.addr.port().to_string()),
            ("DOMAIN", domain.to_owned()),
        ];
        substitutions.extend(more.iter().cloned());
        let envoy = Envoy::start(template, &substitutions);
        Stack {
            envoy,
            upstream,
            meshlimit,
        }
    }

    /// `GET path` through Envoy with `headers`.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.envoy.get(path, headers)
    }

    /// `GET path` through Envoy as the user named in `x-user-id`.
    pub fn get_as(&self, user: &str, path: &str) -> Response {
        self.get(path, &[("x-user-id", user)])
    }

    /// Both servers' logs, for failure messages.
    pub fn logs(&self) -> String {
        format!("{}\n{}", self.meshlimit.logs(), self.envoy.logs())
    }

    /// Asserts `response` has `status`, showing the response and both logs if not.
    pub fn expect_status(&self, response: &Response, status: u16, what: &str) {
        assert_eq!(
            response.status,
            status,
            "{what}: expected HTTP {status}, got {response:?}\n{}",
            self.logs()
        );
    }
}
