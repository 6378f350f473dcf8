//! `sources.prometheus.kubernetes_pods`: scrape targets from the pods running on this node.
//!
//! The agent lists the pods bound to its node (`GET /api/v1/pods?fieldSelector=spec.nodeName=`)
//! with the in-cluster service account, as every client of the Kubernetes API inside a pod
//! does: the API server at `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the
//! token and the cluster's CA certificate under
//! `/var/run/secrets/kubernetes.io/serviceaccount` (`$PERISCOPE_KUBERNETES_SERVICEACCOUNT_DIR`
//! names another directory). The token is read again for every request, as projected tokens
//! are rotated. The service account needs `get` and `list` on `pods`.
//!
//! A running pod with an IP is a target when it carries the annotations Prometheus' example
//! `kubernetes-pods` job reads: `prometheus.io/scrape: "true"`, and optionally
//! `prometheus.io/port` (else the first TCP port its containers declare), `prometheus.io/path`
//! (`/metrics`) and `prometheus.io/scheme` (`http`). Its series get `job="kubernetes-pods"`,
//! `instance` = `IP:port`, and `namespace`, `pod` and `node` labels.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{ClientTlsConfig, StaticTarget};

pub const JOB: &str = "kubernetes-pods";
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The Kubernetes API as seen from inside the cluster.
pub struct Api {
    client: reqwest::Client,
    base: String,
    token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("not inside Kubernetes: {0}")]
    NotInCluster(String),
    #[error("cannot read {path}: {message}")]
    Credentials { path: String, message: String },
    #[error("GET {url}: {message}")]
    Request { url: String, message: String },
    #[error("GET {url}: HTTP {status}: {message}")]
    Status { url: String, status: u16, message: String },
    #[error("GET {url}: not a PodList: {message}")]
    Body { url: String, message: String },
}

impl Api {
    /// The API server and credentials of the pod the agent runs in.
    pub fn in_cluster() -> Result<Api, DiscoveryError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| DiscoveryError::NotInCluster(format!("${name} is not set (it is in every pod)")))
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port = var("KUBERNETES_SERVICE_PORT")?;
        let dir = PathBuf::from(std::env::var("PERISCOPE_KUBERNETES_SERVICEACCOUNT_DIR").unwrap_or_else(|_| SERVICE_ACCOUNT.to_owned()));
        let ca_path = dir.join("ca.crt");
        let credentials = |message: String| DiscoveryError::Credentials { path: ca_path.display().to_string(), message };
        if !ca_path.is_file() {
            return Err(credentials("no such file".into()));
        }
        let tls_config = ClientTlsConfig { ca_file: Some(ca_path.clone()), ..Default::default() };
        let tls = crate::exporters::tls::rustls_client_config(Some(&tls_config), super::KEY).map_err(|e| credentials(e.to_string()))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("periscope/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| credentials(format!("HTTP client setup failed: {e}")))?;
        let host = if host.contains(':') { format!("[{host}]") } else { host };
        Ok(Api { client, base: format!("https://{host}:{port}"), token_file: dir.join("token") })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The scrape targets among the pods on `node`.
    pub async fn targets(&self, node: &str) -> Result<Vec<StaticTarget>, DiscoveryError> {
        let mut query = reqwest::Url::parse(&format!("{}/api/v1/pods", self.base))
            .map_err(|e| DiscoveryError::NotInCluster(format!("{}: not a URL: {e}", self.base)))?;
        query.query_pairs_mut().append_pair("fieldSelector", &format!("spec.nodeName={node}"));
        let url = query.to_string();
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| DiscoveryError::Credentials {
            path: self.token_file.display().to_string(),
            message: e.to_string(),
        })?;
        let response = self
            .client
            .get(query)
            .bearer_auth(token.trim())
            .send()
            .await
            .map_err(|e| DiscoveryError::Request { url: url.clone(), message: crate::exporters::otlp::error_chain(&e) })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| DiscoveryError::Request { url: url.clone(), message: e.to_string() })?;
        if !status.is_success() {
            let message: String = String::from_utf8_lossy(&body).trim().chars().take(512).collect();
            return Err(DiscoveryError::Status { url, status: status.as_u16(), message });
        }
        let list: PodList = serde_json::from_slice(&body).map_err(|e| DiscoveryError::Body { url, message: e.to_string() })?;
        Ok(targets_of(&list, node))
    }
}

