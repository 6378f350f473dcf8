//! The admin server: health, readiness, self-metrics and the execution-path API. It reads
//! shared state and owns no data; later the profiling and UI routes join it here.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::paths::{Paths, Rendered, TreeFormat};
use crate::telemetry::{Metrics, Readiness};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    pub readiness: Readiness,
    /// `None` when `paths.enabled` is false.
    pub paths: Option<Paths>,
}

/// The admin router, without a socket.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/paths", get(paths))
        .route("/api/v1/paths/tree", get(paths_tree))
        .with_state(state)
}

/// An API error: the status and a JSON body `{"error": "..."}`.
fn api_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn paths_off() -> Response {
    api_error(StatusCode::NOT_FOUND, "execution paths are off: set paths.enabled: true to analyse spans")
}

async fn paths(State(state): State<AdminState>) -> Response {
    match state.paths {
        Some(paths) => Json(paths.handlers()).into_response(),
        None => paths_off(),
    }
}

#[derive(Debug, Deserialize)]
struct TreeQuery {
    service: Option<String>,
    handler: Option<String>,
    format: Option<String>,
}

async fn paths_tree(State(state): State<AdminState>, query: Result<Query<TreeQuery>, axum::extract::rejection::QueryRejection>) -> Response {
    let Some(paths) = state.paths else { return paths_off() };
    let Ok(Query(query)) = query else {
        return api_error(StatusCode::BAD_REQUEST, "malformed query string; expected service=S&handler=H&format=json|folded|svg");
    };
    let (Some(service), Some(handler)) = (query.service, query.handler) else {
        return api_error(StatusCode::BAD_REQUEST, "service and handler are required: /api/v1/paths/tree?service=S&handler=H (GET /api/v1/paths lists them)");
    };
    let format = query.format.as_deref().unwrap_or("json");
    let Some(format) = TreeFormat::parse(format) else {
        return api_error(StatusCode::BAD_REQUEST, format!("unknown format {format:?}: use json, folded or svg"));
    };
    // Rendering a flame graph takes a moment; keep it off the async workers.
    let rendered = tokio::task::spawn_blocking(move || paths.tree(&service, &handler, format).ok_or((service, handler))).await;
    match rendered {
        Ok(Ok(Ok(Rendered::Json(tree)))) => Json(tree).into_response(),
        Ok(Ok(Ok(Rendered::Text(text)))) => {
            let content_type = match format {
                TreeFormat::Svg => "image/svg+xml",
                _ => "text/plain; charset=utf-8",
            };
            ([(header::CONTENT_TYPE, content_type)], text).into_response()
        }
        Ok(Ok(Err(message))) => api_error(StatusCode::INTERNAL_SERVER_ERROR, message),
        Ok(Err((service, handler))) => api_error(
            StatusCode::NOT_FOUND,
            format!("no handler {handler:?} of service {service:?} has been seen; GET /api/v1/paths lists the handlers"),
        ),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}")),
    }
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match state.readiness.check() {
        Ok(n) => (StatusCode::OK, format!("ready: {n} components started\n")).into_response(),
        Err(problems) => {
            let mut body = String::from("not ready:\n");
            for problem in problems {
                body.push_str("  ");
                body.push_str(&problem);
                body.push('\n');
            }
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = String::with_capacity(8 * 1024);
    match prometheus_client::encoding::text::encode(&mut text, state.metrics.registry()) {
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let response = router.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn readyz_lists_components_until_all_have_started() {
        let state = AdminState { metrics: Metrics::new(), readiness: Readiness::default(), paths: None };
        let grpc = state.readiness.register("sources.otlp.grpc");
        let router = router(state);
        assert_eq!(get(&router, "/healthz").await.0, StatusCode::OK);
        let (status, body) = get(&router, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("sources.otlp.grpc: starting"), "{body}");
        grpc.ready();
        assert_eq!(get(&router, "/readyz").await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn metrics_are_exposed() {
        let state = AdminState { metrics: Metrics::new(), readiness: Readiness::default(), paths: None };
        let router = router(state);
        let (status, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("periscope_build_info{version=\""), "{body}");
    }
}
