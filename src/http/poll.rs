//! `GET /pns/poll`: check the client address's rate, find and check the sid
//! (a JWT, or an opaque sid registered by the webmail), check the session's
//! rate, note the poll in the session registry, and hand over to
//! [`crate::poll`].

use super::error::ApiError;
use crate::app::App;
use crate::metrics::{LimitScope, Outcome};
use crate::poll::{decode_cursor, PollRequest};
use crate::registry::sanitize_come_from;
use crate::server::{AnswerSlot, Answering, DirectRoute};
use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The poll's query parameters, borrowed from the query string unless
/// they need decoding (a sid, a cursor and a timeout never do).
#[derive(Debug, Default)]
struct PollQuery<'q> {
    sid: Option<Cow<'q, str>>,
    come_from: Option<Cow<'q, str>>,
    cursor: Option<Cow<'q, str>>,
    timeout: Option<Cow<'q, str>>,
}

impl<'q> PollQuery<'q> {
    /// Parse `application/x-www-form-urlencoded` (`+` is a space, `%XX` a
    /// byte, bytes that are not UTF-8 become U+FFFD). A parameter given
    /// twice is refused; unknown ones are ignored.
    fn parse(query: &'q str) -> Result<Self, String> {
        let mut parsed = PollQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = form_decode(key);
            let slot = match &*key {
                "sid" => &mut parsed.sid,
                "comeFrom" => &mut parsed.come_from,
                "cursor" => &mut parsed.cursor,
                "timeout" => &mut parsed.timeout,
                _ => continue,
            };
            if slot.is_some() {
                return Err(format!("duplicate field `{key}`"));
            }
            *slot = Some(form_decode(value));
        }
        Ok(parsed)
    }
}

