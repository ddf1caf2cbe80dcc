//! Decoding a `RateLimitRequest` straight from the received bytes.
//!
//! prost decodes through its generic `Buf` machinery: every varint, tag and string goes
//! through trait calls on tonic's buffer, and an 8-descriptor request cost as much to decode
//! as meshlimit's whole decision (27 k instructions of a 117 k request). The request has
//! one fixed, shallow shape, so this reads it from one contiguous slice instead.
//!
//! It only has to be right for the shape Envoy sends: every field known, with its schema's
//! wire type, and each singular message at most once. Anything else (an unknown field, a
//! group, a wire type of another field, a repeated `limit`, bad UTF-8, a truncation or an
//! overlong varint) makes the fast reader give up, and prost decodes the whole message
//! instead, so skipping, merging and every error stay exactly prost's — but one: an entry
//! value that is not UTF-8. Envoy passes a header's bytes on as they came (obs-text such as
//! `\xff` included), and prost refuses the whole request for them, which would let it
//! through a fail-open Envoy, every other descriptor's limit with it. Such a value is read
//! with each stray byte written `\xFF`, so it counts under a key of its own.

use std::fmt::Write;

use prost::{DecodeError, Message};

use crate::proto::rate_limit_descriptor::{Entry, RateLimitOverride};
use crate::proto::{RateLimitDescriptor, RateLimitRequest};

/// Wire types the request's fields use.
const VARINT: u8 = 0;
const LEN: u8 = 2;

/// Decodes `bytes` as prost would: the same message for every input prost accepts, an
/// error for every input it refuses.
pub fn decode_request(bytes: &[u8]) -> Result<RateLimitRequest, DecodeError> {
    if let Some(request) = read_request(bytes, Values::Utf8) {
        return Ok(request);
    }
    RateLimitRequest::decode(bytes)
        .or_else(|refused| read_request(bytes, Values::Escaped).ok_or(refused))
}

/// How entry values that are not UTF-8 are read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Values {
    /// Left to prost, which refuses them.
    Utf8,
    /// Taken, each byte that is not part of a UTF-8 character written `\xNN`.
    Escaped,
}

/// The plain shape read fast, or `None` for prost to decide.
fn read_request(bytes: &[u8], values: Values) -> Option<RateLimitRequest> {
    let mut request = RateLimitRequest::default();
    each_field(bytes, |reader, tag| {
        match tag {
            (1, LEN) => request.domain = reader.string()?,
            (2, LEN) => request
                .descriptors
                .push(read_descriptor(reader.delimited()?, values)?),
            (3, VARINT) => request.hits_addend = reader.varint()? as u32,
            _ => return None,
        }
        Some(())
    })?;
    Some(request)
}

fn read_descriptor(bytes: &[u8], values: Values) -> Option<RateLimitDescriptor> {
    let mut descriptor = RateLimitDescriptor::default();
    each_field(bytes, |reader, tag| {
        match tag {
            (1, LEN) => descriptor
                .entries
                .push(read_entry(reader.delimited()?, values)?),
            // A second occurrence merges into the first in prost; left to prost.
            (2, LEN) if descriptor.limit.is_none() => {
                descriptor.limit = Some(read_override(reader.delimited()?)?);
            }
            (3, LEN) if descriptor.hits_addend.is_none() => {
                descriptor.hits_addend = Some(read_u64_value(reader.delimited()?)?);
            }
            _ => return None,
        }
        Some(())
    })?;
    Some(descriptor)
}

