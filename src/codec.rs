//! The gRPC codec of the generated service and client: tonic's prost codec with smaller
//! buffers. tonic starts every message's encode and decode buffer at 8 KiB; our requests
//! and answers are a few hundred bytes, and two 8 KiB allocations per call made glibc
//! consolidate its free lists on every request. A larger message grows the buffer as
//! before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

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
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
