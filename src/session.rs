//! The session validator: turns a `sid` into a [`Session`] or refuses it.
//!
//! A sid is a JWT signed with the configured HS256 secret, or with the key
//! behind a configured EdDSA or RS256 public key. Exactly one algorithm is
//! accepted, the one the key is for, so `alg: none` and algorithm confusion
//! (an HS256 token "signed" with a public key) fail signature checks. The
//! revocations in force are kept in memory, so the hot path never asks the
//! store. HS256 tokens, the common case, are checked by [`hs256`], lean
//! enough for every poll; public keys by jsonwebtoken.

mod hs256;

use crate::store::{Revocations, SharedStore, StoreResult};
use foldhash::HashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::RwLock;

/// Clock skew tolerated on `exp`, in seconds.
pub const EXP_LEEWAY_SECS: u64 = 30;

/// A validated session.
#[derive(Debug, Clone)]
pub struct Session {
    /// The session id: the token's `jti`, or a hash of the token without one.
    pub key: String,
    /// The mailbox address (`sub`).
    pub user: String,
    /// Where the session's news begins: its `iat`, in unix ms.
    pub start_ms: i64,
    /// The token's `exp`, in unix ms.
    pub expires_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("no session: pass sid as a query parameter, a Bearer token or the pns_sid cookie")]
    Missing,
    #[error("session token is malformed")]
    Malformed,
    #[error("session token signature or algorithm is not accepted")]
    BadSignature,
    #[error("session has expired")]
    Expired,
    #[error("session token audience is wrong")]
    WrongAudience,
    #[error("session token lacks the {0} claim")]
    MissingClaim(&'static str),
    #[error("session has been revoked")]
    Revoked,
    #[error("session is not known: it was never registered, or has been deleted")]
    Unknown,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The key that session tokens are checked with.
pub enum VerifyKey {
    Secret(Vec<u8>),
    /// A PEM public key: Ed25519 (EdDSA) or RSA (RS256).
    PublicPem(Vec<u8>),
}

pub struct SessionValidator {
    check: Check,
    revoked: RwLock<RevokedSet>,
}

/// How a token's signature and claims are checked.
enum Check {
    Hs256(hs256::Hs256),
    /// jsonwebtoken's decode: for public keys, whose verification dwarfs
    /// the decoding anyway.
    Generic {
        key: DecodingKey,
        validation: Validation,
    },
}

impl Check {
    fn generic(key: DecodingKey, alg: Algorithm, audience: Option<&str>) -> Check {
        let mut validation = Validation::new(alg);
        validation.leeway = EXP_LEEWAY_SECS;
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.set_required_spec_claims(&["exp", "sub", "aud"]);
            }
            None => {
                validation.validate_aud = false;
                validation.set_required_spec_claims(&["exp", "sub"]);
            }
        }
        Check::Generic { key, validation }
    }

    fn claims(&self, token: &str) -> Result<Claims, SessionError> {
        match self {
            Check::Hs256(hs256) => hs256.decode(token, crate::clock::now_ms() / 1000),
            Check::Generic { key, validation } => {
                jsonwebtoken::decode::<Claims>(token, key, validation)
                    .map(|data| data.claims)
                    .map_err(|e| refusal_of(e.kind()))
            }
        }
    }
}

/// What a jsonwebtoken error means for the client.
fn refusal_of(kind: &jsonwebtoken::errors::ErrorKind) -> SessionError {
    use jsonwebtoken::errors::ErrorKind;
    match kind {
        ErrorKind::ExpiredSignature => SessionError::Expired,
        ErrorKind::InvalidAudience => SessionError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) if c == "sub" => SessionError::MissingClaim("sub"),
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => SessionError::MissingClaim("aud"),
        ErrorKind::MissingRequiredClaim(_) => SessionError::MissingClaim("exp"),
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::InvalidKeyFormat => SessionError::BadSignature,
        _ => SessionError::Malformed,
    }
}

#[derive(Default)]
struct RevokedSet {
    sessions: HashMap<String, i64>,
    mailboxes: HashMap<String, i64>,
}

