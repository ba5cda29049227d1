//! Opaque sessions: for webmails whose session id is not a JWT.
//!
//! The webmail registers its sid over the internal API
//! (`POST /internal/v1/sessions`) with the user and a lifetime; the browser
//! then polls with that sid like with a token. Only the SHA-256 of the sid is
//! stored, and it is the session's id (its `jti`) everywhere else: positions,
//! revocations, the session list.
//!
//! A sid that does not look like a JWT (three base64url parts joined by dots)
//! is looked up by its hash. Lookups are cached in memory for a few seconds so
//! that the poll path does not ask the store on every poll; deleting a session
//! on this node drops it from the cache at once, and a lookup that raced the
//! delete is not cached (a generation counter tells). Other nodes of a
//! cluster hear of a registration or a delete through the store's events
//! ([`crate::cluster`]) and forget their entry at once.

use crate::http::error::ApiError;
use crate::session::{Session, SessionError, SessionValidator};
use crate::store::{OpaqueSession, SharedStore, StoreResult};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a found session is served from memory.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// How long an unknown sid is remembered as unknown.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Lookups cached at most.
pub const MAX_CACHED: usize = 50_000;
/// Bounds of a sid's length, in bytes.
pub const MIN_SID_LEN: usize = 16;
pub const MAX_SID_LEN: usize = 1024;
/// The longest lifetime a registration may ask for: 31 days.
pub const MAX_TTL_SECS: u64 = 31 * 24 * 3600;

/// True for a sid shaped like a JWT: three base64url parts, the first two
/// not empty.
pub fn looks_like_jwt(sid: &str) -> bool {
    // On every poll. The bytes are counted, not searched: without an early
    // exit the two loops run on whole vector registers, where `split` and
    // `all` went a byte at a time (about 8 % of the poll thread's
    // instructions under callgrind, for a sid of 250 bytes).
    let bytes = sid.as_bytes();
    let strangers = bytes.iter().filter(|&&b| !is_base64url_or_dot(b)).count();
    let dots = bytes.iter().filter(|&&b| b == b'.').count();
    if strangers != 0 || dots != 2 {
        return false;
    }
    match bytes.iter().position(|&b| b == b'.') {
        Some(header_len) => header_len > 0 && bytes.get(header_len + 1) != Some(&b'.'),
        None => false,
    }
}

/// A byte of base64url, or the dot between a JWT's parts.
fn is_base64url_or_dot(b: u8) -> bool {
    // `b | 0x20` folds upper case onto lower case (and moves nothing else
    // into a–z).
    (b | 0x20).wrapping_sub(b'a') < 26
        || b.wrapping_sub(b'0') < 10
        || b == b'-'
        || b == b'_'
        || b == b'.'
}

