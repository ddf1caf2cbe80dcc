//! JSON forms of the rate limit API for the admin port: envoyproxy/ratelimit's `POST /json`
//! and meshlimit's `GET /v1/usage`. Field names follow protobuf's JSON mapping
//! (camelCase); snake_case is accepted on input too.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::limit::Algorithm;
use crate::limiter::LimitUsage;
use crate::proto::envoy::config::core::v3::HeaderValue;
use crate::proto::envoy::r#type::v3::RateLimitUnit;
use crate::proto::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::rate_limit_response::{Code, rate_limit};
use crate::proto::{RateLimitDescriptor, RateLimitRequest, RateLimitResponse};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonRequest {
    domain: String,
    #[serde(default)]
    descriptors: Vec<JsonDescriptor>,
    #[serde(default, alias = "hits_addend", rename = "hitsAddend")]
    hits_addend: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonDescriptor {
    #[serde(default)]
    entries: Vec<JsonEntry>,
    limit: Option<JsonLimit>,
    #[serde(default, alias = "hits_addend", rename = "hitsAddend")]
    hits_addend: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLimit {
    #[serde(alias = "requests_per_unit", rename = "requestsPerUnit")]
    requests_per_unit: u32,
    unit: String,
}

impl JsonRequest {
    pub fn into_proto(self) -> Result<RateLimitRequest, String> {
        let descriptors = self
            .descriptors
            .into_iter()
            .map(|d| {
                let limit = match d.limit {
                    Some(limit) => {
                        let unit = RateLimitUnit::from_str_name(&limit.unit.to_ascii_uppercase())
                            .ok_or_else(|| format!("unknown unit `{}`; write SECOND, MINUTE, HOUR, DAY, WEEK, MONTH or YEAR", limit.unit))?;
                        Some(RateLimitOverride {
                            requests_per_unit: limit.requests_per_unit,
                            unit: unit as i32,
                        })
                    }
                    None => None,
                };
                Ok(RateLimitDescriptor {
                    entries: d
                        .entries
                        .into_iter()
                        .map(|e| Entry { key: e.key, value: e.value })
                        .collect(),
                    limit,
                    hits_addend: d.hits_addend,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(RateLimitRequest {
            domain: self.domain,
            descriptors,
            hits_addend: self.hits_addend,
        })
    }
}

fn code_name(code: i32) -> &'static str {
    Code::try_from(code).map_or("UNKNOWN", |c| c.as_str_name())
}

fn headers(list: &[HeaderValue]) -> Vec<Value> {
    list.iter()
        .map(|h| json!({ "key": h.key, "value": h.value }))
        .collect()
}

/// A response in protobuf's JSON mapping.
pub fn response(response: &RateLimitResponse) -> Value {
    let statuses: Vec<Value> = response
        .statuses
        .iter()
        .map(|s| {
            let mut status = Map::new();
            status.insert("code".into(), json!(code_name(s.code)));
            status.insert("limitRemaining".into(), json!(s.limit_remaining));
            if let Some(limit) = &s.current_limit {
                let unit = rate_limit::Unit::try_from(limit.unit).map_or("UNKNOWN", |u| u.as_str_name());
                status.insert(
                    "currentLimit".into(),
                    json!({ "name": limit.name, "requestsPerUnit": limit.requests_per_unit, "unit": unit }),
                );
            }
            if let Some(reset) = &s.duration_until_reset {
                status.insert("durationUntilReset".into(), json!(format!("{}s", reset.seconds)));
            }
            Value::Object(status)
        })
        .collect();
    let mut out = Map::new();
    out.insert(
        "overallCode".into(),
        json!(code_name(response.overall_code)),
    );
    out.insert("statuses".into(), Value::Array(statuses));
    if !response.response_headers_to_add.is_empty() {
        out.insert(
            "responseHeadersToAdd".into(),
            json!(headers(&response.response_headers_to_add)),
        );
    }
    if !response.request_headers_to_add.is_empty() {
        out.insert(
            "requestHeadersToAdd".into(),
            json!(headers(&response.request_headers_to_add)),
        );
    }
    if !response.raw_body.is_empty() {
        out.insert(
            "body".into(),
            json!(String::from_utf8_lossy(&response.raw_body)),
        );
    }
    Value::Object(out)
}

/// `millis` since the Unix epoch in RFC 3339, UTC: `2026-12-13T06:00:00Z`, with the
/// milliseconds when there are any.
fn rfc3339(millis: u64) -> String {
    crate::calendar::timestamp(millis).map_or_else(|| millis.to_string(), |at| at.to_string())
}

/// `/v1/usage`'s answer: every matching limit's use, nothing consumed.
pub fn usage(domain: &str, limits: &[LimitUsage]) -> Value {
    let limits: Vec<Value> = limits
        .iter()
        .map(|u| {
            let mut entry = json!({
                "descriptor": u.descriptor,
                "rule": u.rule,
                "name": u.name,
                "requestsPerUnit": u.limit.requests_per_unit,
                "windowSeconds": u.limit.window_millis.div_ceil(1_000),
                "algorithm": u.limit.algorithm.name(),
                "used": u.used,
                "remaining": u.remaining,
                "resetSeconds": u.reset_after_millis.div_ceil(1_000),
                // The instant itself, for a dashboard or a customer's "resets on …".
                "resetAt": rfc3339(u.reset_at_millis),
                "overLimit": u.over_limit,
            });
            // What a bucket holds, named as its rule names it: `used` and `remaining` add
            // up to it, not to `requestsPerUnit`, the rate it refills or drains at.
            let size = match u.limit.algorithm {
                Algorithm::TokenBucket => Some("burst"),
                Algorithm::LeakyBucket => Some("capacity"),
                _ => None,
            };
            if let (Some(size), Value::Object(entry)) = (size, &mut entry) {
                entry.insert(size.into(), json!(u.limit.burst()));
                // Charges past it (`count_rejected`), still to refill or drain.
                if let Some(owed) = u.owed {
                    entry.insert("owed".into(), json!(owed));
                }
            }
            // A calendar window's zone: its `resetSeconds` runs to that zone's next
            // midnight, first of the month or year.
            if let (Some(calendar), Value::Object(entry)) = (u.limit.calendar, &mut entry) {
                entry.insert("calendar".into(), json!(calendar.zone.name()));
                // The same instant on that zone's clocks, for a customer's "resets on
                // the 1st at midnight".
                if let Some(local) = crate::calendar::rfc3339_in(u.reset_at_millis, calendar.zone) {
                    entry.insert("resetAtLocal".into(), json!(local));
                }
                if calendar.unit() == crate::limit::Unit::Week {
                    let day = crate::calendar::weekday_name(calendar.week_starts());
                    entry.insert("weekStarts".into(), json!(day));
                }
            }
            entry
        })
        .collect();
    json!({ "domain": domain, "limits": limits })
}