/// A `v1.PodList`, as far as discovery reads it.
#[derive(Debug, Deserialize)]
pub struct PodList {
    #[serde(default)]
    pub items: Vec<Pod>,
}

#[derive(Debug, Deserialize)]
pub struct Pod {
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PodSpec {
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Deserialize)]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default)]
    pub phase: String,
    #[serde(default, rename = "podIP")]
    pub pod_ip: String,
}

/// The targets the annotated, running pods make.
pub fn targets_of(list: &PodList, node: &str) -> Vec<StaticTarget> {
    let mut out = Vec::new();
    for pod in &list.items {
        let annotation = |key: &str| pod.metadata.annotations.get(&format!("prometheus.io/{key}")).map(|v| v.trim());
        if annotation("scrape") != Some("true") || pod.status.phase != "Running" || pod.status.pod_ip.is_empty() {
            continue;
        }
        let declared = pod
            .spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
            .map(|p| p.container_port);
        let Some(port) = annotation("port").and_then(|p| p.parse::<u16>().ok()).or(declared) else { continue };
        let scheme = match annotation("scheme") {
            Some("https") => "https",
            _ => "http",
        };
        let path = annotation("path").unwrap_or("/metrics");
        let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
        let ip = &pod.status.pod_ip;
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.clone() };
        let labels = [("namespace", pod.metadata.namespace.as_str()), ("pod", pod.metadata.name.as_str()), ("node", node)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        out.push(StaticTarget { job: JOB.to_owned(), url: format!("{scheme}://{host}:{port}{path}"), labels });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotated_running_pods_become_targets() {
        let list: PodList = serde_json::from_str(
            r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"7"},"items":[
              {"metadata":{"name":"api-1","namespace":"shop","annotations":{"prometheus.io/scrape":"true","prometheus.io/port":"9102","prometheus.io/path":"stats"}},
               "spec":{"containers":[{"name":"api","ports":[{"containerPort":8080,"protocol":"TCP"}]}]},
               "status":{"phase":"Running","podIP":"10.1.2.3"}},
              {"metadata":{"name":"web-1","namespace":"shop","annotations":{"prometheus.io/scrape":"true"}},
               "spec":{"containers":[{"name":"dns","ports":[{"containerPort":53,"protocol":"UDP"}]},{"name":"web","ports":[{"containerPort":8081}]}]},
               "status":{"phase":"Running","podIP":"fd00::5"}},
              {"metadata":{"name":"quiet","namespace":"shop"},"spec":{"containers":[]},"status":{"phase":"Running","podIP":"10.1.2.4"}},
              {"metadata":{"name":"starting","namespace":"shop","annotations":{"prometheus.io/scrape":"true","prometheus.io/port":"9"}},"status":{"phase":"Pending"}},
              {"metadata":{"name":"no-port","namespace":"shop","annotations":{"prometheus.io/scrape":"true"}},"status":{"phase":"Running","podIP":"10.1.2.6"}}
            ]}"#,
        )
        .unwrap();
        let targets = targets_of(&list, "node-a");
        let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
        assert_eq!(urls, ["http://10.1.2.3:9102/stats", "http://[fd00::5]:8081/metrics"]);
        assert_eq!(targets[0].job, JOB);
        assert_eq!(targets[0].labels["pod"], "api-1");
        assert_eq!(targets[0].labels["namespace"], "shop");
        assert_eq!(targets[0].labels["node"], "node-a");
    }
}
