//! `checkout`: an example service instrumented the way Periscope collects from it, with
//! nothing in it specific to Periscope — the OpenTelemetry SDK, a Prometheus client library,
//! pprof-rs and JSON logs on standard output, as any service on a node would have them.
//!
//! ```text
//! checkout [--listen ADDR] [--otlp URL]
//! ```
//! - **Traces and metrics**: the OpenTelemetry SDK exports over OTLP/HTTP to `--otlp`
//!   (default `$OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://127.0.0.1:4318`, the agent's
//!   receiver). `POST /api/checkout` runs `auth`, then `checkout_handler` with `SELECT carts`,
//!   `payments.charge` (a call to another service) and `INSERT orders`; `GET /api/cart/{id}`
//!   runs `auth` and `SELECT carts`. Every request also records `http.server.request.duration`.
//! - **Prometheus metrics** at `GET /metrics` (prometheus-client, OpenMetrics):
//!   `checkout_orders_total{payment}` and `checkout_cart_items` (a histogram).
//! - **CPU profiles** at `GET /debug/pprof/profile?seconds=N` (pprof-rs, gzipped
//!   profile.proto; one capture at a time, 409 otherwise).
//! - **Logs**: one JSON line per request on standard output, with `trace_id` and `span_id`.
//!
//! It prints `listening on ADDR` once it serves and stops on SIGTERM or SIGINT, flushing its
//! telemetry first.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use opentelemetry::metrics::{Histogram as OtelHistogram, MeterProvider as _};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PaymentLabels {
    payment: String,
}

struct Service {
    tracer: SdkTracer,
    durations: OtelHistogram<f64>,
    registry: Registry,
    orders: Family<PaymentLabels, Counter>,
    cart_items: Histogram,
    profiling: Mutex<()>,
    rng: Mutex<fastrand::Rng>,
}

fn usage() -> ! {
    eprintln!("usage: checkout [--listen ADDR] [--otlp URL]");
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let mut listen: SocketAddr = ([127, 0, 0, 1], 8080).into();
    let mut otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:4318".into());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--listen" => listen = value.parse().unwrap_or_else(|_| usage()),
            "--otlp" => otlp = value,
            _ => usage(),
        }
    }
    let otlp = otlp.trim_end_matches('/').to_owned();
    // The SDK's HTTP client is built with rustls and needs a crypto provider chosen (even to
    // send plain HTTP, as here).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resource = Resource::builder().with_service_name("checkout").with_attribute(KeyValue::new("service.namespace", "shop")).build();
    let span_exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{otlp}/v1/traces"))
        .build()
        .unwrap_or_else(|e| panic!("the OTLP span exporter: {e}"));
    let tracer_provider = SdkTracerProvider::builder().with_resource(resource.clone()).with_batch_exporter(span_exporter).build();
    let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{otlp}/v1/metrics"))
        .build()
        .unwrap_or_else(|e| panic!("the OTLP metric exporter: {e}"));
    let reader = PeriodicReader::builder(metric_exporter).with_interval(Duration::from_secs(5)).build();
    let meter_provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
    let durations = meter_provider
        .meter("checkout")
        .f64_histogram("http.server.request.duration")
        .with_unit("s")
        .with_description("Duration of HTTP server requests.")
        .with_boundaries(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0])
        .build();

    let mut registry = Registry::default();
    let orders = Family::<PaymentLabels, Counter>::default();
    registry.register("checkout_orders", "Orders placed, by payment method", orders.clone());
    let cart_items = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0]);
    registry.register("checkout_cart_items", "Items in the carts checked out", cart_items.clone());

    let service = Arc::new(Service {
        tracer: opentelemetry::trace::TracerProvider::tracer(&tracer_provider, "checkout"),
        durations,
        registry,
        orders,
        cart_items,
        profiling: Mutex::new(()),
        rng: Mutex::new(fastrand::Rng::new()),
    });
    let app = Router::new()
        .route("/api/checkout", post(checkout))
        .route("/api/cart/{id}", get(cart))
        .route("/metrics", get(metrics))
        .route("/debug/pprof/profile", get(profile))
        .with_state(service);
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap_or_else(|e| panic!("cannot listen on {listen}: {e}"));
    let addr = listener.local_addr().unwrap_or(listen);
    println!("listening on {addr}");
    let _ = std::io::stdout().flush();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
    if let Err(e) = serve.await {
        eprintln!("checkout: {e}");
    }
    // Whatever is still batched goes out before the process ends.
    let _ = tokio::task::spawn_blocking(move || {
        let _ = tracer_provider.shutdown();
        let _ = meter_provider.shutdown();
    })
    .await;
}

impl Service {
    /// Waits about `median_ms` inside a child span `name` of `cx`.
    async fn step(&self, cx: &Context, name: &str, kind: SpanKind, median_ms: f64, attributes: Vec<KeyValue>) -> Context {
        let span = self.tracer.span_builder(name.to_owned()).with_kind(kind).with_attributes(attributes).start_with_context(&self.tracer, cx);
        let wait = {
            let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
            median_ms * (0.5 + rng.f64())
        };
        tokio::time::sleep(Duration::from_secs_f64(wait / 1000.0)).await;
        cx.with_span(span)
    }

