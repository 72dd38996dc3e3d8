//! How many units an attempt asks for: a whole number from 1 to the
//! rule's `quantity.max`, from text (header, cookie, query, path) or from
//! JSON (a body field or a JWT claim).

use serde_json::Value;

use super::shown_raw;

fn qty_whole(max: u32) -> String {
    format!("quantity: must be a whole number from 1 to {max}")
}

fn qty_over(n: &str, max: u32) -> String {
    format!("quantity: {} is over the maximum of {max}", shown_raw(n))
}

/// A quantity from a header, cookie, query parameter or path: ASCII digits only.
pub(super) fn from_text(s: &str, max: u32) -> Result<u32, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(qty_whole(max));
    }
    let digits = s.trim_start_matches('0');
    if digits.is_empty() {
        return Err(qty_whole(max));
    }
    match digits.parse::<u32>() {
        Ok(n) if n <= max => Ok(n),
        _ => Err(qty_over(digits, max)),
    }
}

/// A quantity from JSON or a JWT claim: a whole number, not a string.
pub(super) fn from_json(v: &Value, max: u32) -> Result<u32, String> {
    let Value::Number(n) = v else {
        return Err(qty_whole(max));
    };
    let value = if let Some(u) = n.as_u64() {
        u
    } else if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 1.0) {
        // `2.0` is a whole number; anything past u64 is over any maximum.
        if f >= u64::MAX as f64 {
            return Err(qty_over(&n.to_string(), max));
        }
        f as u64
    } else {
        return Err(qty_whole(max));
    };
    if value == 0 {
        return Err(qty_whole(max));
    }
    match u32::try_from(value) {
        Ok(q) if q <= max => Ok(q),
        _ => Err(qty_over(&value.to_string(), max)),
    }
}
