//! The session validator: turns a `sid` into a [`Session`] or refuses it.
//!
//! A sid is a JWT signed with the configured HS256 secret, or with the key
//! behind a configured EdDSA or RS256 public key. Exactly one algorithm is
//! accepted, the one the key is for, so `alg: none` and algorithm confusion
//! (an HS256 token "signed" with a public key) fail signature checks. The
//! revocations in force are kept in memory, so the hot path never asks the
//! store.

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
    key: DecodingKey,
    validation: Validation,
    revoked: RwLock<RevokedSet>,
}

#[derive(Default)]
struct RevokedSet {
    sessions: HashMap<String, i64>,
    mailboxes: HashMap<String, i64>,
}

impl SessionValidator {
    pub fn new(key: VerifyKey, audience: Option<&str>) -> anyhow::Result<Self> {
        let (key, alg) = match key {
            VerifyKey::Secret(s) => (DecodingKey::from_secret(&s), Algorithm::HS256),
            VerifyKey::PublicPem(pem) => match DecodingKey::from_ed_pem(&pem) {
                Ok(k) => (k, Algorithm::EdDSA),
                Err(_) => (
                    DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                        anyhow::anyhow!("public key is neither an Ed25519 nor an RSA PEM key: {e}")
                    })?,
                    Algorithm::RS256,
                ),
            },
        };
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
        Ok(SessionValidator {
            key,
            validation,
            revoked: RwLock::default(),
        })
    }

    /// Check a token and the revocations in force.
    pub fn validate(&self, token: &str) -> Result<Session, SessionError> {
        use jsonwebtoken::errors::ErrorKind;
        if token.is_empty() {
            return Err(SessionError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => SessionError::Expired,
                ErrorKind::InvalidAudience => SessionError::WrongAudience,
                ErrorKind::MissingRequiredClaim(c) if c == "sub" => {
                    SessionError::MissingClaim("sub")
                }
                ErrorKind::MissingRequiredClaim(_) => SessionError::MissingClaim("exp"),
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::InvalidKeyFormat => SessionError::BadSignature,
                _ => SessionError::Malformed,
            },
        )?;
        let claims = data.claims;
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
}
