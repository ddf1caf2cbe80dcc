//! How a stat is written for the agent on the other end: plain statsd, where tags ride in
//! the name the way envoyproxy/ratelimit's stats library writes them (`.__key=value`), or
//! DogStatsD, where tags follow `|#` and mogrifiers may first turn parts of the name into
//! tags.

use super::mogrifier::{self, Mogrifier};

/// The agent's dialect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StatsdFormat {
    /// statsd lines (`name:1|c`), which statsd, statsd_exporter and Datadog's agent read.
    #[default]
    Plain,
    /// DogStatsD lines (`name:1|c|#key:value`) for Datadog's agent.
    DogStatsd,
}

/// What a stat's value is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// A counter's increase since the last push.
    Count(u64),
    /// A timer: `calls` calls that took about `millis` each.
    Millis { millis: f64, calls: u64 },
}

/// The format, the tags every `ratelimit.*` stat carries, and the mogrifiers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dialect {
    pub format: StatsdFormat,
    /// Sorted by key, values already cleaned: see `Dialect::new`.
    tags: Vec<(String, String)>,
    mogrifiers: Vec<Mogrifier>,
}

impl Dialect {
    /// `tags` are envoyproxy/ratelimit's `EXTRA_TAGS`. As there, they go on the service's
    /// `ratelimit.*` stats (not on `ratelimit_server.*`), in key order, with `.`, `:` and
    /// `|` in their values turned to `_`, in both formats, so that a dashboard built on
    /// envoyproxy/ratelimit's output finds the same series.
    pub fn new(
        format: StatsdFormat,
        mut tags: Vec<(String, String)>,
        mogrifiers: Vec<Mogrifier>,
    ) -> Self {
        for (_, value) in &mut tags {
            *value = value.replace(['.', ':', '|'], "_");
        }
        tags.sort();
        Self {
            format,
            tags,
            mogrifiers,
        }
    }

    /// The same mogrifiers in `format`, with `tags` instead of these when any are given
    /// (the command line's, over the environment's).
    pub fn with(self, format: StatsdFormat, tags: Vec<(String, String)>) -> Self {
        let tags = if tags.is_empty() { self.tags } else { tags };
        Self::new(format, tags, self.mogrifiers)
    }

    /// One line for `stat`.
    pub fn line(&self, stat: &str, value: Value) -> String {
        let extra = if stat.starts_with("ratelimit.") {
            &self.tags[..]
        } else {
            &[]
        };
        let (amount, kind, rate) = match value {
            Value::Count(n) => (n.to_string(), "c", None),
            // One line stands for all the calls in its bucket: a sample rate of 1/calls
            // makes statsd, statsd_exporter and Datadog count it `calls` times.
            Value::Millis { millis, calls } => {
                let rate = (calls > 1).then(|| 1.0 / calls as f64);
                // To the nanosecond: a bucket's middle in milliseconds is not exact in
                // binary (0.07500000000000001), and the agent needs no more digits.
                (((millis * 1e6).round() / 1e6).to_string(), "ms", rate)
            }
        };
        let rate = rate.map(|r| format!("|@{r}")).unwrap_or_default();
        match self.format {
            StatsdFormat::Plain => {
                let mut name = stat.to_owned();
                for (key, value) in extra {
                    name.push_str(&format!(".__{key}={value}"));
                }
                format!("{}:{amount}|{kind}{rate}", clean_name(&name))
            }
            StatsdFormat::DogStatsd => {
                let (name, mogrified) = mogrifier::mogrify(&self.mogrifiers, stat);
                let tags: Vec<String> = (extra.iter())
                    .map(|(key, value)| format!("{key}:{value}"))
                    .chain(mogrified)
                    .map(|tag| tag.replace([',', '|', '\n', '\r'], "_"))
                    .collect();
                let tags = if tags.is_empty() {
                    String::new()
                } else {
                    format!("|#{}", tags.join(","))
                };
                format!("{}:{amount}|{kind}{rate}{tags}", clean_name(&name))
            }
        }
    }
}

/// A statsd name cannot hold the protocol's separators (`:`, `|`, `@`) or line breaks;
/// they become `_`, as statsd clients write them.
fn clean_name(name: &str) -> String {
    name.replace([':', '|', '@', '\n', '\r'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HITS: &str = "ratelimit.service.rate_limit.edge.user.total_hits";

    fn extra() -> Vec<(String, String)> {
        vec![
            ("version".to_owned(), "1.2|3".to_owned()),
            ("env".to_owned(), "prod".to_owned()),
        ]
    }

    #[test]
    fn plain_lines_carry_tags_in_the_name_in_key_order() {
        let plain = Dialect::new(StatsdFormat::Plain, extra(), vec![]);
        assert_eq!(
            plain.line(HITS, Value::Count(3)),
            format!("{HITS}.__env=prod.__version=1_2_3:3|c")
        );
        // The gRPC server's stats are outside the tagged scope.
        assert_eq!(
            plain.line(
                "ratelimit_server.ShouldRateLimit.total_requests",
                Value::Count(1)
            ),
            "ratelimit_server.ShouldRateLimit.total_requests:1|c"
        );
        assert_eq!(
            Dialect::default().line("a:b|c@d", Value::Count(1)),
            "a_b_c_d:1|c"
        );
    }

    #[test]
    fn timers_stand_for_their_calls_by_sample_rate() {
        let plain = Dialect::default();
        let one = Value::Millis {
            millis: 0.375,
            calls: 1,
        };
        assert_eq!(plain.line("t", one), "t:0.375|ms");
        let four = Value::Millis {
            millis: 0.0175,
            calls: 4,
        };
        assert_eq!(plain.line("t", four), "t:0.0175|ms|@0.25");
        let inexact = Value::Millis {
            millis: (0.05 + 0.1) / 2.0,
            calls: 1,
        };
        assert_eq!(plain.line("t", inexact), "t:0.075|ms");
    }

    #[test]
    fn dogstatsd_lines_put_extra_then_mogrified_tags_after_the_value() {
        let by_domain = Mogrifier::new(
            "HITS",
            r"^ratelimit\.service\.rate_limit\.([^.]+)\.(.+)\.([^.]+)$",
            "ratelimit.service.rate_limit.$3",
            vec![
                ("domain".to_owned(), "$1".to_owned()),
                ("descriptor".to_owned(), "$2".to_owned()),
            ],
        )
        .unwrap();
        let dog = Dialect::new(StatsdFormat::DogStatsd, extra(), vec![by_domain]);
        assert_eq!(
            dog.line(HITS, Value::Count(2)),
            "ratelimit.service.rate_limit.total_hits:2|c|#env:prod,version:1_2_3,domain:edge,descriptor:user"
        );
        let timer = Value::Millis {
            millis: 1.75,
            calls: 2,
        };
        assert_eq!(
            dog.line(crate::metrics::RESPONSE_TIME_STAT, timer),
            "ratelimit_server.ShouldRateLimit.response_time:1.75|ms|@0.5"
        );
        let untagged = Dialect::new(StatsdFormat::DogStatsd, vec![], vec![]);
        assert_eq!(untagged.line(HITS, Value::Count(1)), format!("{HITS}:1|c"));
    }
}
