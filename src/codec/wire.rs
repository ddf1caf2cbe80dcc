//! Protobuf's wire format, written by hand: the primitives of the two encoders that skip
//! prost's generic writer, the service's answers (`codec::response`) and the spans it
//! exports (`trace::encode`).
//!
//! Field values are written as prost writes proto3 fields: a default (zero, empty) is left
//! out, except by the `_always` writers, which a `oneof` member needs (leaving it out would
//! lose which member was chosen).
//!
//! `#[inline]` on each: the callers are in other modules, which may be other codegen
//! units, and a call per field is what these encoders exist to avoid. Without it on
//! `put_nested`, an 8-descriptor answer cost 0.7 k instructions more to encode (callgrind).

/// Wire types.
pub const VARINT: u64 = 0;
pub const FIXED64: u64 = 1;
pub const LEN: u64 = 2;
pub const FIXED32: u64 = 5;

/// A message field: its key, its length, then what `write` appends. The length comes
/// first on the wire but is known only after the body is written, so one byte is held
/// for it and filled in afterwards. Working the length out beforehand walks the message
/// again, a varint width at a time, which costs as much as writing it. A body of 128
/// bytes or more needs a longer varint, and the body is moved up to make room.
#[inline]
pub fn put_nested(out: &mut Vec<u8>, field: u64, write: impl FnOnce(&mut Vec<u8>)) {
    put_key(out, field, LEN);
    let at = out.len();
    out.push(0);
    write(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        if let Some(slot) = out.get_mut(at) {
            *slot = len as u8;
        }
    } else {
        let mut varint = Vec::with_capacity(10);
        put_varint(&mut varint, len as u64);
        out.splice(at..=at, varint);
    }
}

#[inline]
pub fn put_uint(out: &mut Vec<u8>, field: u64, value: u64) {
    if value != 0 {
        put_uint_always(out, field, value);
    }
}

#[inline]
pub fn put_uint_always(out: &mut Vec<u8>, field: u64, value: u64) {
    put_key(out, field, VARINT);
    put_varint(out, value);
}

/// int32 and enums are written as their two's complement, sign-extended to 64 bits.
#[inline]
pub fn put_enum(out: &mut Vec<u8>, field: u64, value: i32) {
    put_uint(out, field, value as u64);
}

#[inline]
pub fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_bytes_always(out, field, bytes);
    }
}

#[inline]
pub fn put_bytes_always(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

#[inline]
pub fn put_fixed64(out: &mut Vec<u8>, field: u64, value: u64) {
    if value != 0 {
        put_key(out, field, FIXED64);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[inline]
pub fn put_fixed32(out: &mut Vec<u8>, field: u64, value: u32) {
    if value != 0 {
        put_key(out, field, FIXED32);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[inline]
pub fn put_key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    put_varint(out, field << 3 | wire_type);
}

#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// How many bytes `put_varint` writes for `value`.
#[inline]
pub fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_at_every_boundary_are_prosts() {
        for shift in 0..64 {
            for value in [1u64 << shift, (1u64 << shift) - 1, (1u64 << shift) + 1] {
                let mut out = Vec::new();
                put_varint(&mut out, value);
                let mut theirs = Vec::new();
                prost::encoding::encode_varint(value, &mut theirs);
                assert_eq!(out, theirs, "{value}");
                assert_eq!(varint_len(value), out.len(), "{value}");
            }
        }
    }
}
