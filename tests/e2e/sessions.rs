//! Sessions: which sids are let in, where they may come from, and revocation.

use crate::support::*;
use base64::Engine;
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};

fn b64(v: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn now() -> i64 {
    pns::clock::now_ms() / 1000
}

fn hs256(secret: &str, claims: serde_json::Value) -> String {
    use jsonwebtoken::{encode, EncodingKey, Header};
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn assert_refused(s: &Server, sid: &str, why: &str) {
    let a = s.poll(sid, "timeout=0").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{why}: {}", a.body);
    assert_eq!(a.body["errorCode"], "SESSION_INVALID", "{why}");
    assert_eq!(a.body["c"], 0);
    assert_eq!(a.body["msg"], json!([]));
    assert!(
        a.body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{why}: no reason given"
    );
    assert_eq!(a.headers["cache-control"], "no-store");
}

#[tokio::test]
async fn bad_sessions_are_refused_with_401() {
    let s = Server::start();
    let secret = s.secret_file("jwt_secret");
    let t = now();
    let expired = hs256(
        &secret,
        json!({"sub": "a@x", "iat": t - 7200, "exp": t - 3600, "jti": "e"}),
    );
    assert_refused(&s, &expired, "expired").await;
    let forged = hs256(
        "someone-elses-secret-of-enough-length!!",
        json!({"sub": "a@x", "iat": t, "exp": t + 600}),
    );
    assert_refused(&s, &forged, "forged").await;
    assert_refused(&s, "not-a-token", "malformed").await;
    assert_refused(&s, "a.b.c", "malformed parts").await;
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&json!({"sub": "a@x", "iat": t, "exp": t + 600}))
    );
    assert_refused(&s, &none, "alg none").await;
    let no_sub = hs256(&secret, json!({"iat": t, "exp": t + 600}));
    assert_refused(&s, &no_sub, "no sub").await;
    let no_exp = hs256(&secret, json!({"sub": "a@x", "iat": t}));
    assert_refused(&s, &no_exp, "no exp").await;
    // Missing altogether.
    let a = answer(
        s.http
            .get(s.public_url("/pns/poll?timeout=0"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.body["errorCode"], "SESSION_INVALID");
}

#[tokio::test]
async fn an_hs256_token_signed_with_the_public_key_is_refused() {
    // Algorithm confusion: a server configured with an RSA public key must not
    // accept an HS256 token whose "secret" is that public key.
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.pem");
    let pubkey = dir.path().join("pub.pem");
    let ok = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key)
        .status()
        .unwrap()
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pubkey)
            .status()
            .unwrap()
            .success();
    assert!(ok, "openssl could not make a key");
    let s = Server::start_with(&[("PNS_JWT_PUBLIC_KEY_FILE", pubkey.to_str().unwrap())]);
    let t = now();
    let claims = json!({"sub": "a@x", "iat": t, "exp": t + 600, "jti": "j"});
    let pem = std::fs::read_to_string(&pubkey).unwrap();
    assert_refused(
        &s,
        &hs256(&pem, claims.clone()),
        "HS256 with the public key as secret",
    )
    .await;
    // The real thing, signed with the private key, is accepted.
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let good = encode(
        &Header::new(Algorithm::EdDSA),
        &claims,
        &EncodingKey::from_ed_pem(&std::fs::read(&key).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(s.poll(&good, "timeout=0").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_sid_may_come_as_bearer_header_or_cookie() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    s.mail("alice@example.com", "hi").await;
    let url = s.public_url("/pns/poll?timeout=0&cursor=1.0");
    let a = answer(s.http.get(&url).bearer_auth(&sid).send().await.unwrap()).await;
    assert_eq!(a.subjects(), ["hi"]);
    let a = answer(
        s.http
            .get(&url)
            .header("cookie", format!("lang=en; pns_sid={sid}"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.subjects(), ["hi"]);
}

#[tokio::test]
async fn revoking_a_session_ends_its_held_poll_with_401_and_refuses_it_later() {
    let s = Server::start();
    let sid = s.sid("alice@example.com");
    let other = s.sid("alice@example.com");
    let jti = jti_of(&sid);
    let started = Instant::now();
    let held = s.poll(&sid, "timeout=20");
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.internal_post("/internal/v1/sessions/revoke", json!({ "jti": jti }))
            .await
    };
    let (held, revoked) = tokio::join!(held, revoke);
    assert_eq!(revoked.status, StatusCode::OK, "{}", revoked.body);
    assert_eq!(held.status, StatusCode::UNAUTHORIZED);
    assert_eq!(held.body["errorCode"], "SESSION_INVALID");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_refused(&s, &sid, "revoked").await;
    // Another session of the same user is untouched.
    assert_eq!(s.poll(&other, "timeout=0").await.status, StatusCode::OK);
}

#[tokio::test]
async fn revoking_a_user_ends_all_their_sessions() {
    let s = Server::start();
    let (a, b) = (s.sid("alice@example.com"), s.sid("alice@example.com"));
    let bob = s.sid("bob@example.com");
    let (ha, hb, revoke) =
        tokio::join!(s.poll(&a, "timeout=20"), s.poll(&b, "timeout=20"), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            s.internal_post(
                "/internal/v1/sessions/revoke",
                json!({"user": "alice@example.com"}),
            )
            .await
        });
    assert_eq!(revoke.status, StatusCode::OK);
    assert_eq!(ha.status, StatusCode::UNAUTHORIZED);
    assert_eq!(hb.status, StatusCode::UNAUTHORIZED);
    assert_eq!(s.poll(&bob, "timeout=0").await.status, StatusCode::OK);
    // Revocation survives a restart.
    let s = s.kill9_and_restart();
    assert_refused(&s, &a, "revoked before restart").await;
}

fn jti_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v["jti"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn with_an_audience_configured_tokens_must_carry_it() {
    let s = Server::start_with(&[("PNS_JWT_AUDIENCE", "pns")]);
    let secret = s.secret_file("jwt_secret");
    let t = now();
    let without = hs256(&secret, json!({"sub": "a@x", "iat": t, "exp": t + 600}));
    assert_refused(&s, &without, "no aud").await;
    let wrong = hs256(
        &secret,
        json!({"sub": "a@x", "iat": t, "exp": t + 600, "aud": "other"}),
    );
    assert_refused(&s, &wrong, "wrong aud").await;
    let right = hs256(
        &secret,
        json!({"sub": "a@x", "iat": t, "exp": t + 600, "aud": "pns"}),
    );
    assert_eq!(s.poll(&right, "timeout=0").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_token_expired_within_the_leeway_still_works() {
    let s = Server::start();
    let secret = s.secret_file("jwt_secret");
    let t = now();
    let just = hs256(&secret, json!({"sub": "a@x", "iat": t - 60, "exp": t - 5}));
    assert_eq!(s.poll(&just, "timeout=0").await.status, StatusCode::OK);
}
