//! OTLP spans written straight to protobuf bytes.
//!
//! Through prost's generated types, a traced call cost ~9.7 k instructions more than an
//! untraced one (BENCHMARKS.md section 16): a dozen owned strings per span, and prost
//! working out each nested message's length again at every level of the export request.
//! A span is instead written once, when its call ends, into one buffer; the exporter only
//! frames the buffers it sends. The field numbers are OTLP's (proto/opentelemetry/...),
//! and the unit tests decode what is written here with prost's types of those protos. The
//! wire primitives are the answer encoder's (`codec::wire`).

use crate::codec::wire::{
    LEN, put_bytes, put_bytes_always, put_fixed32, put_fixed64, put_key, put_nested, put_uint,
    put_uint_always, put_varint, varint_len,
};

/// A `KeyValue` with a string value. `AnyValue`'s members are a oneof, written even when
/// empty or zero.
pub(super) fn text(out: &mut Vec<u8>, field: u64, name: &str, value: &str) {
    put_nested(out, field, |kv| {
        put_bytes(kv, 1, name.as_bytes());
        put_nested(kv, 2, |any| put_bytes_always(any, 1, value.as_bytes()));
    });
}

/// A `KeyValue` with an integer value.
pub(super) fn int(out: &mut Vec<u8>, field: u64, name: &str, value: i64) {
    put_nested(out, field, |kv| {
        put_bytes(kv, 1, name.as_bytes());
        put_nested(kv, 2, |any| put_uint_always(any, 3, value as u64));
    });
}

/// What a span says, borrowed from the call it describes.
pub(super) struct SpanFields<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: &'a [u8; 8],
    pub parent_span_id: Option<&'a [u8; 8]>,
    pub trace_state: &'a str,
    pub name: &'a str,
    pub kind: i32,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    /// An error status's message; `None` leaves the status unset.
    pub error: Option<&'a str>,
}

/// The body of a `Span` message: `fields`, then the attributes `attributes` writes (field
/// 9, with `text` and `int`), then status and flags.
pub(super) fn span(fields: &SpanFields<'_>, attributes: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::with_capacity(384);
    put_bytes(&mut out, 1, fields.trace_id);
    put_bytes(&mut out, 2, fields.span_id);
    put_bytes(&mut out, 3, fields.trace_state.as_bytes());
    if let Some(parent) = fields.parent_span_id {
        put_bytes(&mut out, 4, parent);
    }
    put_bytes(&mut out, 5, fields.name.as_bytes());
    put_uint(&mut out, 6, fields.kind as u64);
    put_fixed64(&mut out, 7, fields.start_unix_nanos);
    put_fixed64(&mut out, 8, fields.end_unix_nanos);
    attributes(&mut out);
    if let Some(message) = fields.error {
        put_nested(&mut out, 15, |status| {
            put_bytes(status, 2, message.as_bytes());
            put_uint(status, 3, 2); // STATUS_CODE_ERROR
        });
    }
    // W3C flags: sampled (unsampled calls make no span).
    put_fixed32(&mut out, 16, 1);
    out
}

