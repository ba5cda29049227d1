//! The internal API refuses what it cannot take, and says why.

use crate::support::*;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn the_internal_api_refuses_a_missing_or_wrong_token() {
    let s = Server::start();
    let url = s.internal_url("/internal/v1/notify");
    let body = mail("alice@example.com", "x");
    let a = answer(s.http.post(&url).json(&body).send().await.unwrap()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["errorCode"], "UNAUTHORIZED");
    let a = answer(
        s.http
            .post(&url)
            .bearer_auth("wrong-token-wrong-token")
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // The public listener does not serve the internal API at all.
    let a = answer(
        s.http
            .post(s.public_url("/internal/v1/notify"))
            .bearer_auth(s.internal_token())
            .json(&body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_bodies_get_the_status_that_names_the_problem() {
    let s = Server::start();
    let url = s.internal_url("/internal/v1/notify");
    let token = s.internal_token();
    let post = |body: Vec<u8>, ct: &'static str| {
        let req = s
            .http
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", ct)
            .body(body);
        async move { answer(req.send().await.unwrap()).await }
    };
    let big = format!(
        r#"{{"user":"a@x","type":70,"data":{{"pad":"{}"}}}}"#,
        "x".repeat(1024 * 1024 + 10)
    );
    let a = post(big.into_bytes(), "application/json").await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.body["errorCode"], "PAYLOAD_TOO_LARGE");

    let a = post(br#"{"user":"a@x","type":70}"#.to_vec(), "text/plain").await;
    assert_eq!(a.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(a.body["error"]
        .as_str()
        .unwrap()
        .contains("application/json"));

    let a = post(br#"{"user":"a@x","type":70"#.to_vec(), "application/json").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["errorCode"], "BAD_REQUEST");

    let a = post(
        br#"{"type":70}"#.to_vec(),
        "application/json; charset=utf-8",
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["error"].as_str().unwrap().contains("user"),
        "{}",
        a.body
    );

    let a = post(
        br#"{"user":"a@x","type":70,"data":[1]}"#.to_vec(),
        "application/json",
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["error"].as_str().unwrap().contains("data"),
        "{}",
        a.body
    );

    let a = post(
        br#"{"user":"a@x","type":70,"dedupkey":"k"}"#.to_vec(),
        "application/json",
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        a.body["error"].as_str().unwrap().contains("dedupkey"),
        "{}",
        a.body
    );

    let too_many: Vec<_> = (0..1001).map(|i| mail("a@x", &i.to_string())).collect();
    let a = s.notify(json!({ "messages": too_many })).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.body["error"].as_str().unwrap().contains("1000"));

    // None of it was stored.
    let sid = s.sid("a@x");
    assert_eq!(s.poll(&sid, "timeout=0&cursor=1.0").await.c(), 0);
    assert_eq!(
        s.internal_get("/internal/v1/stats").await.body["messagesStored"],
        0
    );
}

#[tokio::test]
async fn health_and_readiness_answer_on_both_listeners() {
    let s = Server::start();
    for base in [s.public_url(""), s.internal_url("")] {
        for path in ["/healthz", "/readyz"] {
            let r = s.http.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{base}{path}");
        }
    }
    let metrics = s
        .http
        .get(s.internal_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("pns_polls_held"));
    assert!(metrics.contains("pns_messages_accepted_total"));
    // Metrics are for operators, not on the public listener.
    let r = s.http.get(s.public_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn first_metrics_move_with_traffic() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.poll(&sid, "timeout=0").await;
    s.mail("alice@example.com", "m").await;
    s.poll(&sid, "timeout=0").await;
    // A refused poll is an answer too: a client polling with a dead session shows.
    let refused = s.poll("not-a-token", "timeout=0").await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let metrics = s
        .http
        .get(s.internal_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |needle: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{needle} missing in\n{metrics}"))
    };
    assert_eq!(value("pns_messages_accepted_total{source=\"api\"}"), 1.0);
    assert_eq!(value("pns_messages_delivered_total"), 1.0);
    assert_eq!(value("pns_poll_answers_total{outcome=\"message\"}"), 1.0);
    assert_eq!(value("pns_poll_answers_total{outcome=\"timeout\"}"), 1.0);
    assert_eq!(value("pns_poll_answers_total{outcome=\"error\"}"), 1.0);
}

/// The heads below are what the internal router answered when it served
/// notifies itself, before the front took them over (server::DirectRoute).
#[tokio::test]
async fn notify_answers_have_the_heads_of_the_internal_router() {
    let s = Server::start_with(&[("PNS_MAX_BODY_BYTES", "4096")]);
    let token = s.internal_token();
    let post = |body: &str, auth: bool| {
        let auth = if auth {
            format!("Authorization: Bearer {token}\r\n")
        } else {
            String::new()
        };
        format!(
            "POST /internal/v1/notify HTTP/1.1\r\nHost: pns\r\n{auth}\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let json = ["content-type: application/json", "cache-control: no-store"];
    let good = r#"{"user":"a@x","type":70,"data":{"subject":"hi"}}"#;
    for (request, status, closing) in [
        (post(good, true), "202 Accepted", false),
        (post(good, false), "401 Unauthorized", false),
        (post("{", true), "400 Bad Request", false),
        (
            post(r#"{"user":"a@x"}"#, true),
            "422 Unprocessable Entity",
            false,
        ),
        (post(&"x".repeat(5000), true), "413 Payload Too Large", true),
    ] {
        let mut expected = vec![format!("HTTP/1.1 {status}"), json[0].to_owned()];
        if closing {
            expected.push("connection: close".into());
        }
        expected.push(json[1].to_owned());
        let mut head = raw_head(s.internal, &request).await;
        let length = head.pop().unwrap_or_default();
        assert!(length.starts_with("content-length: "), "{status}: {length}");
        assert_eq!(head, expected);
    }
}
