//! TLS end to end, with certificates made by each test: the OTLP receivers served over TLS
//! take clients that present a certificate of the configured CA (or, without a client CA,
//! any TLS client) and refuse every other client while carrying on; the Jaeger exporter
//! delivers over mutual TLS by gRPC and HTTP, checking the collector's name; and a
//! collector it cannot trust, or that will not take it without a certificate, is never sent
//! a span: the batch is retried, counted and dropped, the reason is logged, and the agent
//! keeps running.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use periscope_e2e::otlp::{self, trace_request};
use periscope_e2e::spans::{by_key, flatten};
use periscope_e2e::tls::Pki;
use periscope_e2e::{Agent, Collector, FlatSpan, Script, TestConfig};
use prost::Message as _;
use tonic::transport::{Channel, ClientTlsConfig};

const NODE: &str = "test-node";

// ---------------------------------------------------------------------------------------
// Expectations
// ---------------------------------------------------------------------------------------

/// The spans of `requests` as they must arrive: each resource gains the node's `host.name`;
/// resource attributes sorted for comparison.
fn as_delivered(requests: &[&ExportTraceServiceRequest]) -> Vec<FlatSpan> {
    requests
        .iter()
        .flat_map(|request| flatten(request))
        .map(|span| normalized(span.with_resource_attribute("host.name", NODE)))
        .collect()
}

fn normalized(mut span: FlatSpan) -> FlatSpan {
    span.resource.attributes = span.sorted_resource_attributes();
    span
}

/// Exactly `expected` arrived, each span once and unchanged.
fn assert_exactly(expected: &[FlatSpan], received: Vec<FlatSpan>) {
    let received = by_key(received.into_iter().map(normalized));
    let expected = by_key(expected.iter().cloned());
    for (key, span) in &expected {
        match received.get(key) {
            Some(arrived) => assert_eq!(arrived, span, "span {:?} arrived changed", span.span.name),
            None => panic!("span {:?} never arrived", span.span.name),
        }
    }
    let unexpected: Vec<_> =
        received.values().filter(|s| !expected.contains_key(&s.key())).map(|s| &s.span.name).collect();
    assert!(unexpected.is_empty(), "spans arrived that were never accepted: {unexpected:?}");
}

/// Waits until `expected` is at the stand-in and the exporter has nothing left, then checks
/// that exactly those spans arrived, each once, and were counted as sent.
async fn assert_delivered(agent: &Agent, collector: &Collector, expected: &[FlatSpan]) {
    collector.wait_for_spans(expected.len()).await;
    let metrics = agent.wait_until_exporter_idle().await;
    assert_exactly(expected, collector.accepted_spans());
    let jaeger = [("component", "jaeger"), ("signal", "traces")];
    assert_eq!(metrics.metric_value("periscope_sent_items_total", &jaeger), expected.len() as f64, "sent items");
    assert_eq!(metrics.metric_value("periscope_export_errors_total", &jaeger), 0.0, "{}", metrics.text());
}

async fn assert_received(agent: &Agent, component: &str, spans: usize) {
    let metrics = agent.metrics().await;
    assert_eq!(
        metrics.metric_value("periscope_received_items_total", &[("component", component), ("signal", "traces")]),
        spans as f64,
        "spans the {component} receiver took:\n{}",
        metrics.text()
    );
}

// ---------------------------------------------------------------------------------------
// Clients of the receivers
// ---------------------------------------------------------------------------------------

/// Where a TLS client reaches the agent's OTLP/gRPC receiver: by the name in its certificate.
fn grpc_tls_endpoint(config: &TestConfig) -> String {
    format!("https://localhost:{}", config.grpc_port)
}

/// The agent's OTLP/HTTP traces URL over TLS.
fn https_traces_url(config: &TestConfig) -> String {
    format!("https://localhost:{}/v1/traces", config.http_port)
}

/// Connects a gRPC trace client over TLS (its own connection) and exports `request`: the
/// error of whichever step failed, connecting or the call.
async fn export_over_grpc_tls(
    endpoint: &str,
    tls: ClientTlsConfig,
    request: ExportTraceServiceRequest,
) -> Result<ExportTraceServiceResponse, String> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .expect("a valid endpoint")
        .tls_config(tls)
        .map_err(|e| format!("TLS setup: {e:?}"))?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    TraceServiceClient::new(channel)
        .export(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| format!("export: {status:?}"))
}

