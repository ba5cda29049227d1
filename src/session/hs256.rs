//! The HS256 check on every poll's path, without jsonwebtoken's generic
//! decode: it decodes and parses the claims twice, and builds the HMAC key
//! for each token. This does each once, with the key built at start, and
//! gives what `jsonwebtoken::decode` gives with the validator's settings
//! (a test in `super` compares the two on tokens of every kind).

use super::{Claims, SessionError, EXP_LEEWAY_SECS};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Header};
use ring::hmac;
use std::sync::OnceLock;

pub(super) struct Hs256 {
    key: hmac::Key,
    /// The audience a token must name, if one is configured.
    audience: Option<String>,
    /// The first header that passed, as it stood in a token whose signature
    /// passed too. An issuer
    /// gives all its tokens the same header, and whether a header passes
    /// depends on nothing else, so a token with this one skips its decode
    /// and parse (a struct of ten optional fields, on every poll).
    passed_header: OnceLock<String>,
}

/// An HS256 signature: 32 bytes.
const SIGNATURE_LEN: usize = 32;

impl Hs256 {
    pub(super) fn new(secret: &[u8], audience: Option<&str>) -> Self {
        Hs256 {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            audience: audience.map(str::to_owned),
            passed_header: OnceLock::new(),
        }
    }

    /// The claims of `token` once its header, signature, `exp`, `sub` and
    /// (when configured) `aud` pass.
    pub(super) fn decode(&self, token: &str, now_secs: i64) -> Result<Claims, SessionError> {
        let (message, signature) = token.rsplit_once('.').ok_or(SessionError::Malformed)?;
        let (header, payload) = message.rsplit_once('.').ok_or(SessionError::Malformed)?;
        let known_header = self.passed_header.get().map(String::as_str) == Some(header);
        if !known_header {
            check_header(header)?;
        }
        let mut tag = [0u8; SIGNATURE_LEN];
        match URL_SAFE_NO_PAD.decode_slice(signature, &mut tag) {
            Ok(SIGNATURE_LEN) => {}
            _ => return Err(SessionError::BadSignature),
        }
        hmac::verify(&self.key, message.as_bytes(), &tag)
            .map_err(|_| SessionError::BadSignature)?;
        if !known_header {
            // Only once signed: a forged token that came first would
            // otherwise have every real one take the long way.
            let _ = self.passed_header.set(header.to_owned());
        }
        let claims: Claims =
            serde_json::from_slice(&decode_part(payload)?).map_err(|_| SessionError::Malformed)?;
        // jsonwebtoken reads `exp` as an unsigned number: a negative one is
        // as good as none.
        if claims.exp < 0 {
            return Err(SessionError::MissingClaim("exp"));
        }
        if claims.sub.is_none() {
            return Err(SessionError::MissingClaim("sub"));
        }
        if self.audience.is_some() && claims.aud.is_none() {
            return Err(SessionError::MissingClaim("aud"));
        }
        if claims.exp < now_secs - EXP_LEEWAY_SECS as i64 {
            return Err(SessionError::Expired);
        }
        if self.audience.is_some() && claims.aud != self.audience {
            return Err(SessionError::WrongAudience);
        }
        Ok(claims)
    }
}

/// A header that decodes to JSON, names HS256 and is otherwise what
/// jsonwebtoken accepts.
fn check_header(header: &str) -> Result<(), SessionError> {
    let header: Header =
        serde_json::from_slice(&decode_part(header)?).map_err(|_| SessionError::Malformed)?;
    match header.alg {
        Algorithm::HS256 => Ok(()),
        _ => Err(SessionError::BadSignature),
    }
}

fn decode_part(part: &str) -> Result<Vec<u8>, SessionError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| SessionError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::tests::signed;
    use serde_json::json;

    #[test]
    fn only_a_signed_token_has_its_header_remembered() {
        let check = Hs256::new(b"right", None);
        let claims = json!({"sub": "a@x", "exp": 4_102_444_800_i64, "iat": 1});
        let forged = signed(
            json!({"alg": "HS256", "kid": "x"}),
            claims.clone(),
            b"wrong",
        );
        assert_eq!(
            check.decode(&forged, 0).unwrap_err(),
            SessionError::BadSignature
        );
        assert_eq!(check.passed_header.get(), None);
        let good = signed(json!({"alg": "HS256", "typ": "JWT"}), claims, b"right");
        assert!(check.decode(&good, 0).is_ok());
        let remembered = good.split('.').next().map(str::to_owned);
        assert_eq!(check.passed_header.get(), remembered.as_ref());
    }
}
