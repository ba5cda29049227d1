//! The HTTP surfaces: the public listener (browsers) and the internal listener
//! (delivery agents, operators). Handlers are thin: they parse, call into the
//! service modules, and shape the answer.
//!
//! - [`poll`]: `GET /pns/poll`
//! - [`notify`]: `POST /internal/v1/notify`
//! - [`dovecot`]: `PUT /preliminary/http-notify/v1/notify`, Dovecot's push_notification driver
//! - [`admin`]: session revocation, listing, opaque sessions, stats
//! - [`limits`]: URL, body size and body timeout limits in front of them
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`
//! - [`demo`]: the demo page, the bundled client and the demo session
//! - [`error`]: the one error type, mapped to status and `errorCode`

pub mod admin;
pub mod body;
pub mod demo;
pub mod dovecot;
pub mod error;
pub mod health;
pub mod limits;
pub mod notify;
pub mod poll;

pub use notify::DirectNotify;
pub use poll::DirectPoll;

use crate::app::App;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use error::ApiError;
use std::sync::Arc;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

/// The path of the long poll.
pub const POLL_PATH: &str = "/pns/poll";

/// Internal request bodies larger than this are refused with 413 by default
/// (`PNS_MAX_BODY_BYTES`).
pub const MAX_BODY_BYTES: usize = crate::config::DEFAULT_MAX_BODY_BYTES;

/// The router of the public listener.
pub fn public_router(app: Arc<App>) -> Router {
    let router = Router::new()
        .route(POLL_PATH, get(poll::poll))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/pns/client.js", get(demo::client_js))
        .route("/", get(demo::page))
        .route("/pns/demo/session", get(demo::session))
        // On known routes only: elsewhere the answer is 404 whatever the size.
        .route_layer(limits::PublicChecks {
            max_url_bytes: app.config.limits.max_url_bytes,
        })
        .fallback(not_found)
        .with_state(app.clone());
    public_layers(router, &app.config.allowed_origins)
}

/// What every answer of the public listener goes through: `no-store`, and
/// CORS for the webmail's origins.
fn public_layers(router: Router, allowed_origins: &[String]) -> Router {
    let mut router = router.layer(no_store());
    if !allowed_origins.is_empty() {
        let origins: Vec<HeaderValue> = allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET])
                .allow_headers([header::AUTHORIZATION])
                .allow_credentials(true)
                .expose_headers([header::RETRY_AFTER]),
        );
    }
    router
}

/// The headers of a poll's `200` answer for each request `Origin`, as
/// [`public_layers`] make them, for the answers written where their news is
/// committed ([`crate::server::AnswerSlot`]): made once, at start, by those
/// layers themselves, so that such an answer is the routed one byte for byte.
pub struct PollHeads {
    /// Without an `Origin`, with an origin not allowed, then for each
    /// allowed origin.
    heads: Vec<HeaderMap>,
    allowed: Vec<HeaderValue>,
}

/// Which of [`PollHeads`] a poll's answer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadId(usize);

impl PollHeads {
    pub async fn new(allowed_origins: &[String]) -> PollHeads {
        let allowed: Vec<HeaderValue> = allowed_origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        // No allowed origin is ever a single space (a URL is no such thing).
        let not_allowed = HeaderValue::from_static(" ");
        let mut heads = vec![routed_head(allowed_origins, None).await];
        for origin in std::iter::once(&not_allowed).chain(&allowed) {
            heads.push(routed_head(allowed_origins, Some(origin.clone())).await);
        }
        PollHeads { heads, allowed }
    }

    /// The head for a request with `origin`.
    pub fn id(&self, origin: Option<&HeaderValue>) -> HeadId {
        match origin {
            None => HeadId(0),
            Some(origin) => HeadId(
                self.allowed
                    .iter()
                    .position(|o| o == origin)
                    .map_or(1, |i| i + 2),
            ),
        }
    }

    pub fn get(&self, id: HeadId) -> &HeaderMap {
        &self.heads[id.0]
    }
}

/// The headers [`public_layers`] give a poll's `200` answer, but its length.
async fn routed_head(allowed_origins: &[String], origin: Option<HeaderValue>) -> HeaderMap {
    let answer = || async { axum::Json(()) };
    let router = public_layers(Router::new().route(POLL_PATH, get(answer)), allowed_origins);
    let mut headers = poll_through(router, origin, ())
        .await
        .into_parts()
        .0
        .headers;
    headers.remove(header::CONTENT_LENGTH);
    headers
}

/// What `layered`, the public layers around a handler of the poll's path,
/// answers a poll from `origin` that carries `extension`.
async fn poll_through<E: Clone + Send + Sync + 'static>(
    layered: Router,
    origin: Option<HeaderValue>,
    extension: E,
) -> axum::response::Response {
    use tower::ServiceExt;
    let mut request = axum::http::Request::new(axum::body::Body::empty());
    *request.uri_mut() = axum::http::Uri::from_static(POLL_PATH);
    if let Some(origin) = origin {
        request.headers_mut().insert(header::ORIGIN, origin);
    }
    request.extensions_mut().insert(extension);
    let Ok(response) = layered.oneshot(request).await;
    response
}

/// The router of the internal listener.
pub fn internal_router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route(notify::PATH, post(notify::notify))
        .route("/internal/v1/sessions/revoke", post(admin::revoke))
        .route(
            "/internal/v1/sessions",
            get(admin::list_sessions)
                .post(admin::register_session)
                .delete(admin::delete_session),
        )
        .route(
            "/internal/v1/sessions/{jti}",
            delete(admin::delete_session_by_id),
        )
        .route("/internal/v1/stats", get(admin::stats))
        .route("/internal/v1/backup", get(admin::backup))
        .route_layer(limits::InternalChecks {
            app: app.clone(),
            refuse: notify::Endpoint::Api.refuse(),
        });
    let dovecot = Router::new()
        .route(dovecot::PATH, put(dovecot::notify).post(dovecot::notify))
        .route_layer(limits::InternalChecks {
            app: app.clone(),
            refuse: notify::Endpoint::Dovecot.refuse(),
        });
    let max_body = app.config.limits.max_body_bytes;
    Router::new()
        .merge(api)
        .merge(dovecot)
        .route("/metrics", get(health::metrics))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
        .layer(no_store())
}

/// `Cache-Control` of every answer of both listeners.
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

fn no_store() -> SetResponseHeaderLayer<HeaderValue> {
    SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, NO_STORE)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// Lets a request through only with `Authorization: Bearer <one of the
/// internal tokens>`: the 401 otherwise.
fn refuse_internal(app: &App, headers: &HeaderMap) -> Option<Response> {
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        let why = "the internal API needs Authorization: Bearer <token>";
        return Some(ApiError::Unauthorized(why).into_response());
    };
    let known = app
        .config
        .internal_tokens
        .iter()
        .any(|t| constant_time_eq(t.as_bytes(), presented.as_bytes()));
    let why = "the internal API token is not valid";
    (!known).then(|| ApiError::Unauthorized(why).into_response())
}

/// Compares without an early exit, so timing does not reveal a prefix.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}
