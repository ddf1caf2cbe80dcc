//! The caller's trace context, read from the headers of a ShouldRateLimit call.
//!
//! Envoy injects the context of its ratelimit call span into the gRPC request's headers in
//! the format of its tracer: W3C `traceparent` (OpenTelemetry tracer) or B3 (Zipkin tracer,
//! Istio's default), single-header or multi-header. meshlimit's span becomes that span's
//! child, so a trace shows the rate limit decision under the request it was for.
//!
//! A header that does not parse is treated as absent: the decision must never depend on
//! tracing, and a broken upstream tracer should not cost the request anything.

/// The span a call came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's sampling decision; `None` when it left the decision to us (B3 without a
    /// sampled flag).
    pub sampled: Option<bool>,
    /// W3C `tracestate`, passed on unchanged in the span.
    pub trace_state: String,
}

/// `tracestate` longer than this is dropped rather than copied into every span: the W3C
/// limit of 32 list members fits in it.
const MAX_TRACE_STATE: usize = 512;

impl Parent {
    /// The context in `header` (a lookup by lower-case name): `traceparent` first, then
    /// `b3`, then `x-b3-traceid` with its companions.
    pub fn from_headers<'h>(header: impl Fn(&str) -> Option<&'h str>) -> Option<Parent> {
        if let Some(value) = header("traceparent") {
            let mut parent = traceparent(value)?;
            if let Some(state) = header("tracestate").filter(|s| s.len() <= MAX_TRACE_STATE) {
                parent.trace_state = state.to_owned();
            }
            return Some(parent);
        }
        if let Some(value) = header("b3") {
            return b3_single(value);
        }
        b3_multi(&header)
    }
}

/// W3C trace context: `version-traceid-parentid-flags`, lower-case hex.
fn traceparent(value: &str) -> Option<Parent> {
    let value = value.trim();
    let version = hex_u8(value.get(0..2)?)?;
    // `ff` is forbidden; version 00 is exactly 55 characters, and a later version may add
    // fields after a dash, which are ignored.
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value.len() > 55 && value.as_bytes().get(55) != Some(&b'-') {
        return None;
    }
    let mut parts = value.get(..55)?.split('-');
    let (_, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let trace_id = hex_array::<16>(trace)?;
    let span_id = hex_array::<8>(span)?;
    let flags = hex_u8(flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
        trace_state: String::new(),
    })
}

/// B3 single header: `traceid-spanid[-sampled[-parentspanid]]`, or only the sampling
/// state (`0`, `1`, `d`), which starts no trace of its own.
fn b3_single(value: &str) -> Option<Parent> {
    let mut parts = value.trim().split('-');
    let trace = parts.next()?;
    let span = parts.next()?;
    let sampled = match parts.next() {
        None => None,
        Some(flag) => Some(b3_sampled(flag)?),
    };
    Some(Parent {
        trace_id: b3_trace_id(trace)?,
        span_id: nonzero(hex_array::<8>(span)?)?,
        sampled,
        trace_state: String::new(),
    })
}

/// B3 in several headers, as Envoy's Zipkin tracer writes it.
fn b3_multi<'h>(header: &impl Fn(&str) -> Option<&'h str>) -> Option<Parent> {
    let trace_id = b3_trace_id(header("x-b3-traceid")?.trim())?;
    let span_id = nonzero(hex_array::<8>(header("x-b3-spanid")?.trim())?)?;
    // The debug flag implies sampling.
    let sampled = if header("x-b3-flags").map(str::trim) == Some("1") {
        Some(true)
    } else {
        match header("x-b3-sampled") {
            None => None,
            Some(flag) => Some(b3_sampled(flag.trim())?),
        }
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        trace_state: String::new(),
    })
}

fn b3_sampled(flag: &str) -> Option<bool> {
    match flag {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// 128-bit, or 64-bit widened with leading zeros as B3 specifies.
fn b3_trace_id(text: &str) -> Option<[u8; 16]> {
    let id = match text.len() {
        32 => hex_array::<16>(text)?,
        16 => {
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&hex_array::<8>(text)?);
            id
        }
        _ => return None,
    };
    nonzero(id)
}

fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    (id != [0; N]).then_some(id)
}

