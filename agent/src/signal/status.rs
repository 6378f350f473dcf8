//! `google.rpc.Status` and `google.rpc.RetryInfo`, as OTLP uses them: the body of an OTLP/HTTP
//! error response, and the details of a gRPC status that tell a client when to retry.
//! Field numbers are those of Google's published `status.proto` and `error_details.proto`.

use prost::Message;
use std::time::Duration;

pub const RETRY_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.RetryInfo";

#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<Any>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Any {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    pub retry_delay: Option<ProtoDuration>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ProtoDuration {
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

/// Encoded `google.rpc.Status` carrying a RetryInfo with `delay`, for a gRPC status's details.
pub fn retry_details(code: i32, message: &str, delay: Duration) -> Vec<u8> {
    let info = RetryInfo {
        retry_delay: Some(ProtoDuration {
            seconds: delay.as_secs() as i64,
            nanos: delay.subsec_nanos() as i32,
        }),
    };
    RpcStatus {
        code,
        message: message.to_owned(),
        details: vec![Any { type_url: RETRY_INFO_TYPE_URL.into(), value: info.encode_to_vec() }],
    }
    .encode_to_vec()
}

/// The retry delay in encoded `google.rpc.Status` details, if there is one.
pub fn retry_delay(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let any = status.details.iter().find(|d| d.type_url == RETRY_INFO_TYPE_URL)?;
    let delay = RetryInfo::decode(any.value.as_slice()).ok()?.retry_delay?;
    if delay.seconds < 0 || delay.nanos < 0 {
        return None;
    }
    Some(Duration::new(delay.seconds as u64, delay.nanos as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_round_trips() {
        let details = retry_details(14, "busy", Duration::from_millis(1500));
        assert_eq!(retry_delay(&details), Some(Duration::from_millis(1500)));
        assert_eq!(retry_delay(b"garbage"), None);
        assert_eq!(retry_delay(&RpcStatus::default().encode_to_vec()), None);
    }
}
