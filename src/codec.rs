//! The gRPC codec of the generated service and client: tonic's prost codec with smaller
//! buffers. tonic starts every message's encode and decode buffer at 8 KiB; our requests
//! and answers are a few hundred bytes, and two 8 KiB allocations per call made glibc
//! consolidate its free lists on every request. A larger message grows the buffer as
//! before.
//!
//! The service's own messages skip prost's generic reader and writer: requests are
//! decoded by `request::decode_request` from the received bytes in one piece, and answers
//! encoded by `response::encode_response` in one pass (each module says what it saves).

mod request;
mod response;
pub(crate) mod wire;

use std::cell::RefCell;
use std::marker::PhantomData;

use prost::bytes::{Buf, BufMut};
use prost::{DecodeError, Message};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

pub use request::decode_request;
pub use response::encode_response;

use crate::proto::{RateLimitRequest, RateLimitResponse};

/// Room for a typical request or answer without growing.
const BUFFER_BYTES: usize = 1024;
/// tonic's own default: how much a streaming encoder buffers before yielding.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// Named by `build.rs` (`codec_path`) for every generated method.
#[derive(Debug, Clone, Copy)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: Encode + Send + 'static,
    U: Decode + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = MessageEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder(PhantomData)
    }
}

/// How a message the service sends is encoded: appended to a byte vector.
pub trait Encode {
    fn encode_into(&self, out: &mut Vec<u8>);
}

impl Encode for RateLimitResponse {
    fn encode_into(&self, out: &mut Vec<u8>) {
        encode_response(self, out);
    }
}

/// The client's side (tests, examples): prost's encoder is fine there.
impl Encode for RateLimitRequest {
    fn encode_into(&self, out: &mut Vec<u8>) {
        self.encode_raw(out);
    }
}

#[derive(Debug)]
pub struct MessageEncoder<T>(PhantomData<T>);

thread_local! {
    /// Where a message is encoded before one copy into tonic's buffer: writing tonic's
    /// buffer a field at a time goes through a `BufMut` call per field.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<T: Encode> Encoder for MessageEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            item.encode_into(scratch);
            buf.put_slice(scratch);
            // A rare huge answer does not keep its memory on every thread.
            if scratch.capacity() > BUFFER_BYTES * 64 {
                *scratch = Vec::new();
            }
        });
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

/// How a message the service receives is decoded from its bytes in one piece.
pub trait Decode: Sized {
    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeError>;
}

impl Decode for RateLimitRequest {
    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_request(bytes)
    }
}

/// The client's side (tests, examples): prost's decoder is fine there.
impl Decode for RateLimitResponse {
    fn decode_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        Self::decode(bytes)
    }
}

#[derive(Debug)]
pub struct MessageDecoder<U>(PhantomData<U>);

impl<U: Decode> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let len = buf.remaining();
        // tonic hands over one message in one contiguous buffer; copied if it ever is not.
        let decoded = if let Some(bytes) = buf.chunk().get(..len) {
            let decoded = U::decode_bytes(bytes);
            buf.advance(len);
            decoded
        } else {
            U::decode_bytes(&buf.copy_to_bytes(len))
        };
        // INTERNAL, as tonic's prost codec answers a message that does not parse.
        decoded
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
