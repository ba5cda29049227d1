//! Reading JSON request bodies with errors that say exactly what is wrong:
//! 415 for a wrong content type, 413 past the size limit, 400 for JSON that
//! does not parse, 422 naming the field for JSON of the wrong shape.

use super::error::ApiError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

/// Parse a JSON body of type `T`.
pub fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType(if mime.is_empty() {
            "Content-Type must be application/json".to_owned()
        } else {
            format!("Content-Type must be application/json, not {mime}")
        }));
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!(
                "request body is larger than {} bytes",
                super::MAX_BODY_BYTES
            ))
        } else {
            ApiError::BadRequest(format!("request body could not be read: {e}"))
        }
    })?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => {
                ApiError::BadRequest(format!("request body is not valid JSON: {inner}"))
            }
            Category::Data if path == "." || path.is_empty() => {
                ApiError::InvalidField(inner.to_string())
            }
            Category::Data => ApiError::InvalidField(format!("{path}: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::BadRequest(format!("request body is not valid JSON: {e}")))?;
    Ok(value)
}
