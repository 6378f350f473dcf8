//! `exporters.prometheus`: a pull endpoint, `GET /metrics` on its own listener, where
//! Prometheus scrapes the metrics Periscope derives and collects (text format 0.0.4): the
//! metrics pipeline's series (kept in [`store::Store`]) and the derived span metrics, service
//! graph and execution-path metrics.
//!
//! Every holder of such metrics is a [`Collect`]; each scrape asks each of them in turn.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

use crate::telemetry::exposition::{Collect, Exposition};

pub mod convert;
pub mod naming;
pub mod store;

pub const KEY: &str = "exporters.prometheus";
/// Data points waiting to be added to the store.
pub const QUEUE_POINTS: usize = 256 * 1024;
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Default)]
pub struct Collectors(Arc<Vec<Arc<dyn Collect>>>);

impl Collectors {
    pub fn new(collectors: Vec<Arc<dyn Collect>>) -> Self {
        Collectors(Arc::new(collectors))
    }

    /// The exposition of everything, as one scrape sees it.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = if openmetrics { Exposition::openmetrics() } else { Exposition::new() };
        for collector in self.0.iter() {
            collector.collect(&mut out);
        }
        out.into_text()
    }
}

/// The exporter's router, without a socket.
pub fn router(collectors: Collectors) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(collectors)
}

/// OpenMetrics when the scraper accepts it (as Prometheus does by default), else text 0.0.4.
fn wants_openmetrics(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|part| {
            let mut params = part.split(';').map(str::trim);
            let media = params.next().unwrap_or("");
            let refused = params.any(|p| p.replace(' ', "") == "q=0");
            media == "application/openmetrics-text" && !refused
        })
}

async fn metrics(State(collectors): State<Collectors>, headers: http::HeaderMap) -> impl IntoResponse {
    let openmetrics = wants_openmetrics(&headers);
    let text = tokio::task::spawn_blocking(move || collectors.render(openmetrics)).await.unwrap_or_default();
    let content_type = if openmetrics { OPENMETRICS_CONTENT_TYPE } else { CONTENT_TYPE };
    ([(header::CONTENT_TYPE, content_type)], text)
}

/// Serves `/metrics` until `stop` completes.
pub async fn serve(listener: TcpListener, collectors: Collectors, stop: impl Future<Output = ()> + Send + 'static) -> Result<(), String> {
    axum::serve(listener, router(collectors)).with_graceful_shutdown(stop).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::exposition::Type;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    struct Fixed;

    impl Collect for Fixed {
        fn collect(&self, out: &mut Exposition) {
            out.family("demo_total", "A demo counter.", Type::Counter);
            out.sample("demo_total", &[("a", "b")], 3.0);
        }
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_text_format() {
        let router = router(Collectors::new(vec![Arc::new(Fixed)]));
        let response = router.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&body),
            "# HELP demo_total A demo counter.\n# TYPE demo_total counter\ndemo_total{a=\"b\"} 3\n"
        );
    }

    #[tokio::test]
    async fn openmetrics_is_served_to_scrapers_that_accept_it() {
        let router = router(Collectors::new(vec![Arc::new(Fixed)]));
        let accept = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let request = Request::get("/metrics").header(header::ACCEPT, accept).body(Body::empty()).unwrap();
        let response = router.oneshot(request).await.unwrap();
        assert_eq!(response.headers()[header::CONTENT_TYPE], OPENMETRICS_CONTENT_TYPE);
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&body),
            "# HELP demo A demo counter.\n# TYPE demo counter\ndemo_total{a=\"b\"} 3\n# EOF\n"
        );
    }
}
