//! A JSON body's top-level object, with the keys that appear in it more
//! than once. serde_json keeps the last of duplicate keys without a word,
//! while other parsers keep the first, so a repeated field must be
//! refused, not guessed. serde_with's `MapPreventDuplicates` rejects any
//! duplicate but cannot say which key, and only the rule's own fields
//! matter (the message must name the field), so this is a small serde
//! visitor over the top level; nested values are serde_json's own (with
//! its recursion limit).

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// The top-level object of a body.
#[derive(Debug, Default)]
pub(super) struct TopLevel {
    /// Every key with its (last) value.
    pub map: Map<String, Value>,
    /// Keys seen more than once, each listed once.
    pub repeated: Vec<String>,
}

impl TopLevel {
    /// Parses a body that must be one JSON object; `None` for anything else
    /// (not JSON, another type, trailing bytes).
    pub fn parse(raw: &[u8]) -> Option<TopLevel> {
        serde_json::from_slice(raw).ok()
    }
}

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(TopLevelVisitor)
    }
}

/// Builds a [`TopLevel`] from a JSON object; anything else is a type error.
struct TopLevelVisitor;

impl<'de> Visitor<'de> for TopLevelVisitor {
    type Value = TopLevel;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<TopLevel, A::Error> {
        let mut top = TopLevel::default();
        // Keys arrive unescaped: `"u\u0069d"` is `uid`, as backends read it.
        while let Some(key) = access.next_key::<String>()? {
            let value: Value = access.next_value()?;
            if top.map.contains_key(&key) && !top.repeated.contains(&key) {
                top.repeated.push(key.clone());
            }
            top.map.insert(key, value);
        }
        Ok(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_parse_with_their_repeated_keys() {
        let top =
            TopLevel::parse(br#"{"a":1,"b":{"a":2,"a":3},"a":4,"c":5,"a":6}"#).expect("an object");
        assert_eq!(top.repeated, ["a"], "nested keys are not top-level ones");
        assert_eq!(top.map["a"], 6);
        let top = TopLevel::parse(br#"{"uid":"x","u\u0069d":"y"}"#).expect("an object");
        assert_eq!(top.repeated, ["uid"], "escaped spellings are the same key");
        let top = TopLevel::parse(b" {} ").expect("an object");
        assert!(top.map.is_empty() && top.repeated.is_empty());
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for raw in [
            &b"[1]"[..],
            b"1",
            b"\"s\"",
            b"null",
            b"{",
            b"{}{}",
            b"{} x",
            b"{\"a\":1,}",
        ] {
            assert!(
                TopLevel::parse(raw).is_none(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        // Deep nesting hits serde_json's recursion limit, never the stack.
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(TopLevel::parse(deep.as_bytes()).is_none());
    }
}
