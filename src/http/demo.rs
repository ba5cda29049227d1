//! The bundled browser client, the demo webmail page, and in demo mode the
//! endpoint that hands the page a session for the demo user.

use super::error::ApiError;
use crate::app::App;
use crate::config::DEMO_USER;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::Arc;

const CLIENT_JS: &str = include_str!("../../web/pns-client.js");
const DEMO_PAGE: &str = include_str!("../../web/demo.html");
/// How long a demo session lasts, in seconds.
const DEMO_SESSION_SECS: i64 = 8 * 3600;

/// `GET /pns/client.js`
pub async fn client_js() -> Response {
    let mut r = CLIENT_JS.into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    r
}

/// `GET /`: the demo page.
pub async fn page() -> Html<&'static str> {
    Html(DEMO_PAGE)
}

/// `GET /pns/demo/session`: a session for the demo user; only in demo mode.
pub async fn session(State(app): State<Arc<App>>) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = match (app.config.demo, app.config.jwt_secret()) {
        (true, Some(secret)) => secret,
        _ => return Err(ApiError::NotFound),
    };
    let sid = crate::session::mint(
        secret.as_bytes(),
        DEMO_USER,
        DEMO_SESSION_SECS,
        app.config.audience.as_deref(),
    )?;
    Ok(Json(
        json!({"sid": sid, "user": DEMO_USER, "holdSecs": app.config.hold.as_secs()}),
    ))
}
