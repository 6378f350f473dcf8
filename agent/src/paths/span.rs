//! The part of a span that path analysis needs, taken out of the OTLP request once.
//!
//! A record is about a hundred bytes plus its name: the request itself goes on to the
//! exporters untouched, and only these records wait in trace assembly.

use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{status, Span};
use std::sync::Arc;

/// OTLP's span kinds, as stored in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Unspecified = 0,
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

impl Kind {
    pub const ALL: [Kind; 6] =
        [Kind::Unspecified, Kind::Internal, Kind::Server, Kind::Client, Kind::Producer, Kind::Consumer];

    pub fn from_otlp(kind: i32) -> Kind {
        match kind {
            1 => Kind::Internal,
            2 => Kind::Server,
            3 => Kind::Client,
            4 => Kind::Producer,
            5 => Kind::Consumer,
            _ => Kind::Unspecified,
        }
    }

    /// The lower-case word used in the path JSON (`"server"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Unspecified => "unspecified",
            Kind::Internal => "internal",
            Kind::Server => "server",
            Kind::Client => "client",
            Kind::Producer => "producer",
            Kind::Consumer => "consumer",
        }
    }

    /// The enum name the OpenTelemetry spanmetrics connector uses as `span_kind`.
    pub fn otel_name(self) -> &'static str {
        match self {
            Kind::Unspecified => "SPAN_KIND_UNSPECIFIED",
            Kind::Internal => "SPAN_KIND_INTERNAL",
            Kind::Server => "SPAN_KIND_SERVER",
            Kind::Client => "SPAN_KIND_CLIENT",
            Kind::Producer => "SPAN_KIND_PRODUCER",
            Kind::Consumer => "SPAN_KIND_CONSUMER",
        }
    }
}

/// OTLP's status codes, as stored in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum StatusCode {
    Unset = 0,
    Ok = 1,
    Error = 2,
}

impl StatusCode {
    pub const ALL: [StatusCode; 3] = [StatusCode::Unset, StatusCode::Ok, StatusCode::Error];

    pub fn from_otlp(code: i32) -> StatusCode {
        match status::StatusCode::try_from(code) {
            Ok(status::StatusCode::Ok) => StatusCode::Ok,
            Ok(status::StatusCode::Error) => StatusCode::Error,
            _ => StatusCode::Unset,
        }
    }

    /// The enum name the OpenTelemetry spanmetrics connector uses as `status_code`.
    pub fn otel_name(self) -> &'static str {
        match self {
            StatusCode::Unset => "STATUS_CODE_UNSET",
            StatusCode::Ok => "STATUS_CODE_OK",
            StatusCode::Error => "STATUS_CODE_ERROR",
        }
    }
}

/// One span, reduced to what assembly and aggregation read.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub span_id: u64,
    /// 0 when the span has no parent.
    pub parent_id: u64,
    /// Unix nanoseconds.
    pub start: u64,
    pub end: u64,
    pub service: Arc<str>,
    pub name: Box<str>,
    /// `http.route` with the method in front when the span has one: the handler's name if
    /// this span turns out to be a service's entry span.
    pub route: Option<Box<str>>,
    /// For client and producer spans: who they call (`peer.service`, `server.address`,
    /// `net.peer.name`), for service-graph edges whose server side this agent does not see.
    pub peer: Option<Box<str>>,
    pub kind: Kind,
    pub status: StatusCode,
}

impl SpanRecord {
    pub fn is_error(&self) -> bool {
        self.status == StatusCode::Error
    }

    /// The handler name this span has as an entry span.
    pub fn handler_name(&self) -> &str {
        self.route.as_deref().unwrap_or(&self.name)
    }

    /// Duration in nanoseconds; a span that ends before it starts lasts 0.
    pub fn duration(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }
}

/// Why a span could not become a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The trace id is not 16 bytes or is all zeros, or the span id is not 8 bytes or is zero.
    Id,
}

/// A 16-byte trace id as a number; `None` for a missing or malformed one.
pub fn trace_id(bytes: &[u8]) -> Option<u128> {
    let id = u128::from_be_bytes(bytes.try_into().ok()?);
    (id != 0).then_some(id)
}

fn span_id(bytes: &[u8]) -> Option<u64> {
    let id = u64::from_be_bytes(bytes.try_into().ok()?);
    (id != 0).then_some(id)
}

/// The `service.name` of a resource, or OpenTelemetry's default for a service without one.
pub fn service_name(attributes: &[KeyValue]) -> &str {
    string_attribute(attributes, "service.name").unwrap_or("unknown_service")
}