    fn server_span(&self, method: &str, route: &str, path: &str) -> Context {
        let span = self
            .tracer
            .span_builder(format!("{method} {route}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("url.path", path.to_owned()),
            ])
            .start(&self.tracer);
        Context::current_with_span(span)
    }

    /// Ends the request's server span and records its duration and log line.
    fn finish(&self, cx: Context, method: &str, route: &str, status: StatusCode, started: Instant) {
        let span = cx.span();
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status.as_u16())));
        if status.is_server_error() {
            span.set_status(Status::error(status.to_string()));
        }
        let ids = span.span_context().clone();
        span.end();
        let seconds = started.elapsed().as_secs_f64();
        self.durations.record(
            seconds,
            &[
                KeyValue::new("http.request.method", method.to_owned()),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ],
        );
        let line = serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "level": if status.is_server_error() { "error" } else { "info" },
            "msg": format!("{method} {route} {} in {:.1} ms", status.as_u16(), seconds * 1000.0),
            "trace_id": ids.trace_id().to_string(),
            "span_id": ids.span_id().to_string(),
        });
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Ends a child span, with an error status when `error` says so.
fn end(cx: Context, error: Option<&str>) {
    let span = cx.span();
    if let Some(message) = error {
        span.set_status(Status::error(message.to_owned()));
    }
    span.end();
}

#[derive(Deserialize)]
struct Order {
    #[serde(default = "card")]
    payment: String,
    #[serde(default = "one")]
    items: u32,
}

fn card() -> String {
    "card".into()
}

fn one() -> u32 {
    1
}

async fn checkout(State(service): State<Arc<Service>>, body: axum::body::Bytes) -> Response {
    let started = Instant::now();
    let cx = service.server_span("POST", "/api/checkout", "/api/checkout");
    let order: Order = serde_json::from_slice(&body).unwrap_or(Order { payment: card(), items: one() });
    end(service.step(&cx, "auth", SpanKind::Internal, 0.5, vec![]).await, None);
    let handler = service.tracer.span_builder("checkout_handler").with_kind(SpanKind::Internal).start_with_context(&service.tracer, &cx);
    let handler = cx.with_span(handler);
    let db = |statement: &str| vec![KeyValue::new("db.system", "postgresql"), KeyValue::new("db.query.text", statement.to_owned()), KeyValue::new("server.address", "postgres")];
    end(service.step(&handler, "SELECT carts", SpanKind::Client, 2.0, db("SELECT * FROM carts WHERE id = $1")).await, None);
    let declined = order.payment == "declined";
    let charge = vec![KeyValue::new("peer.service", "payments"), KeyValue::new("server.address", "payments"), KeyValue::new("http.request.method", "POST")];
    end(service.step(&handler, "payments.charge", SpanKind::Client, 4.0, charge).await, declined.then_some("card declined"));
    let status = if declined {
        StatusCode::PAYMENT_REQUIRED
    } else {
        end(service.step(&handler, "INSERT orders", SpanKind::Client, 1.5, db("INSERT INTO orders (cart_id) VALUES ($1)")).await, None);
        service.orders.get_or_create(&PaymentLabels { payment: order.payment.clone() }).inc();
        service.cart_items.observe(f64::from(order.items));
        StatusCode::CREATED
    };
    end(handler, None);
    service.finish(cx, "POST", "/api/checkout", status, started);
    status.into_response()
}

async fn cart(State(service): State<Arc<Service>>, Path(id): Path<u64>) -> Response {
    let started = Instant::now();
    let cx = service.server_span("GET", "/api/cart/{id}", &format!("/api/cart/{id}"));
    end(service.step(&cx, "auth", SpanKind::Internal, 0.5, vec![]).await, None);
    let db = vec![KeyValue::new("db.system", "postgresql"), KeyValue::new("server.address", "postgres")];
    end(service.step(&cx, "SELECT carts", SpanKind::Client, 1.5, db).await, None);
    service.finish(cx, "GET", "/api/cart/{id}", StatusCode::OK, started);
    (StatusCode::OK, format!("{{\"id\":{id},\"items\":[]}}")).into_response()
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &service.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response()
}

#[derive(Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

async fn profile(State(service): State<Arc<Service>>, Query(query): Query<ProfileQuery>) -> Response {
    let seconds = query.seconds.unwrap_or(10).clamp(1, 60);
    let profiled = tokio::task::spawn_blocking(move || {
        let Ok(_one_at_a_time) = service.profiling.try_lock() else { return Err((StatusCode::CONFLICT, "a profile is already being captured".to_owned())) };
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(100)
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        std::thread::sleep(Duration::from_secs(seconds));
        let report = guard.report().build().map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let profile = report.pprof().map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        use pprof::protos::Message as _;
        encoder.write_all(&profile.encode_to_vec()).map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        encoder.finish().map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
    })
    .await;
    match profiled {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response(),
        Ok(Err((status, message))) => (status, message).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
