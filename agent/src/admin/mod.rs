//! The admin server: health, readiness, self-metrics, the pipelines' status, the
//! execution-path API, CPU profiles and the web UI at `/` (one page, [`ui.html`], that reads
//! these same endpoints). It reads shared state and owns no data.
//!
//! `/debug/pprof/*` is guarded: with `server.auth_token` set it needs
//! `Authorization: Bearer <token>` (401 otherwise); without a token it is served only on a
//! loopback listener (403 with instructions otherwise).

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

pub mod status;

use crate::paths::{Paths, Rendered, TreeFormat};
use crate::profiling::{self, Profiling};
use crate::telemetry::{Metrics, Readiness};

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    pub readiness: Readiness,
    /// `None` when `paths.enabled` is false.
    pub paths: Option<Paths>,
    /// `None` when profiling is not set up (tests of other routes).
    pub profiling: Option<Profiling>,
    /// Profiles kept from continuous capture.
    pub profiles: Option<std::sync::Arc<profiling::store::ProfileStore>>,
    pub access: Access,
    /// The node name the agent reports.
    pub node: String,
    pub started: std::time::Instant,
}

impl AdminState {
    /// The state of an agent with none of the optional parts (tests of single routes).
    pub fn new(metrics: Metrics, readiness: Readiness) -> AdminState {
        AdminState {
            metrics,
            readiness,
            paths: None,
            profiling: None,
            profiles: None,
            access: Access::default(),
            node: String::new(),
            started: std::time::Instant::now(),
        }
    }
}

/// Who may use the guarded endpoints.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// `server.auth_token`; empty means none.
    pub token: String,
    /// Whether `server.listen` is a loopback address.
    pub loopback: bool,
}

impl Access {
    fn check(&self, headers: &http::HeaderMap) -> Result<(), Box<Response>> {
        if self.token.is_empty() {
            if self.loopback {
                return Ok(());
            }
            return Err(Box::new(api_error(
                StatusCode::FORBIDDEN,
                "profiling is off on a non-loopback server.listen without a token: set server.auth_token \
                 (for example through ${PERISCOPE_TOKEN}) and send Authorization: Bearer <token>",
            )));
        }
        // The scheme is case-insensitive (RFC 9110); the token is not.
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        // Compare in constant time: the token is a secret.
        let matches = given.len() == self.token.len()
            && given.bytes().zip(self.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if matches {
            Ok(())
        } else {
            let mut response = api_error(StatusCode::UNAUTHORIZED, "send Authorization: Bearer <server.auth_token>");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            Err(Box::new(response))
        }
    }
}

/// The admin router, without a socket.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(ui))
        .route("/api/v1/status", get(status_json))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/paths", get(paths))
        .route("/api/v1/paths/tree", get(paths_tree))
        .route("/debug/pprof/profile", get(pprof_profile))
        .route("/api/v1/profiles", get(profiles_list))
        .route("/api/v1/profiles/{id}", get(profile_kept))
        .with_state(state)
}