fn string_attribute<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| match kv.value.as_ref() {
        Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) if !s.is_empty() => Some(s.as_str()),
        _ => None,
    })
}

/// Takes the record out of an OTLP span of `service`.
pub fn record(service: &Arc<str>, span: &Span) -> Result<(u128, SpanRecord), Invalid> {
    let trace = trace_id(&span.trace_id).ok_or(Invalid::Id)?;
    let id = span_id(&span.span_id).ok_or(Invalid::Id)?;
    let parent_id = if span.parent_span_id.is_empty() { 0 } else { span_id(&span.parent_span_id).unwrap_or(0) };
    let kind = Kind::from_otlp(span.kind);

    let mut route = None;
    let mut method = None;
    let mut peer_service = None;
    let mut server_address = None;
    let mut net_peer = None;
    for kv in &span.attributes {
        let slot = match kv.key.as_str() {
            "http.route" => &mut route,
            "http.request.method" | "http.method" => &mut method,
            "peer.service" => &mut peer_service,
            "server.address" => &mut server_address,
            "net.peer.name" => &mut net_peer,
            _ => continue,
        };
        if let Some(AnyValue { value: Some(any_value::Value::StringValue(s)) }) = kv.value.as_ref() {
            if !s.is_empty() && slot.is_none() {
                *slot = Some(s.as_str());
            }
        }
    }
    let route = route.map(|route| match method {
        Some(method) => format!("{method} {route}").into_boxed_str(),
        None => route.into(),
    });
    let peer = match kind {
        Kind::Client | Kind::Producer => peer_service.or(server_address).or(net_peer).map(Box::from),
        _ => None,
    };
    let status = StatusCode::from_otlp(span.status.as_ref().map_or(0, |s| s.code));
    Ok((
        trace,
        SpanRecord {
            span_id: id,
            parent_id,
            start: span.start_time_unix_nano,
            end: span.end_time_unix_nano,
            service: service.clone(),
            name: span.name.as_str().into(),
            route,
            peer,
            kind,
            status,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::Status;

    fn attr(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.into())) }),
            ..Default::default()
        }
    }

    fn span() -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: "GET".into(),
            kind: 2,
            start_time_unix_nano: 10,
            end_time_unix_nano: 30,
            ..Default::default()
        }
    }

    #[test]
    fn handler_name_is_the_route_with_its_method() {
        let service: Arc<str> = "feed".into();
        let mut s = span();
        s.attributes = vec![attr("http.request.method", "GET"), attr("http.route", "/api/feed/v4")];
        let (trace, record) = record(&service, &s).unwrap();
        assert_eq!(trace, u128::from_be_bytes([1; 16]));
        assert_eq!(record.handler_name(), "GET /api/feed/v4");
        assert_eq!(record.parent_id, 0);
        assert_eq!(record.duration(), 20);

        s.attributes = vec![attr("http.route", "/health")];
        assert_eq!(super::record(&service, &s).unwrap().1.handler_name(), "/health");
        s.attributes.clear();
        assert_eq!(super::record(&service, &s).unwrap().1.handler_name(), "GET");
    }

    #[test]
    fn client_spans_name_their_peer() {
        let service: Arc<str> = "feed".into();
        let mut s = span();
        s.kind = 3;
        s.attributes = vec![attr("server.address", "10.0.0.7"), attr("peer.service", "users")];
        assert_eq!(record(&service, &s).unwrap().1.peer.as_deref(), Some("users"));
        s.kind = 2;
        assert_eq!(record(&service, &s).unwrap().1.peer, None);
    }

    #[test]
    fn malformed_ids_are_refused() {
        let service: Arc<str> = "feed".into();
        let mut s = span();
        s.trace_id = vec![0; 16];
        assert_eq!(record(&service, &s).unwrap_err(), Invalid::Id);
        let mut s = span();
        s.span_id = vec![1; 4];
        assert_eq!(record(&service, &s).unwrap_err(), Invalid::Id);
    }

    #[test]
    fn status_and_kind_keep_their_otel_names() {
        let service: Arc<str> = "feed".into();
        let mut s = span();
        s.status = Some(Status { code: 2, message: "boom".into() });
        let (_, record) = record(&service, &s).unwrap();
        assert!(record.is_error());
        assert_eq!(record.status.otel_name(), "STATUS_CODE_ERROR");
        assert_eq!(record.kind.otel_name(), "SPAN_KIND_SERVER");
    }
}