impl SessionValidator {
    pub fn new(key: VerifyKey, audience: Option<&str>) -> anyhow::Result<Self> {
        let check = match key {
            VerifyKey::Secret(s) => Check::Hs256(hs256::Hs256::new(&s, audience)),
            VerifyKey::PublicPem(pem) => match DecodingKey::from_ed_pem(&pem) {
                Ok(k) => Check::generic(k, Algorithm::EdDSA, audience),
                Err(_) => Check::generic(
                    DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                        anyhow::anyhow!("public key is neither an Ed25519 nor an RSA PEM key: {e}")
                    })?,
                    Algorithm::RS256,
                    audience,
                ),
            },
        };
        Ok(SessionValidator {
            check,
            revoked: RwLock::default(),
        })
    }

    /// Check a token and the revocations in force.
    pub fn validate(&self, token: &str) -> Result<Session, SessionError> {
        if token.is_empty() {
            return Err(SessionError::Missing);
        }
        let claims = self.check.claims(token)?;
        let user = claims
            .sub
            .filter(|s| !s.is_empty())
            .ok_or(SessionError::MissingClaim("sub"))?;
        let iat = claims.iat.ok_or(SessionError::MissingClaim("iat"))?;
        let key = match claims.jti {
            Some(j) if !j.is_empty() => j,
            _ => token_fingerprint(token),
        };
        let session = Session {
            key,
            user,
            start_ms: iat.saturating_mul(1000),
            expires_ms: claims.exp.saturating_mul(1000),
        };
        if self.is_revoked(&session) {
            return Err(SessionError::Revoked);
        }
        Ok(session)
    }

    /// True when `s` is revoked, by its id or by its user's revocation.
    pub fn is_revoked(&self, s: &Session) -> bool {
        self.is_revoked_parts(&s.key, &s.user, s.start_ms)
    }

    /// [`SessionValidator::is_revoked`], for the session `key` of `user`
    /// that began at `start_ms`.
    pub fn is_revoked_parts(&self, key: &str, user: &str, start_ms: i64) -> bool {
        let revoked = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        if revoked.sessions.is_empty() && revoked.mailboxes.is_empty() {
            return false;
        }
        revoked.sessions.contains_key(key)
            || revoked
                .mailboxes
                .get(user)
                .is_some_and(|&at| start_ms <= at)
    }

    /// Replace the in-memory revocations with the store's.
    pub fn load_revocations(&self, r: Revocations) {
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        set.sessions = r.sessions.into_iter().collect();
        set.mailboxes = r.mailboxes.into_iter().collect();
    }

    pub fn note_revoked_session(&self, jti: &str, expires_ms: i64) {
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        set.sessions.insert(jti.to_owned(), expires_ms);
    }

    pub fn note_revoked_mailbox(&self, user: &str, revoked_ms: i64) {
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        let at = set.mailboxes.entry(user.to_owned()).or_insert(revoked_ms);
        *at = (*at).max(revoked_ms);
    }

    /// Drop revoked sessions whose tokens have expired anyway.
    pub fn forget_expired(&self, now_ms: i64) {
        let leeway = EXP_LEEWAY_SECS as i64 * 1000;
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        set.sessions.retain(|_, exp| *exp + leeway >= now_ms);
    }

    /// Load the store's revocations at start.
    pub async fn load_from(&self, store: &SharedStore, now_ms: i64) -> StoreResult<()> {
        self.load_revocations(store.revocations(now_ms).await?);
        Ok(())
    }
}