/// One name or value of a form-encoded query, decoded; borrowed when
/// there is nothing to decode. Not `form_urlencoded`: the query is a
/// `str` already, and it checks every value's UTF-8 again, on each poll.
fn form_decode(raw: &str) -> Cow<'_, str> {
    // Counted, not searched: the count runs on vector registers, `any` a
    // byte at a time, and a sid is a few hundred bytes with nothing to decode.
    if raw.bytes().filter(|&b| b == b'%' || b == b'+').count() == 0 {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |at: usize| bytes.get(at).and_then(|h| (*h as char).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            _ => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// The handler: a function that returns its future rather than an `async
/// fn`, because an `async fn` keeps room for its arguments in its future
/// until it returns, and this future is what a held poll is. The request's
/// parts go at once into the checks' own boxed future ([`admit`]), which
/// is gone before the hold, and with it the headers (on a connection served
/// by hyper, slices of its 8 KiB read buffer) and the query string.
pub fn poll(
    State(app): State<Arc<App>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<Arc<AnswerSlot>>>,
) -> impl Future<Output = Result<Json<crate::wire::PollAnswer>, ApiError>> {
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr.ip());
    let slot = slot.map(|Extension(slot)| slot);
    let admitting = Box::pin(admit(app.clone(), query, headers, peer, slot));
    async move { hold(&app, admitting).await.map(Json) }
}

/// The poll, answered without the public router ([`DirectRoute`]): the
/// same checks and hold as [`poll`], and the same answer, whose headers are
/// the ones the router's layers give ([`super::PollHeads`]) and, for an
/// error, are given by those layers themselves.
pub struct DirectPoll {
    app: Arc<App>,
    /// The public layers around a handler that returns the answer it is
    /// handed: dresses an error answer as the router would.
    dress: Router,
}

/// An answer for [`DirectPoll::dress`] to pass through the layers.
#[derive(Clone)]
struct Dressing(Arc<Mutex<Option<Response>>>);

impl DirectPoll {
    pub fn new(app: Arc<App>) -> Self {
        let undressed = |Extension(Dressing(answer)): Extension<Dressing>| async move {
            let answer = answer.lock().unwrap_or_else(|p| p.into_inner()).take();
            answer.unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        };
        let dress = super::public_layers(
            Router::new().route(super::POLL_PATH, get(undressed)),
            &app.config.allowed_origins,
        );
        DirectPoll { app, dress }
    }
}

impl DirectRoute for DirectPoll {
    fn takes(&self, req: &Request<Body>) -> bool {
        // The rest (a HEAD, a refusal of the public checks) is the router's.
        req.method() == Method::GET
            && req.uri().path() == super::POLL_PATH
            && super::limits::refusal(req, self.app.config.limits.max_url_bytes).is_none()
    }

    fn answer(&self, req: Request<Body>, peer: SocketAddr) -> Answering {
        let (parts, _) = req.into_parts();
        let origin = parts.headers.get(header::ORIGIN).cloned();
        let slot = parts.extensions.get::<Arc<AnswerSlot>>().cloned();
        let query = parts.uri.query().map(str::to_owned);
        let app = self.app.clone();
        let dress = self.dress.clone();
        let admitting = Box::pin(admit(
            app.clone(),
            query,
            parts.headers,
            Some(peer.ip()),
            slot,
        ));
        Box::pin(async move {
            let answered = match hold(&app, admitting).await {
                Ok(answer) => answer.to_json().map_err(|e| {
                    ApiError::Internal(anyhow::anyhow!("cannot encode an answer: {e}"))
                }),
                Err(e) => Err(e),
            };
            match answered {
                Ok(body) => {
                    let head = app.poll_heads.get(app.poll_heads.id(origin.as_ref()));
                    let mut response = Response::new(Body::from(body));
                    *response.headers_mut() = head.clone();
                    response
                }
                Err(e) => {
                    let answer = Dressing(Arc::new(Mutex::new(Some(e.into_response()))));
                    super::poll_through(dress, origin, answer).await
                }
            }
        })
    }
}

/// Once the checks pass, answer the poll (holding it until there is news);
/// a refusal by the checks is counted here, any other error answer by
/// [`crate::poll::answer`].
async fn hold(
    app: &Arc<App>,
    admitting: impl Future<Output = Result<PollRequest, ApiError>>,
) -> Result<crate::wire::PollAnswer, ApiError> {
    // In a block: what only the checks need takes no room while held.
    let (key, answering) = {
        let request = match admitting.await {
            Ok(request) => request,
            Err(e) => {
                app.metrics.answered(Outcome::error);
                return Err(e);
            }
        };
        let key = request.session.key.clone();
        (key, crate::poll::answer(app, request))
    };
    let answer = answering.await?;
    if answer.c > 0 {
        app.registry.delivered(&key, answer.c as u64);
    }
    Ok(answer)
}

/// The checks of a poll, up to the request for [`crate::poll::answer`].
async fn admit(
    app: Arc<App>,
    raw_query: Option<String>,
    headers: HeaderMap,
    peer: Option<std::net::IpAddr>,
    slot: Option<Arc<AnswerSlot>>,
) -> Result<PollRequest, ApiError> {
    let address = crate::address::client_address(peer, &headers, &app.config.trusted_proxies);
    if let Some(ip) = address {
        app.address_limits
            .check(&crate::address::rate_key(ip), Instant::now())
            .map_err(|wait| rate_limited(&app, LimitScope::address, wait))?;
    }
    let query = match raw_query.as_deref() {
        Some(q) => PollQuery::parse(q)
            .map_err(|e| ApiError::BadRequest(format!("query string is malformed: {e}")))?,
        None => PollQuery::default(),
    };
    let sid = query
        .sid
        .as_deref()
        .or_else(|| bearer(&headers))
        .or_else(|| cookie(&headers, "pns_sid"))
        .ok_or(crate::session::SessionError::Missing)?;
    let now_ms = crate::clock::now_ms();
    let opaque = !sid.is_empty() && !crate::opaque::looks_like_jwt(sid);
    let session = if opaque {
        app.opaque.resolve(sid, &app.sessions, now_ms).await?
    } else {
        app.sessions.validate(sid)?
    };
    app.session_limits
        .check(&session.key, Instant::now())
        .map_err(|wait| rate_limited(&app, LimitScope::session, wait))?;
    let hold = app.config.hold;
    let timeout = match query.timeout.as_deref() {
        None | Some("") => hold,
        Some(t) => {
            let secs: u64 = t.parse().map_err(|_| {
                ApiError::BadRequest(format!(
                    "timeout must be whole seconds from 0 to {}",
                    hold.as_secs()
                ))
            })?;
            Duration::from_secs(secs).min(hold)
        }
    };
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    let come_from = query.come_from.as_deref().and_then(sanitize_come_from);
    app.metrics.polled_from(come_from.as_deref());
    app.registry
        .polled(&session, opaque, come_from.as_deref(), address, now_ms);
    let lent = slot.map(|slot| (slot, app.poll_heads.id(headers.get(header::ORIGIN))));
    Ok(PollRequest {
        session,
        cursor,
        timeout,
        lent,
    })
}

fn rate_limited(app: &App, scope: LimitScope, wait: Duration) -> ApiError {
    app.metrics.rate_limited(scope);
    ApiError::RateLimited {
        retry_after_secs: crate::limits::retry_after_secs(wait),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the poll parsed its query with before: serde_urlencoded.
    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    struct Reference {
        sid: Option<String>,
        #[serde(rename = "comeFrom")]
        come_from: Option<String>,
        cursor: Option<String>,
        timeout: Option<String>,
    }

    fn owned(q: PollQuery<'_>) -> Reference {
        Reference {
            sid: q.sid.map(Cow::into_owned),
            come_from: q.come_from.map(Cow::into_owned),
            cursor: q.cursor.map(Cow::into_owned),
            timeout: q.timeout.map(Cow::into_owned),
        }
    }

    #[test]
    fn the_query_parses_as_serde_urlencoded_parses_it() {
        for query in [
            "",
            "sid=eyJh.eyJz.c2ln&cursor=1.42&timeout=30&comeFrom=mail",
            "sid=a%2Bb+c&comeFrom=web%20mail",
            "sid=%zz%4&cursor=%%41",
            "sid=%FF%FE&timeout=",
            "&&sid=x&&unknown=1&other",
            "s%69d=x&comeFrom",
            "sid=x&sid=y",
            "cursor=1&cur%73or=2",
        ] {
            let ours = PollQuery::parse(query).map(owned);
            let reference =
                serde_urlencoded::from_str::<Reference>(query).map_err(|e| e.to_string());
            assert_eq!(ours, reference, "{query}");
        }
    }

    #[test]
    fn values_without_escapes_are_borrowed() {
        let q = PollQuery::parse("sid=eyJh.eyJz.c2ln&cursor=1.42&comeFrom=a+b").unwrap();
        assert!(matches!(q.sid, Some(Cow::Borrowed("eyJh.eyJz.c2ln"))));
        assert!(matches!(q.cursor, Some(Cow::Borrowed("1.42"))));
        assert!(matches!(q.come_from, Some(Cow::Owned(ref s)) if s == "a b"));
    }
}