/// Exactly `2 * N` lower-case hex digits. B3 allows upper case, and Envoy writes lower
/// case in both formats, so upper case is accepted too.
fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        let [high, low] = pair else { return None };
        *byte = hex_digit(*high)? << 4 | hex_digit(*low)?;
    }
    Some(out)
}

fn hex_u8(text: &str) -> Option<u8> {
    hex_array::<1>(text).map(|[byte]| byte)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lower-case hex, as W3C writes ids.
    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    fn parent(headers: &[(&str, &str)]) -> Option<Parent> {
        Parent::from_headers(|name| {
            headers
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| *value)
        })
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    #[test]
    fn traceparent_gives_ids_flags_and_tracestate() {
        let got = parent(&[
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
            ("tracestate", "vendor=abc"),
        ])
        .unwrap();
        assert_eq!(hex(&got.trace_id), TRACE);
        assert_eq!(hex(&got.span_id), SPAN);
        assert_eq!(got.sampled, Some(true));
        assert_eq!(got.trace_state, "vendor=abc");
        let unsampled = parent(&[("traceparent", &format!("00-{TRACE}-{SPAN}-00"))]).unwrap();
        assert_eq!(unsampled.sampled, Some(false));
    }

    #[test]
    fn a_later_traceparent_version_may_carry_more_fields() {
        let later = format!("01-{TRACE}-{SPAN}-01-whatever");
        assert!(parent(&[("traceparent", &later)]).is_some());
        // Version 00 may not.
        let longer = format!("00-{TRACE}-{SPAN}-01-whatever");
        assert_eq!(parent(&[("traceparent", &longer)]), None);
    }

    #[test]
    fn broken_traceparents_are_no_parent() {
        let zeros = "0".repeat(32);
        for bad in [
            format!("ff-{TRACE}-{SPAN}-01"),
            format!("00-{zeros}-{SPAN}-01"),
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{TRACE}-{SPAN}-0x"),
            format!("00-{}-{SPAN}-01", &TRACE[1..]),
            format!("00_{TRACE}_{SPAN}_01"),
            "00-é".to_owned(),
            String::new(),
        ] {
            assert_eq!(parent(&[("traceparent", &bad)]), None, "{bad}");
        }
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let other = "463ac35c9f6413ad48485a3953bb6124";
        let got = parent(&[
            ("b3", &format!("{other}-{SPAN}-1")),
            ("traceparent", &format!("00-{TRACE}-{SPAN}-01")),
        ])
        .unwrap();
        assert_eq!(hex(&got.trace_id), TRACE);
    }

    #[test]
    fn b3_single_header_with_and_without_a_decision() {
        let got = parent(&[("b3", &format!("{TRACE}-{SPAN}-1-{SPAN}"))]).unwrap();
        assert_eq!(
            (hex(&got.trace_id), got.sampled),
            (TRACE.to_owned(), Some(true))
        );
        let deferred = parent(&[("b3", &format!("{TRACE}-{SPAN}"))]).unwrap();
        assert_eq!(deferred.sampled, None);
        let denied = parent(&[("b3", &format!("{TRACE}-{SPAN}-0"))]).unwrap();
        assert_eq!(denied.sampled, Some(false));
        // A sampling state alone names no span to be the child of.
        assert_eq!(parent(&[("b3", "1")]), None);
    }

    #[test]
    fn b3_multi_header_as_zipkin_writes_it() {
        let got = parent(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "1"),
        ])
        .unwrap();
        // A 64-bit trace id is widened with leading zeros.
        assert_eq!(hex(&got.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(got.sampled, Some(true));
        let debug = parent(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", SPAN),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ])
        .unwrap();
        assert_eq!(debug.sampled, Some(true));
        assert_eq!(parent(&[("x-b3-traceid", TRACE)]), None);
    }
}