async fn profiles_list(State(state): State<AdminState>) -> Response {
    match state.profiles {
        Some(store) => Json(store.list()).into_response(),
        None => Json(Vec::<profiling::store::ProfileMeta>::new()).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct FormatQuery {
    format: Option<String>,
}

async fn profile_kept(
    State(state): State<AdminState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    query: Result<Query<FormatQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let format = match query.ok().and_then(|Query(q)| q.format).as_deref().map(profiling::Format::parse) {
        None => profiling::Format::Pprof,
        Some(Some(f)) => f,
        Some(None) => return api_error(StatusCode::BAD_REQUEST, "format must be pprof, svg or folded"),
    };
    let Some(body) = state.profiles.as_ref().and_then(|s| s.read(&id)) else {
        return api_error(StatusCode::NOT_FOUND, format!("no kept profile {id:?}; GET /api/v1/profiles lists them"));
    };
    match tokio::task::spawn_blocking(move || profiling::render_kept(&body, format, &id)).await {
        Ok(Ok(rendered)) => ([(header::CONTENT_TYPE, rendered.format.content_type())], rendered.body).into_response(),
        Ok(Err(e)) => api_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}")),
    }
}

#[derive(Debug, Deserialize)]
struct ProfileQuery {
    seconds: Option<String>,
    frequency: Option<String>,
    format: Option<String>,
    target: Option<String>,
}

async fn pprof_profile(
    State(state): State<AdminState>,
    headers: http::HeaderMap,
    query: Result<Query<ProfileQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(refused) = state.access.check(&headers) {
        return *refused;
    }
    let Some(profiler) = state.profiling else {
        return api_error(StatusCode::NOT_FOUND, "profiling is not available");
    };
    let Ok(Query(query)) = query else {
        return api_error(StatusCode::BAD_REQUEST, "malformed query string; expected seconds=N&frequency=HZ&format=pprof|svg|folded&target=NAME");
    };
    let seconds = match query.seconds.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(s)) if (1..=profiling::MAX_SECONDS).contains(&s) => Some(s),
        Some(_) => return api_error(StatusCode::BAD_REQUEST, format!("seconds must be a whole number from 1 to {}", profiling::MAX_SECONDS)),
    };
    let frequency = match query.frequency.as_deref().map(str::parse::<u32>) {
        None => profiling::DEFAULT_FREQUENCY,
        Some(Ok(f)) if (1..=profiling::MAX_FREQUENCY).contains(&f) => f,
        Some(_) => return api_error(StatusCode::BAD_REQUEST, format!("frequency must be a whole number from 1 to {} (Hz)", profiling::MAX_FREQUENCY)),
    };
    let format = match query.format.as_deref().map(profiling::Format::parse) {
        None => profiling::Format::Pprof,
        Some(Some(f)) => f,
        Some(None) => return api_error(StatusCode::BAD_REQUEST, "format must be pprof, svg or folded"),
    };
    let result = match &query.target {
        Some(target) => profiler.capture_target(target, seconds, format).await,
        None => profiler.capture_self(seconds.unwrap_or(profiling::DEFAULT_SECONDS), frequency, format).await,
    };
    match result {
        Ok(rendered) => {
            let mut response = ([(header::CONTENT_TYPE, rendered.format.content_type())], rendered.body).into_response();
            if rendered.format == profiling::Format::Pprof {
                let name = query.target.as_deref().unwrap_or("periscope");
                if let Ok(value) = http::HeaderValue::from_str(&format!("attachment; filename=\"{name}.pb.gz\"")) {
                    response.headers_mut().insert(header::CONTENT_DISPOSITION, value);
                }
            }
            response
        }
        Err(e) => {
            let mut response = api_error(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.to_string());
            if let profiling::ProfileError::TooMany { retry_after, .. } = &e {
                response.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from(retry_after.as_secs().max(1)));
            }
            response
        }
    }
}

/// The web UI: one self-contained page (no external assets) that polls the JSON endpoints.
const UI: &str = include_str!("ui.html");

async fn ui() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], UI).into_response()
}

async fn status_json(State(state): State<AdminState>) -> Response {
    let uptime = state.started.elapsed().as_secs_f64();
    match status::status(&state.metrics, &state.readiness, &state.node, uptime) {
        Ok(status) => Json(status).into_response(),
        Err(message) => api_error(StatusCode::INTERNAL_SERVER_ERROR, message),
    }
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
        let state = AdminState::new(Metrics::new(), Readiness::default());
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
    async fn profiles_need_the_token_or_a_loopback_listener() {
        let state = |token: &str, loopback: bool| AdminState {
            access: Access { token: token.into(), loopback },
            ..AdminState::new(Metrics::new(), Readiness::default())
        };
        let (status, body) = get(&router(state("", false)), "/debug/pprof/profile?seconds=1").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("server.auth_token"), "{body}");
        assert_eq!(get(&router(state("s3cret", true)), "/debug/pprof/profile").await.0, StatusCode::UNAUTHORIZED);
        let request = Request::get("/debug/pprof/profile?seconds=0").header(header::AUTHORIZATION, "Bearer s3cret").body(Body::empty()).unwrap();
        let response = router(state("s3cret", false)).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "past the guard: no profiler in this state");
    }

    #[tokio::test]
    async fn metrics_are_exposed() {
        let state = AdminState::new(Metrics::new(), Readiness::default());
        let router = router(state);
        let (status, body) = get(&router, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("periscope_build_info{version=\""), "{body}");
    }
}