fn read_entry(bytes: &[u8], values: Values) -> Option<Entry> {
    let mut entry = Entry::default();
    each_field(bytes, |reader, tag| {
        match tag {
            (1, LEN) => entry.key = reader.string()?,
            (2, LEN) if values == Values::Escaped => {
                entry.value = escaped(reader.delimited()?);
            }
            (2, LEN) => entry.value = reader.string()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(entry)
}

fn read_override(bytes: &[u8]) -> Option<RateLimitOverride> {
    let mut limit = RateLimitOverride::default();
    each_field(bytes, |reader, tag| {
        match tag {
            (1, VARINT) => limit.requests_per_unit = reader.varint()? as u32,
            (2, VARINT) => limit.unit = reader.varint()? as i32,
            _ => return None,
        }
        Some(())
    })?;
    Some(limit)
}

/// `google.protobuf.UInt64Value`: its one field, 0 when absent.
fn read_u64_value(bytes: &[u8]) -> Option<u64> {
    let mut value = 0;
    each_field(bytes, |reader, tag| {
        match tag {
            (1, VARINT) => value = reader.varint()?,
            _ => return None,
        }
        Some(())
    })?;
    Some(value)
}

/// `bytes` as text, each byte that is not part of a UTF-8 character written `\xNN`.
fn escaped(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(text, "\\x{byte:02X}");
        }
    }
    text
}

/// Hands each field of one message's `bytes` (its tag, and the reader positioned at its
/// value) to `field`, which reads the value or returns `None` to leave it to prost.
fn each_field<'a>(
    bytes: &'a [u8],
    mut field: impl FnMut(&mut Reader<'a>, (u64, u8)) -> Option<()>,
) -> Option<()> {
    let mut reader = Reader { bytes, at: 0 };
    while !reader.done() {
        let tag = reader.tag()?;
        field(&mut reader, tag)?;
    }
    Some(())
}

/// A position in one message's bytes. Every read returns `None` where prost would have
/// to look closer.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn varint(&mut self) -> Option<u64> {
        // Most varints here (tags, lengths, small counts) are one byte.
        let first = *self.bytes.get(self.at)?;
        self.at += 1;
        if first < 0x80 {
            return Some(u64::from(first));
        }
        let mut value = u64::from(first & 0x7f);
        // Nine more bytes at most; prost refuses a tenth byte above 1 (overflow).
        for shift in (7..64).step_by(7) {
            let byte = *self.bytes.get(self.at)?;
            self.at += 1;
            if shift == 63 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(value);
            }
        }
        None
    }

    /// The field number and wire type of the next field.
    fn tag(&mut self) -> Option<(u64, u8)> {
        let key = self.varint()?;
        if key > u64::from(u32::MAX) {
            return None;
        }
        Some((key >> 3, (key & 7) as u8))
    }

    fn delimited(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.varint()?).ok()?;
        let end = self.at.checked_add(len)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn string(&mut self) -> Option<String> {
        let bytes = self.delimited()?;
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(key: &str, value: &str) -> Entry {
        Entry {
            key: key.into(),
            value: value.into(),
        }
    }

    /// What Envoy sends for bench/envoy's route: the fast reader takes it whole.
    #[test]
    fn an_envoy_request_is_read_without_prost() {
        let request = RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![
                RateLimitDescriptor {
                    entries: vec![entry("remote_address", "10.0.0.1")],
                    ..Default::default()
                },
                RateLimitDescriptor {
                    entries: vec![entry("user", "alice"), entry("path", "/api/v1/orders")],
                    limit: Some(RateLimitOverride {
                        requests_per_unit: 42,
                        unit: 2,
                    }),
                    hits_addend: Some(3),
                },
            ],
            hits_addend: 5,
        };
        let bytes = request.encode_to_vec();
        assert_eq!(read_request(&bytes, Values::Utf8), Some(request.clone()));
        assert_eq!(decode_request(&bytes).ok(), Some(request));
    }

    /// A field this schema does not know (a newer Envoy's) is skipped, as prost skips it.
    #[test]
    fn an_unknown_field_is_left_to_prost_and_skipped() {
        let request = RateLimitRequest {
            domain: "edge".into(),
            ..Default::default()
        };
        let mut bytes = request.encode_to_vec();
        bytes.extend_from_slice(&[0x20, 0x07]); // field 4, varint 7
        assert_eq!(read_request(&bytes, Values::Utf8), None);
        assert_eq!(decode_request(&bytes).ok(), Some(request));
    }

    /// Two `limit` fields merge field by field in protobuf: the second's unit with the
    /// first's requests_per_unit when the second leaves it out.
    #[test]
    fn a_repeated_singular_message_merges_like_prost() {
        let first = RateLimitOverride {
            requests_per_unit: 10,
            unit: 1,
        };
        let second = RateLimitOverride {
            requests_per_unit: 0,
            unit: 3,
        };
        let mut descriptor = Vec::new();
        for limit in [first, second] {
            prost::encoding::message::encode(2, &limit, &mut descriptor);
        }
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(2, &descriptor, &mut bytes);
        let decoded = decode_request(&bytes).expect("valid");
        assert_eq!(
            decoded.descriptors[0].limit,
            Some(RateLimitOverride {
                requests_per_unit: 10,
                unit: 3
            })
        );
    }

    #[test]
    fn bad_utf8_and_truncation_are_errors() {
        // domain = "\xff"
        assert!(decode_request(&[0x0a, 0x01, 0xff]).is_err());
        // domain claims 5 bytes, has 2
        assert!(decode_request(&[0x0a, 0x05, b'a', b'b']).is_err());
        // a varint of eleven bytes
        assert!(
            decode_request(&[
                0x18, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])
            .is_err()
        );
    }

    /// A request for domain `edge` with one entry `key` = `value`, as raw bytes.
    fn one_entry(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut entry = Vec::new();
        prost::encoding::bytes::encode(1, &key.to_vec(), &mut entry);
        prost::encoding::bytes::encode(2, &value.to_vec(), &mut entry);
        let mut descriptor = Vec::new();
        prost::encoding::bytes::encode(1, &entry, &mut descriptor);
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(1, &b"edge".to_vec(), &mut bytes);
        prost::encoding::bytes::encode(2, &descriptor, &mut bytes);
        bytes
    }

    /// A header value Envoy passed on with a byte that is not UTF-8 (latin-1, as an old
    /// client sends it): prost refuses the request; it is read with the byte written out,
    /// so it counts under a key of its own.
    #[test]
    fn an_entry_value_that_is_not_utf8_is_read_with_its_stray_bytes_escaped() {
        let bytes = one_entry(b"team", b"M\xfcller");
        assert!(RateLimitRequest::decode(bytes.as_slice()).is_err());
        let decoded = decode_request(&bytes).expect("taken");
        assert_eq!(
            decoded.descriptors[0].entries,
            [entry("team", "M\\xFCller")]
        );
        // Valid UTF-8 around the stray byte stays as it was.
        let value = [&b"\xc3\xa9"[..], b"\xff", b"\xc3\xa9"].concat(); // é, 0xff, é
        let decoded = decode_request(&one_entry(b"team", &value)).expect("taken");
        assert_eq!(decoded.descriptors[0].entries[0].value, "é\\xFFé");
        // A key that is not UTF-8 is still refused: Envoy's config writes keys.
        assert!(decode_request(&one_entry(b"te\xffam", b"a")).is_err());
    }

    fn arbitrary_request() -> impl Strategy<Value = RateLimitRequest> {
        let text = "[a-z/|=%é\u{1F600}]{0,12}";
        let entries = prop::collection::vec((text, text), 0..4);
        let limit = prop::option::of((any::<u32>(), -3i32..10));
        let descriptor = (entries, limit, prop::option::of(any::<u64>())).prop_map(
            |(entries, limit, hits_addend)| RateLimitDescriptor {
                entries: entries.into_iter().map(|(k, v)| entry(&k, &v)).collect(),
                limit: limit.map(|(requests_per_unit, unit)| RateLimitOverride {
                    requests_per_unit,
                    unit,
                }),
                hits_addend,
            },
        );
        (text, prop::collection::vec(descriptor, 0..6), any::<u32>()).prop_map(
            |(domain, descriptors, hits_addend)| RateLimitRequest {
                domain,
                descriptors,
                hits_addend,
            },
        )
    }

    proptest! {
        /// Every request prost writes is read back whole by the fast reader.
        #[test]
        fn every_encoded_request_is_read_fast(request in arbitrary_request()) {
            let bytes = request.encode_to_vec();
            prop_assert_eq!(read_request(&bytes, Values::Utf8), Some(request));
        }

        /// Two messages back to back are one merged message in protobuf: the later
        /// domain and hits_addend win, and the descriptors add up.
        #[test]
        fn concatenated_requests_merge_as_prost_merges_them(
            first in arbitrary_request(),
            second in arbitrary_request(),
        ) {
            let mut bytes = first.encode_to_vec();
            bytes.extend(second.encode_to_vec());
            let prost = RateLimitRequest::decode(bytes.as_slice());
            prop_assert_eq!(decode_request(&bytes).ok(), prost.ok());
        }

        /// Damaged bytes (a byte changed, cut short, or inserted) get prost's answer,
        /// whichever path reads them.
        #[test]
        fn damaged_bytes_are_decoded_as_prost_decodes_them(
            request in arbitrary_request(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            damage in 0..3u8,
        ) {
            let mut bytes = request.encode_to_vec();
            if bytes.is_empty() {
                bytes.push(byte);
            } else {
                let at = at.index(bytes.len());
                match damage {
                    0 => bytes[at] = byte,
                    1 => bytes.truncate(at),
                    _ => bytes.insert(at, byte),
                }
            }
            agrees_with_prost(&bytes)?;
        }

        /// Any bytes at all: the same answer as prost.
        #[test]
        fn random_bytes_are_decoded_as_prost_decodes_them(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            agrees_with_prost(&bytes)?;
        }
    }

    /// prost's answer for `bytes`, but one: where prost refuses an entry value that is
    /// not UTF-8, the request is taken with its stray bytes escaped.
    fn agrees_with_prost(bytes: &[u8]) -> Result<(), TestCaseError> {
        let ours = decode_request(bytes);
        let prost = RateLimitRequest::decode(bytes);
        match (ours, prost) {
            (Ok(ours), Err(refused)) => {
                prop_assert!(refused.to_string().contains("UTF-8"), "{}", refused);
                let escaped = ours
                    .descriptors
                    .iter()
                    .flat_map(|d| &d.entries)
                    .any(|e| e.value.contains("\\x"));
                prop_assert!(escaped, "{:?}", ours);
            }
            (ours, prost) => prop_assert_eq!(ours.ok(), prost.ok()),
        }
        Ok(())
    }
}
