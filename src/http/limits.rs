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
use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use http_body_util::BodyExt;
use std::convert::Infallible;
use std::future::{Future, Ready};
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

pub(super) fn refusal(request: &Request, max: usize) -> Option<Response> {
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

/// The internal listener's checks, in one layer: `refuse` (the caller's
/// credentials) before anything is read, then the whole body read within
/// the body timeout and size limit and handed on in memory.
///
/// A layer of its own rather than two `from_fn` middlewares: those box the
/// inner service and a future each, per request, on every notify.
#[derive(Clone)]
pub struct InternalChecks {
    pub app: Arc<App>,
    /// Who may call: the answer to send instead, when the caller may not.
    pub refuse: fn(&App, &HeaderMap) -> Option<Response>,
}

impl<S> Layer<S> for InternalChecks {
    type Service = InternalChecked<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InternalChecked {
            inner,
            checks: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct InternalChecked<S> {
    inner: S,
    checks: InternalChecks,
}

type Answer = std::pin::Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl<S> Service<Request> for InternalChecked<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // The ready service goes into the future; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (app, refuse) = (self.checks.app.clone(), self.checks.refuse);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            match checked_body(&app, refuse, &parts.headers, body).await {
                Ok(bytes) => {
                    inner
                        .call(Request::from_parts(parts, Body::from(bytes)))
                        .await
                }
                Err(refused) => Ok(refused),
            }
        })
    }
}

/// The internal listener's checks of one request, in order: `refuse`
/// (the caller's credentials) and the announced length before anything
/// is read, then the whole body, read within the body timeout and size
/// limit. The body, or the answer that refuses the request.
pub async fn checked_body(
    app: &App,
    refuse: fn(&App, &HeaderMap) -> Option<Response>,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, Response> {
    if let Some(refused) = refuse(app, headers) {
        return Err(refused);
    }
    let max = app.config.limits.max_body_bytes;
    if content_length(headers).is_some_and(|n| n > max as u64) {
        return Err(too_large(max));
    }
    read_body(app, body).await
}

/// The whole body, read within the body timeout and size limit, or the
/// answer that refuses it.
async fn read_body(app: &App, body: Body) -> Result<axum::body::Bytes, Response> {
    let limits = &app.config.limits;
    let (max, timeout) = (limits.max_body_bytes, limits.body_timeout);
    let read = http_body_util::Limited::new(body, max).collect();
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(closing(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            timeout.as_secs()
        )))),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(max)),
        Ok(Err(e)) => Err(
            ApiError::BadRequest(format!("request body could not be read: {e}")).into_response(),
        ),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn too_large(max: usize) -> Response {
    closing(ApiError::TooLarge(format!(
        "request body is larger than {max} bytes"
    )))
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