/// An HTTP client (its own connections) with the given TLS setup.
fn https_client(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder().tls_backend_preconfigured(tls).build().expect("cannot build an HTTPS client")
}

/// `POST url` of `request` as protobuf: the status and body, or the client's error.
async fn post_traces(
    client: &reqwest::Client,
    url: &str,
    request: &ExportTraceServiceRequest,
) -> Result<(u16, Vec<u8>), String> {
    let response = client
        .post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(request.encode_to_vec())
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let body = response.bytes().await.map_err(|e| format!("{e:?}"))?;
    Ok((status, body.to_vec()))
}

/// A full success of the OTLP/HTTP receiver: 200 and a response rejecting nothing.
fn assert_accepted_over_http(answer: Result<(u16, Vec<u8>), String>, what: &str) {
    let (status, body) = answer.unwrap_or_else(|e| panic!("{what}: the request failed: {e}"));
    assert_eq!(status, 200, "{what}: {}", String::from_utf8_lossy(&body));
    let response = ExportTraceServiceResponse::decode(&body[..]).expect("an ExportTraceServiceResponse");
    assert_eq!(response.partial_success, None, "{what}");
}

// ---------------------------------------------------------------------------------------
// Receivers over TLS
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_receiver_with_client_ca_takes_certified_clients_and_refuses_the_rest() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().otlp_tls(pki.receiver_config(true)).jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let endpoint = grpc_tls_endpoint(&config);

    let first = trace_request("tls-client", 1, 3);
    export_over_grpc_tls(&endpoint, pki.tonic_client(Some(&pki.client)), first.clone())
        .await
        .unwrap_or_else(|e| panic!("a client with a certificate of the CA was refused: {e}"));
    collector.wait_for_spans(3).await;

    let refused = [
        ("a client without a certificate", pki.tonic_client(None), trace_request("anonymous", 2, 2)),
        (
            "a client with a certificate of another CA",
            pki.tonic_client(Some(&stranger.client)),
            trace_request("stranger", 3, 2),
        ),
    ];
    for (who, tls, request) in refused {
        let result = export_over_grpc_tls(&endpoint, tls, request).await;
        assert!(result.is_err(), "{who} was served: {result:?}");
    }
    let plain = match TraceServiceClient::connect(config.grpc_endpoint()).await {
        Ok(mut client) => client.export(trace_request("plaintext", 4, 2)).await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(plain.is_err(), "a client without TLS was served");

    // Still serving certified clients, on new connections.
    let second = trace_request("tls-client", 5, 4);
    export_over_grpc_tls(&endpoint, pki.tonic_client(Some(&pki.client)), second.clone())
        .await
        .unwrap_or_else(|e| panic!("the receiver refused a certified client after refusing others: {e}"));
    assert_eq!(agent.get("/healthz").await.0, 200);

    assert_delivered(&agent, &collector, &as_delivered(&[&first, &second])).await;
    assert_received(&agent, "otlp_grpc", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_receiver_with_client_ca_takes_certified_clients_and_refuses_the_rest() {
    let pki = Pki::new();
    let stranger = Pki::new();
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().otlp_tls(pki.receiver_config(true)).jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;
    let url = https_traces_url(&config);

    let first = trace_request("tls-client", 11, 3);
    let certified = https_client(pki.rustls_client(Some(&pki.client)));
    assert_accepted_over_http(post_traces(&certified, &url, &first).await, "a client with a certificate of the CA");
    collector.wait_for_spans(3).await;

    let refused = [
        ("a client without a certificate", https_client(pki.rustls_client(None)), url.clone()),
        (
            "a client with a certificate of another CA",
            https_client(pki.rustls_client(Some(&stranger.client))),
            url.clone(),
        ),
        (
            "a client without TLS",
            reqwest::Client::builder().build().expect("an HTTP client"),
            format!("http://127.0.0.1:{}/v1/traces", config.http_port),
        ),
    ];
    for (seed, (who, client, url)) in (12u8..).zip(refused) {
        let result = post_traces(&client, &url, &trace_request("refused", seed, 2)).await;
        assert!(result.is_err(), "{who} was served: {result:?}");
    }

    // Still serving certified clients, on new connections.
    let second = trace_request("tls-client", 15, 4);
    let again = https_client(pki.rustls_client(Some(&pki.client)));
    assert_accepted_over_http(post_traces(&again, &url, &second).await, "a certified client after the refusals");
    assert_eq!(agent.get("/healthz").await.0, 200);

    assert_delivered(&agent, &collector, &as_delivered(&[&first, &second])).await;
    assert_received(&agent, "otlp_http", 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_without_client_ca_serve_tls_clients_without_a_certificate() {
    let pki = Pki::new();
    let collector = Collector::grpc(Script::accept()).await;
    let config = TestConfig::new().otlp_tls(pki.receiver_config(false)).jaeger(collector.exporter_config(&[]));
    let agent = Agent::start(&config.yaml()).await;

    let over_grpc = trace_request("one-way-tls", 21, 2);
    export_over_grpc_tls(&grpc_tls_endpoint(&config), pki.tonic_client(None), over_grpc.clone())
        .await
        .unwrap_or_else(|e| panic!("the gRPC receiver refused a TLS client without a certificate: {e}"));
    let over_http = trace_request("one-way-tls", 22, 3);
    let client = https_client(pki.rustls_client(None));
    assert_accepted_over_http(post_traces(&client, &https_traces_url(&config), &over_http).await, "OTLP/HTTP");

    assert_delivered(&agent, &collector, &as_delivered(&[&over_grpc, &over_http])).await;
}

// ---------------------------------------------------------------------------------------
// The exporter over TLS
// ---------------------------------------------------------------------------------------

/// Spans sent to the agent in plain gRPC arrive once each at `collector`, which serves TLS
/// and requires the agent's client certificate, with no failed handshake on the way.
async fn exporter_delivers_over_mutual_tls(collector: Collector, tls: String, endpoint: Option<String>) {
    let mut overrides = vec![("tls", tls.as_str())];
    if let Some(endpoint) = &endpoint {
        overrides.push(("endpoint", endpoint.as_str()));
    }
    let config = TestConfig::new().jaeger(collector.exporter_config(&overrides));
    let agent = Agent::start(&config.yaml()).await;
    let mut client = otlp::trace_client(&config.grpc_endpoint()).await;
    let requests = [trace_request("mtls", 31, 5), trace_request("mtls", 32, 3)];
    for request in &requests {
        client.export(request.clone()).await.expect("the agent accepts spans");
    }

    assert_delivered(&agent, &collector, &as_delivered(&[&requests[0], &requests[1]])).await;
    assert!(collector.requests().iter().all(|r| r.accepted()));
    assert_eq!(collector.failed_handshakes(), Vec::<String>::new(), "failed TLS handshakes at the collector");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exporter_delivers_to_a_collector_requiring_mutual_tls() {
    let pki = Pki::new();
    let collector = Collector::grpc_tls(Script::accept(), &pki).await;
    exporter_delivers_over_mutual_tls(collector, pki.exporter_config(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exporter_delivers_to_a_collector_requiring_mutual_tls() {
    let pki = Pki::new();
    let collector = Collector::http_tls(Script::accept(), &pki).await;
    exporter_delivers_over_mutual_tls(collector, pki.exporter_config(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exporter_verifies_the_collector_against_server_name() {
    // The collector's certificate names neither the address dialled nor localhost.
    let pki = Pki::with_server_names(&["collector.tracing.internal"]);
    let collector = Collector::grpc_tls(Script::accept(), &pki).await;
    let endpoint = format!("https://127.0.0.1:{}", collector.address().port());
    let tls = pki.exporter_config_with_server_name("collector.tracing.internal");
    exporter_delivers_over_mutual_tls(collector, tls, Some(endpoint)).await;
}

/// Retries that give up within about a second.
const QUICK_RETRY: &str = "{ initial_interval: 50ms, max_interval: 100ms, max_elapsed_time: 1s }";

/// The agent, whose exporter has `tls` and quick retries, takes 3 spans that `collector`
/// never gets: every handshake fails for `handshake_failure`, the batch is retried and then
/// dropped and counted, the agent logs one of `logged` as the reason, and it keeps taking spans.
async fn collector_is_never_reached(collector: Collector, tls: String, handshake_failure: &str, logged: &[&str]) {
    let config = TestConfig::new().jaeger(collector.exporter_config(&[("tls", &tls), ("retry", QUICK_RETRY)]));
    let agent = Agent::start(&config.yaml()).await;
    let mut client = otlp::trace_client(&config.grpc_endpoint()).await;
    client.export(trace_request("unreached", 41, 3)).await.expect("the agent accepts spans");

    let exhausted = [("component", "jaeger"), ("signal", "traces"), ("reason", "retries_exhausted")];
    agent.wait_for_metric("periscope_dropped_items_total", &exhausted, |v| v >= 3.0).await;
    let metrics = agent.wait_until_exporter_idle().await;
    let jaeger = [("component", "jaeger"), ("signal", "traces")];
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &exhausted), 3.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_dropped_items_total", &jaeger), 3.0, "{}", metrics.text());
    assert_eq!(metrics.metric_value("periscope_sent_items_total", &jaeger), 0.0, "{}", metrics.text());
    // Retried before giving up: more than one failed attempt, none of them permanent.
    let errors = metrics.metric_value("periscope_export_errors_total", &[("component", "jaeger")]);
    assert!(errors >= 2.0, "export errors: {errors}\n{}", metrics.text());
    assert_eq!(
        metrics.metric_value("periscope_export_errors_total", &[("component", "jaeger"), ("kind", "permanent")]),
        0.0
    );

    assert!(collector.requests().is_empty(), "requests reached the collector over a refused connection");
    let failures = collector.wait_for_failed_handshakes(1).await;
    assert!(
        failures.iter().all(|reason| reason.contains(handshake_failure)),
        "every handshake should fail with {handshake_failure:?}: {failures:?}"
    );
    let stderr = agent.stderr();
    assert!(
        logged.iter().any(|reason| stderr.contains(reason)),
        "the agent should log why the export failed ({logged:?}):\n{stderr}"
    );

    // Still running and taking spans.
    assert_eq!(agent.get("/healthz").await.0, 200);
    client.export(trace_request("unreached", 42, 2)).await.expect("the agent still accepts spans");
    assert_received(&agent, "otlp_grpc", 5).await;
}

/// The collector's certificate is signed by a CA other than the configured one: the agent
/// refuses it as from an unknown issuer and sends it nothing.
async fn untrusted_collector_gets_nothing(collector: Collector, trusted: &Pki) {
    collector_is_never_reached(
        collector,
        trusted.exporter_config(),
        "UnknownCA",
        &["invalid peer certificate: UnknownIssuer"],
    )
    .await;
}

/// The collector requires a client certificate and the exporter has none: the collector
/// refuses the agent, and the agent says so.
async fn collector_refuses_an_exporter_without_a_certificate(collector: Collector, pki: &Pki) {
    collector_is_never_reached(
        collector,
        pki.exporter_config_without_certificate(),
        "peer sent no certificates",
        // In TLS 1.3 the server checks the client certificate after the client has finished
        // its side of the handshake, so the client sees either the server's alert or, when it
        // is already writing, the connection torn down under it.
        &["CertificateRequired", "broken pipe", "connection closed", "connection reset"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exporter_sends_nothing_to_a_collector_signed_by_another_ca() {
    let trusted = Pki::new();
    let other = Pki::new();
    untrusted_collector_gets_nothing(Collector::grpc_tls(Script::accept(), &other).await, &trusted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exporter_sends_nothing_to_a_collector_signed_by_another_ca() {
    let trusted = Pki::new();
    let other = Pki::new();
    untrusted_collector_gets_nothing(Collector::http_tls(Script::accept(), &other).await, &trusted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exporter_without_a_client_certificate_is_refused_and_says_why() {
    let pki = Pki::new();
    collector_refuses_an_exporter_without_a_certificate(Collector::grpc_tls(Script::accept(), &pki).await, &pki).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_exporter_without_a_client_certificate_is_refused_and_says_why() {
    let pki = Pki::new();
    collector_refuses_an_exporter_without_a_certificate(Collector::http_tls(Script::accept(), &pki).await, &pki).await;
}
