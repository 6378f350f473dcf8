//! A gRPC codec that sends bytes already encoded as protobuf. The load generator encodes its
//! pool of requests once; sending them through this codec costs a copy, not an encoding, so
//! the generator leaves the CPU to the agent under test.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes `Bytes` as they are; decodes the response as the protobuf message `R`.
#[derive(Debug)]
pub struct PreEncoded<R> {
    response: PhantomData<fn() -> R>,
}

impl<R> Default for PreEncoded<R> {
    fn default() -> Self {
        PreEncoded { response: PhantomData }
    }
}

impl<R: Message + Default + Send + 'static> Codec for PreEncoded<R> {
    type Encode = Bytes;
    type Decode = R;
    type Encoder = BytesEncoder;
    type Decoder = MessageDecoder<R>;

    fn encoder(&mut self) -> Self::Encoder {
        BytesEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        MessageDecoder { response: PhantomData }
    }
}

#[derive(Debug)]
pub struct BytesEncoder;

impl Encoder for BytesEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put_slice(&item);
        Ok(())
    }
}

#[derive(Debug)]
pub struct MessageDecoder<R> {
    response: PhantomData<fn() -> R>,
}

impl<R: Message + Default> Decoder for MessageDecoder<R> {
    type Item = R;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        let message = R::decode(src.copy_to_bytes(src.remaining()))
            .map_err(|e| Status::internal(format!("response does not decode: {e}")))?;
        Ok(Some(message))
    }
}