/// A stable id for a token without `jti`; never the token itself.
fn token_fingerprint(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::from("t-");
    for b in &digest[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Mint an HS256 session token, for `pns token`, the demo and tests.
pub fn mint(
    secret: &[u8],
    user: &str,
    ttl_secs: i64,
    audience: Option<&str>,
) -> anyhow::Result<String> {
    let now = crate::clock::now_ms() / 1000;
    let claims = Claims {
        sub: Some(user.to_owned()),
        exp: now + ttl_secs,
        iat: Some(now),
        jti: Some(crate::store::new_message_id()),
        aud: audience.map(str::to_owned),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validator() -> SessionValidator {
        SessionValidator::new(VerifyKey::Secret(b"k".repeat(32)), None).unwrap()
    }

    #[test]
    fn minted_token_validates_and_revocation_refuses_it() {
        let v = validator();
        let t = mint(&b"k".repeat(32), "a@x", 60, None).unwrap();
        let s = v.validate(&t).unwrap();
        assert_eq!(s.user, "a@x");
        v.note_revoked_session(&s.key, s.expires_ms);
        assert_eq!(v.validate(&t).unwrap_err(), SessionError::Revoked);
    }

    #[test]
    fn mailbox_revocation_spares_sessions_started_later() {
        let v = validator();
        let t = mint(&b"k".repeat(32), "a@x", 60, None).unwrap();
        let s = v.validate(&t).unwrap();
        v.note_revoked_mailbox("a@x", s.start_ms - 1);
        assert!(v.validate(&t).is_ok());
        v.note_revoked_mailbox("a@x", s.start_ms);
        assert_eq!(v.validate(&t).unwrap_err(), SessionError::Revoked);
    }

    /// A token of any header and claims, signed with `secret` (HS256).
    pub(super) fn signed(
        header: serde_json::Value,
        claims: serde_json::Value,
        secret: &[u8],
    ) -> String {
        use base64::Engine;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let tag = ring::hmac::sign(&key, message.as_bytes());
        format!("{message}.{}", b64(tag.as_ref()))
    }

    #[test]
    fn the_hs256_check_decides_as_jsonwebtoken_does() {
        use serde_json::json;
        let secret = b"k".repeat(32);
        let now = crate::clock::now_ms() / 1000;
        for audience in [None, Some("pns")] {
            let hs = json!({"alg": "HS256", "typ": "JWT"});
            let claims = |extra: serde_json::Value| {
                let mut c = json!({"sub": "a@x", "iat": now, "exp": now + 600, "jti": "j1"});
                if let Some(aud) = audience {
                    c["aud"] = json!(aud);
                }
                for (k, v) in extra.as_object().unwrap() {
                    if v.is_null() && k != "sub" {
                        c.as_object_mut().unwrap().remove(k);
                    } else {
                        c[k] = v.clone();
                    }
                }
                c
            };
            let good = signed(hs.clone(), claims(json!({})), &secret);
            let (head, rest) = good.split_once('.').unwrap();
            let (payload, signature) = rest.split_once('.').unwrap();
            let other_payload = signed(hs.clone(), claims(json!({"sub": "b@x"})), &secret);
            let mut tokens = vec![
                good.clone(),
                signed(hs.clone(), claims(json!({"exp": now - 10})), &secret),
                signed(hs.clone(), claims(json!({"exp": now - 3600})), &secret),
                signed(hs.clone(), claims(json!({"exp": -5})), &secret),
                signed(hs.clone(), claims(json!({"exp": 1.5e9})), &secret),
                signed(hs.clone(), claims(json!({"exp": "9999999999"})), &secret),
                signed(hs.clone(), claims(json!({"exp": null})), &secret),
                signed(hs.clone(), claims(json!({"sub": null})), &secret),
                signed(hs.clone(), claims(json!({"sub": ""})), &secret),
                signed(hs.clone(), claims(json!({"sub": 5})), &secret),
                signed(hs.clone(), claims(json!({"iat": null})), &secret),
                signed(hs.clone(), claims(json!({"jti": null})), &secret),
                signed(hs.clone(), claims(json!({"aud": "pns"})), &secret),
                signed(hs.clone(), claims(json!({"aud": null})), &secret),
                signed(hs.clone(), claims(json!({"aud": "other"})), &secret),
                signed(hs.clone(), claims(json!({"aud": ["pns"]})), &secret),
                signed(
                    hs.clone(),
                    claims(json!({"aud": "other", "exp": now - 3600})),
                    &secret,
                ),
                signed(hs.clone(), claims(json!({})), &b"j".repeat(32)),
                signed(json!({"alg": "HS256"}), claims(json!({})), &secret),
                signed(
                    json!({"alg": "HS256", "kid": "1"}),
                    claims(json!({})),
                    &secret,
                ),
                signed(
                    json!({"alg": "HS256", "kid": 1}),
                    claims(json!({})),
                    &secret,
                ),
                signed(json!({"alg": "HS384"}), claims(json!({})), &secret),
                signed(json!({"alg": "RS256"}), claims(json!({})), &secret),
                signed(json!({"alg": "none"}), claims(json!({})), &secret),
                signed(json!({"typ": "JWT"}), claims(json!({})), &secret),
                signed(json!([1]), claims(json!({})), &secret),
                signed(hs.clone(), json!("claims"), &secret),
                format!("{head}.{payload}."),
                format!("{head}.{payload}.{}", &signature[1..]),
                format!("{head}.{payload}.{signature}="),
                format!("{head}.{payload}.{signature}AA"),
                format!(
                    "{head}.{}.{signature}",
                    other_payload.split('.').nth(1).unwrap()
                ),
                format!("{head}.{payload}.{signature}.{signature}"),
                format!("{head}.{payload}"),
                format!("{head}.!!.{signature}"),
                format!("!!.{payload}.{signature}"),
                "not-a-token".into(),
                "a.b.c".into(),
                "..".into(),
            ];
            // Within the leeway but one second either side of its edge.
            tokens.push(signed(
                hs.clone(),
                claims(json!({"exp": now - EXP_LEEWAY_SECS as i64 + 2})),
                &secret,
            ));
            tokens.push(signed(
                hs.clone(),
                claims(json!({"exp": now - EXP_LEEWAY_SECS as i64 - 2})),
                &secret,
            ));
            let generic = SessionValidator {
                check: Check::generic(
                    DecodingKey::from_secret(&secret),
                    Algorithm::HS256,
                    audience,
                ),
                revoked: RwLock::default(),
            };
            // The lean check remembers the first header that passed, and
            // must decide alike before and after: each order on a new
            // validator, then again on the same.
            let forward: Vec<&String> = tokens.iter().collect();
            let backward: Vec<&String> = tokens.iter().rev().collect();
            let mut accepted = 0;
            for order in [&forward, &backward] {
                let lean =
                    SessionValidator::new(VerifyKey::Secret(secret.clone()), audience).unwrap();
                assert!(matches!(lean.check, Check::Hs256(_)));
                for t in order.iter().chain(order.iter()) {
                    let ours = format!("{:?}", lean.validate(t));
                    assert_eq!(
                        ours,
                        format!("{:?}", generic.validate(t)),
                        "audience {audience:?}, token {t}"
                    );
                    accepted += usize::from(ours.starts_with("Ok"));
                }
            }
            assert!(
                accepted >= 12,
                "only {accepted} accepted: the cases test nothing"
            );
            // A header that failed is not remembered as one that passed.
            let lean = SessionValidator::new(VerifyKey::Secret(secret.clone()), audience).unwrap();
            let other_alg = signed(json!({"alg": "HS384"}), claims(json!({})), &secret);
            for _ in 0..2 {
                assert_eq!(
                    lean.validate(&other_alg).unwrap_err(),
                    SessionError::BadSignature
                );
            }
        }
    }
}
