//! Request limits that sit in front of the handlers.
//!
//! Public listener: browsers send small GETs, so a request target longer than
//! `PNS_MAX_URL_BYTES` is refused with 414 and any request body with 413.
//! Internal listener: a body must arrive whole within `PNS_BODY_TIMEOUT_SECS`
//! (408 otherwise) and be at most `PNS_MAX_BODY_BYTES` (413), so a client
//! trickling a body cannot hold a connection and a buffer for ever. Both
//! refusals close the connection, since the rest of the body would follow.

use super::error::ApiError;
use crate::app::App;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::future::Ready;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::{Layer, Service};

/// The public listener's checks: 414 past the URL limit, 413 for any body.
///
/// A layer of its own rather than a `from_fn` middleware: the checks need
/// only the request head, so its future is the handler's own, and a held
/// poll carries no boxed middleware future for 110 s (about 1.6 KB each).
#[derive(Clone, Copy)]
pub struct PublicChecks {
    pub max_url_bytes: usize,
}

impl<S> Layer<S> for PublicChecks {
    type Service = PublicChecked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PublicChecked {
            inner,
            max_url_bytes: self.max_url_bytes,
        }
    }
}

#[derive(Clone)]
pub struct PublicChecked<S> {
    inner: S,
    max_url_bytes: usize,
}

impl<S> Service<Request> for PublicChecked<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match refusal(&request, self.max_url_bytes) {
            Some(refused) => Either::Left(std::future::ready(Ok(refused))),
            None => Either::Right(self.inner.call(request)),
        }
    }
}

fn refusal(request: &Request, max: usize) -> Option<Response> {
    let target = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if target > max {
        return Some(closing(ApiError::UriTooLong(format!(
            "the request target is {target} bytes long; at most {max} are accepted"
        ))));
    }
    if has_body(request.headers()) {
        return Some(closing(ApiError::TooLarge(
            "the public endpoints take no request body".into(),
        )));
    }
    None
}

/// Read the whole body within the body timeout and size limit, then hand
/// the request on with the body in memory.
pub async fn internal_body(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limits = &app.config.limits;
    let max = limits.max_body_bytes;
    let too_large = || {
        closing(ApiError::TooLarge(format!(
            "request body is larger than {max} bytes"
        )))
    };
    if content_length(request.headers()).is_some_and(|n| n > max as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, max).collect();
    let bytes = match tokio::time::timeout(limits.body_timeout, read).await {
        Err(_) => {
            return closing(ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} s",
                limits.body_timeout.as_secs()
            )))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            return ApiError::BadRequest(format!("request body could not be read: {e}"))
                .into_response()
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || content_length(headers).is_some_and(|n| n > 0)
}

/// An error answer after which the connection is closed.
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}
