//! A stand-in for the Kubernetes API server, as far as pod discovery uses it.
//!
//! No Kubernetes cluster runs here, so this serves `GET /api/v1/pods` the way the API server
//! does for a pod's service account: over TLS with a certificate from the cluster's CA, only
//! for the bearer token it issued (401 otherwise, with a `v1.Status` body), honouring the
//! `spec.nodeName=` field selector (400 for a selector it does not support), and answering
//! with a `v1.PodList` (`kind`, `apiVersion`, `metadata.resourceVersion`, `items`) of the pods
//! the test put in. It also writes the service-account directory a pod would have (`token`,
//! `ca.crt`) and gives the environment that points the agent at both.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::tls::{Pki, ALPN_HTTP1};

const TOKEN: &str = "stand-in-service-account-token";

#[derive(Default)]
struct Shared {
    /// (node, pod object)
    pods: Vec<(String, Value)>,
    requests: usize,
    unauthorized: usize,
    resource_version: u64,
}

pub struct KubernetesApi {
    _pki: Pki,
    service_account: TempDir,
    addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    task: tokio::task::JoinHandle<()>,
}

/// A pod as the API server returns it: running, with an IP, and annotations.
pub fn pod(namespace: &str, name: &str, ip: &str, annotations: &[(&str, &str)], container_ports: &[u16]) -> Value {
    let annotations: serde_json::Map<String, Value> =
        annotations.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect();
    let ports: Vec<Value> = container_ports.iter().map(|p| json!({ "containerPort": p, "protocol": "TCP" })).collect();
    json!({
        "metadata": { "name": name, "namespace": namespace, "uid": format!("uid-{namespace}-{name}"), "annotations": annotations },
        "spec": { "containers": [ { "name": "main", "image": "example/app:1", "ports": ports } ] },
        "status": { "phase": "Running", "podIP": ip, "podIPs": [ { "ip": ip } ] }
    })
}

fn json_response(code: StatusCode, body: Value) -> Response {
    (code, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16() });
    json_response(code, body)
}

async fn list_pods(
    State(shared): State<Arc<Mutex<Shared>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let query: Vec<(String, String)> = reqwest::Url::parse(&format!("https://api/?{}", query.unwrap_or_default()))
        .map(|url| url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        .unwrap_or_default();
    let mut shared = shared.lock().unwrap();
    shared.requests += 1;
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(TOKEN) {
        shared.unauthorized += 1;
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let selector = query.iter().find(|(k, _)| k == "fieldSelector").map(|(_, v)| v.as_str()).unwrap_or("");
    let node = if selector.is_empty() {
        None
    } else {
        match selector.strip_prefix("spec.nodeName=") {
            Some(node) if !node.contains(',') => Some(node.to_owned()),
            _ => {
                let message = format!("\"{selector}\" is not a known field selector: only \"spec.nodeName\" in this stand-in");
                return status(StatusCode::BAD_REQUEST, "BadRequest", &message);
            }
        }
    };
    let items: Vec<Value> =
        shared.pods.iter().filter(|(n, _)| node.as_deref().is_none_or(|node| node == n)).map(|(_, p)| p.clone()).collect();
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": shared.resource_version.to_string() },
        "items": items
    });
    json_response(StatusCode::OK, list)
}

/// TLS connections as a listener for `axum::serve`; a failed handshake is dropped.
struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, peer)) = self.listener.accept().await else { continue };
            if let Ok(Ok(tls)) = tokio::time::timeout(std::time::Duration::from_secs(5), self.acceptor.accept(stream)).await {
                return (tls, peer);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl KubernetesApi {
    pub async fn start() -> KubernetesApi {
        crate::tls::install_crypto_provider();
        let pki = Pki::new();
        let service_account = tempfile::Builder::new().prefix("periscope-e2e-serviceaccount-").tempdir().unwrap();
        std::fs::write(service_account.path().join("token"), format!("{TOKEN}\n")).unwrap();
        std::fs::write(service_account.path().join("ca.crt"), &pki.ca_pem).unwrap();
        std::fs::write(service_account.path().join("namespace"), "observability").unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(pki.rustls_server_without_client_auth(ALPN_HTTP1)));
        let shared = Arc::new(Mutex::new(Shared::default()));
        let app = axum::Router::new().route("/api/v1/pods", get(list_pods)).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(TlsListener { listener, acceptor }, app).await;
        });
        KubernetesApi { _pki: pki, service_account, addr, shared, task }
    }

    /// What a pod's environment tells the agent: where the API server is, and where its
    /// service account's files are.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("KUBERNETES_SERVICE_HOST", self.addr.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT", self.addr.port().to_string()),
            ("PERISCOPE_KUBERNETES_SERVICEACCOUNT_DIR", self.service_account_dir().display().to_string()),
        ]
    }

    pub fn service_account_dir(&self) -> PathBuf {
        self.service_account.path().to_owned()
    }

    /// Puts the pods on `node`, in place of all the pods there were.
    pub fn set_pods(&self, pods: Vec<(&str, Value)>) {
        let mut shared = self.shared.lock().unwrap();
        shared.pods = pods.into_iter().map(|(node, pod)| (node.to_owned(), pod)).collect();
        shared.resource_version += 1;
    }

    /// Requests served, and how many of them had no valid token.
    pub fn requests(&self) -> (usize, usize) {
        let shared = self.shared.lock().unwrap();
        (shared.requests, shared.unauthorized)
    }
}

impl Drop for KubernetesApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}
