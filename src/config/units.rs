//! Human units in config values: durations (`250ms`, `3s`, `10m`) and byte
//! sizes (`64KiB`, `16MiB`, or a plain integer of bytes).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as an integer and a unit: `ms`, `s`, `m` or `h`.
/// A malformed value is kept as its error, so validation can report it
/// with its location and go on checking the rest of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigDuration(pub Result<Duration, String>);

/// Parses `250ms`, `3s`, `10m`, `1h`; a bare number is refused because the
/// unit would be a guess.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || {
        format!("invalid duration {text:?}: expected a whole number followed by ms, s, m or h (like 250ms or 3s)")
    };
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let secs_per = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad()),
    };
    n.checked_mul(secs_per)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = ConfigDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration like 250ms or 3s")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration(parse_duration(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration(Err(format!(
                    "invalid duration {v}: needs a unit, like {v}s or {v}ms"
                ))))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration(parse_duration(&v.to_string())))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration(parse_duration(&v.to_string())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ConfigDuration, E> {
                Ok(ConfigDuration(parse_duration(&v.to_string())))
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// A size in bytes: an integer, or an integer with `B`, `KiB`, `MiB` or
/// `GiB`. Like [`ConfigDuration`], a malformed value is kept as its error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteSize(pub Result<u64, String>);

/// Parses `65536`, `64KiB`, `16MiB`, `1GiB`.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || format!("invalid size {text:?}: expected bytes like 65536, 64KiB or 16MiB");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(bad)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size in bytes, like 65536 or 64KiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(Ok(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                Ok(ByteSize(u64::try_from(v).map_err(|_| {
                    format!("invalid size {v}: must not be negative")
                })))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Ok(ByteSize(parse_byte_size(&v.to_string())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                Ok(ByteSize(parse_byte_size(v)))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("3s", Duration::from_secs(3)),
            ("10m", Duration::from_secs(600)),
            ("2h", Duration::from_secs(7200)),
            ("0s", Duration::ZERO),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "3",
            "s",
            "3 sec",
            "1.5s",
            "-1s",
            "3S",
            "99999999999999999999h",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.starts_with("invalid duration"), "{bad}: {err}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("65536"), Ok(65536));
        assert_eq!(parse_byte_size("64KiB"), Ok(65536));
        assert_eq!(parse_byte_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        for bad in ["", "KiB", "64kb", "1.5MiB", "64 PiB"] {
            assert!(parse_byte_size(bad).is_err(), "{bad}");
        }
    }
}
