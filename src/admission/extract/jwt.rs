//! HS256 JSON Web Tokens: verify the signature with the rule's secret,
//! honour `exp` and `nbf`, and read one claim. Hand-written rather than a
//! JWT crate because only this one algorithm is accepted (no `alg`
//! confusion possible) and the whole check is twenty lines over `hmac`.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::syntax::Single;
use super::Field;

/// HMAC-SHA256, the MAC of HS256 tokens.
pub(super) type HmacSha256 = Hmac<Sha256>;

/// Verifies the HS256 token in `header` and returns `claim` (absent or
/// `null` gives `Ok(None)`). Messages: missing token, token header sent
/// more than once, token expired, or invalid token, with no further
/// detail. A claim is one value by construction; the header must be too.
pub(super) fn claim(
    field: Field,
    header: &HeaderName,
    claim: &str,
    secret: &[u8],
    headers: &HeaderMap,
) -> Result<Option<Value>, String> {
    let missing = || format!("{field}: missing token in header \"{header}\"");
    let invalid = || format!("{field}: invalid token");
    let value = match super::single_header(headers, header) {
        Single::Absent => return Err(missing()),
        // Two tokens: the backend might check the other one.
        Single::Repeated => {
            return Err(format!("{field}: header \"{header}\" sent more than once"))
        }
        Single::One(v) => v,
    };
    let value = value.to_str().map_err(|_| invalid())?.trim();
    let token = match value.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    };
    if token.is_empty() || token.eq_ignore_ascii_case("bearer") {
        return Err(missing());
    }
    let mut payload = verify_hs256(token, secret).ok_or_else(invalid)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    match payload.get("exp") {
        None | Some(Value::Null) => {}
        Some(Value::Number(exp)) => match exp.as_f64() {
            Some(exp) if now < exp => {}
            Some(_) => return Err(format!("{field}: token expired")),
            None => return Err(invalid()),
        },
        // An expiry we cannot read is not one we can honour.
        Some(_) => return Err(invalid()),
    }
    match payload.get("nbf") {
        None | Some(Value::Null) => {}
        Some(Value::Number(nbf)) if nbf.as_f64().is_some_and(|nbf| nbf <= now) => {}
        Some(_) => return Err(invalid()),
    }
    Ok(payload.remove(claim).filter(|v| !v.is_null()))
}

/// The payload of a well-formed, correctly signed HS256 JWT.
fn verify_hs256(token: &str, secret: &[u8]) -> Option<Map<String, Value>> {
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let Value::Object(head) = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?
    else {
        return None;
    };
    // Only HS256, and no critical extensions we would have to understand.
    if head.get("alg").and_then(Value::as_str) != Some("HS256") || head.contains_key("crit") {
        return None;
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).ok()?;
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(payload.as_bytes());
    // Constant-time comparison.
    mac.verify_slice(&signature).ok()?;
    match serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}