/// An `ExportTraceServiceRequest` of `spans` (each a `Span` body) under one resource and
/// scope, both already encoded as message bodies.
pub(super) fn export_request(resource: &[u8], scope: &[u8], spans: &[Vec<u8>]) -> Vec<u8> {
    let framed = |len: usize| 1 + varint_len(len as u64) + len;
    let scope_spans = framed(scope.len()) + spans.iter().map(|s| framed(s.len())).sum::<usize>();
    let resource_spans = framed(resource.len()) + framed(scope_spans);
    let mut out = Vec::with_capacity(framed(resource_spans));
    put_key(&mut out, 1, LEN);
    put_varint(&mut out, resource_spans as u64);
    put_bytes_always(&mut out, 1, resource);
    put_key(&mut out, 2, LEN);
    put_varint(&mut out, scope_spans as u64);
    put_bytes_always(&mut out, 1, scope);
    for span in spans {
        put_bytes_always(&mut out, 2, span);
    }
    out
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::opentelemetry::collector::trace::v1::ExportTraceServiceRequest;
    use crate::proto::opentelemetry::common::v1::{AnyValue, KeyValue, any_value};
    use crate::proto::opentelemetry::trace::v1::{Span, Status};

    fn kv(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value: Some(AnyValue { value: Some(value) }),
        }
    }

    #[test]
    fn a_span_reads_back_through_the_otlp_protos() {
        let long = "x".repeat(300);
        let fields = SpanFields {
            trace_id: &[7; 16],
            span_id: &[8; 8],
            parent_span_id: Some(&[9; 8]),
            trace_state: "vendor=a",
            name: "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            kind: 2,
            start_unix_nanos: 1_796_000_000_000_000_000,
            end_unix_nanos: 1_796_000_000_000_250_000,
            error: Some(&long),
        };
        let body = span(&fields, |out| {
            text(out, 9, "ratelimit.domain", "edge");
            int(out, 9, "ratelimit.descriptors", 3);
            int(out, 9, "negative", -1);
            text(out, 9, "long", &long);
        });
        let decoded = Span::decode(body.as_slice()).expect("prost reads it");
        assert_eq!(
            decoded,
            Span {
                trace_id: vec![7; 16],
                span_id: vec![8; 8],
                trace_state: "vendor=a".to_owned(),
                parent_span_id: vec![9; 8],
                name: fields.name.to_owned(),
                kind: 2,
                start_time_unix_nano: fields.start_unix_nanos,
                end_time_unix_nano: fields.end_unix_nanos,
                attributes: vec![
                    kv(
                        "ratelimit.domain",
                        any_value::Value::StringValue("edge".into())
                    ),
                    kv("ratelimit.descriptors", any_value::Value::IntValue(3)),
                    kv("negative", any_value::Value::IntValue(-1)),
                    kv("long", any_value::Value::StringValue(long.clone())),
                ],
                status: Some(Status {
                    message: long.clone(),
                    code: 2
                }),
                flags: 1,
            }
        );
        // A root span without an error: no parent, no status.
        let root = span(
            &SpanFields {
                parent_span_id: None,
                trace_state: "",
                error: None,
                ..fields
            },
            |_| {},
        );
        let decoded = Span::decode(root.as_slice()).expect("prost reads it");
        assert!(decoded.parent_span_id.is_empty() && decoded.status.is_none());
    }

    #[test]
    fn the_export_request_frames_every_span() {
        let mut resource = Vec::new();
        text(&mut resource, 1, "service.name", "meshlimit");
        let mut scope = Vec::new();
        put_bytes(&mut scope, 1, b"meshlimit");
        let spans: Vec<Vec<u8>> = (0..200u8)
            .map(|n| {
                let fields = SpanFields {
                    trace_id: &[n; 16],
                    span_id: &[n; 8],
                    parent_span_id: None,
                    trace_state: "",
                    name: "s",
                    kind: 2,
                    start_unix_nanos: 1,
                    end_unix_nanos: 2,
                    error: None,
                };
                span(&fields, |_| {})
            })
            .collect();
        let request =
            ExportTraceServiceRequest::decode(export_request(&resource, &scope, &spans).as_slice())
                .expect("prost reads it");
        let [resource_spans] = request.resource_spans.as_slice() else {
            panic!("one ResourceSpans: {request:?}");
        };
        let attributes = &resource_spans.resource.as_ref().unwrap().attributes;
        assert_eq!(attributes[0].key, "service.name");
        let [scope_spans] = resource_spans.scope_spans.as_slice() else {
            panic!("one ScopeSpans");
        };
        assert_eq!(scope_spans.scope.as_ref().unwrap().name, "meshlimit");
        assert_eq!(scope_spans.spans.len(), 200);
        assert_eq!(scope_spans.spans[199].trace_id, vec![199; 16]);
    }
}