/// The hex SHA-256 of a sid: how it is stored and named.
pub fn sid_hash(sid: &str) -> String {
    let digest = Sha256::digest(sid.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// True for a string that can be a sid hash (64 lowercase hex digits).
pub fn is_sid_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why a sid cannot be registered, or `Ok`.
pub fn check_sid(sid: &str) -> Result<(), String> {
    if sid.len() < MIN_SID_LEN || sid.len() > MAX_SID_LEN {
        return Err(format!(
            "must be {MIN_SID_LEN} to {MAX_SID_LEN} bytes long, not {}",
            sid.len()
        ));
    }
    if !sid
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
    {
        return Err("must be printable ASCII without spaces, ';' or ','".into());
    }
    if looks_like_jwt(sid) {
        return Err("looks like a JWT, so polls would check it as one; send JWTs as they are, without registering them".into());
    }
    Ok(())
}

struct Cached {
    found: Option<OpaqueSession>,
    at: Instant,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<String, Cached>,
    /// Bumped by every change; a lookup that saw another value does not cache.
    generation: u64,
}

pub struct OpaqueSessions {
    store: SharedStore,
    cache: Mutex<Cache>,
}

impl OpaqueSessions {
    pub fn new(store: SharedStore) -> Self {
        OpaqueSessions {
            store,
            cache: Mutex::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session behind an opaque sid, or why it is refused.
    pub async fn resolve(
        &self,
        sid: &str,
        validator: &SessionValidator,
        now_ms: i64,
    ) -> Result<Session, ApiError> {
        if sid.is_empty() {
            return Err(SessionError::Missing.into());
        }
        if sid.len() > MAX_SID_LEN {
            return Err(SessionError::Malformed.into());
        }
        let hash = sid_hash(sid);
        let found = self.lookup(&hash).await?;
        let Some(found) = found else {
            return Err(SessionError::Unknown.into());
        };
        if found.expires_ms <= now_ms {
            return Err(SessionError::Expired.into());
        }
        let session = Session {
            key: hash,
            user: found.user,
            start_ms: found.start_ms,
            expires_ms: found.expires_ms,
        };
        if validator.is_revoked(&session) {
            return Err(SessionError::Revoked.into());
        }
        Ok(session)
    }

    async fn lookup(&self, hash: &str) -> StoreResult<Option<OpaqueSession>> {
        let generation = {
            let cache = self.cache();
            if let Some(c) = cache.entries.get(hash) {
                let ttl = if c.found.is_some() {
                    CACHE_TTL
                } else {
                    NEGATIVE_TTL
                };
                if c.at.elapsed() < ttl {
                    return Ok(c.found.clone());
                }
            }
            cache.generation
        };
        let found = self.store.opaque_session(hash).await?;
        let mut cache = self.cache();
        if cache.generation == generation {
            if cache.entries.len() >= MAX_CACHED {
                cache.entries.retain(|_, c| c.at.elapsed() < CACHE_TTL);
                if cache.entries.len() >= MAX_CACHED {
                    cache.entries.clear();
                }
            }
            cache.entries.insert(
                hash.to_owned(),
                Cached {
                    found: found.clone(),
                    at: Instant::now(),
                },
            );
        }
        Ok(found)
    }

    /// Drop what is cached of this hash: the next poll asks the store.
    pub fn forget(&self, hash: &str) {
        let mut cache = self.cache();
        cache.generation += 1;
        cache.entries.remove(hash);
    }

    /// Register `sid` for `user` for `ttl_secs`; returns its hash and the
    /// session as stored.
    pub async fn register(
        &self,
        sid: &str,
        user: &str,
        ttl_secs: u64,
        now_ms: i64,
    ) -> StoreResult<(String, OpaqueSession)> {
        let hash = sid_hash(sid);
        let ttl_ms = i64::try_from(ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let stored = self
            .store
            .register_opaque_session(&hash, user, now_ms, now_ms.saturating_add(ttl_ms))
            .await?;
        self.forget(&hash);
        Ok((hash, stored))
    }

    /// Remove the session with this hash; false when there was none.
    pub async fn delete(&self, hash: &str) -> StoreResult<bool> {
        let result = self.store.delete_opaque_session(hash).await;
        // Forget even on failure: the next poll asks the store again.
        self.forget(hash);
        result
    }

    /// Drop stale cache entries; run now and then.
    pub fn sweep(&self) {
        self.cache()
            .entries
            .retain(|_, c| c.at.elapsed() < CACHE_TTL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counting check says what splitting and searching says, for
    /// every string of up to five characters from an alphabet with each
    /// kind of byte: the parts' characters, the dot, and the bytes just
    /// outside base64url's ranges (`@` and `[` fold onto `` ` `` and `{`).
    #[test]
    fn the_jwt_shape_check_agrees_with_its_definition() {
        fn by_definition(sid: &str) -> bool {
            let parts: Vec<&str> = sid.split('.').collect();
            parts.len() == 3
                && !parts[0].is_empty()
                && !parts[1].is_empty()
                && sid
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        }
        let alphabet = ['a', 'Z', '9', '-', '_', '.', '@', '[', '`', '{', 'é'];
        let mut sids = vec![String::new()];
        let mut longest = vec![String::new()];
        for _ in 0..5 {
            longest = (longest.iter())
                .flat_map(|s| alphabet.iter().map(move |c| format!("{s}{c}")))
                .collect();
            sids.extend(longest.iter().cloned());
        }
        assert!(sids.len() > 170_000);
        for sid in &sids {
            assert_eq!(looks_like_jwt(sid), by_definition(sid), "{sid:?}");
        }
    }

    #[test]
    fn jwt_shaped_sids_are_told_apart_from_opaque_ones() {
        assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"));
        assert!(looks_like_jwt("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhIn0."));
        assert!(!looks_like_jwt("3f9a0c1e-5b7d-4c2a-9e8f-0a1b2c3d4e5f"));
        assert!(!looks_like_jwt("a.b"));
        assert!(!looks_like_jwt("a+b.c/d.e"));
        assert!(!looks_like_jwt(".eyJzdWIiOiJhIn0.c2ln"), "no header");
        assert!(!looks_like_jwt("eyJhbGciOiJub25lIn0..c2ln"), "no claims");
        assert!(!looks_like_jwt("a.b.c.d"), "four parts");
        assert!(!looks_like_jwt("a.b.c\u{e9}"), "not ASCII");
        assert!(check_sid("short").is_err());
        assert!(check_sid("has space in the middle").is_err());
        assert!(check_sid("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln").is_err());
        assert!(check_sid("PHPSESSID-5b7d4c2a9e8f0a1b").is_ok());
    }

    #[test]
    fn the_hash_is_hex_sha256() {
        let h = sid_hash("abc");
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_sid_hash(&h));
        assert!(!is_sid_hash("abc"));
    }
}
