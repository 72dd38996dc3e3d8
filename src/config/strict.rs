//! Strict parsing that keeps going: an unknown key is recorded with its
//! line, column and the keys that were expected there, skipped, and the
//! rest of the file is read on, so one `sluice check` reports every
//! unknown key of a file together with its other problems.
//!
//! The raw structs keep `deny_unknown_fields` (a parse without this
//! wrapper still stops at the first unknown key); [`parse`] wraps
//! serde-saphyr's deserializer and filters each struct's keys against the
//! field names serde gives `deserialize_struct`, before the struct sees
//! them. Hand-written because `serde_ignored`, the crate for this, reports
//! a key path only: neither its line and column nor the expected keys.
//!
//! Called by `config` for `gateway.yaml` and every rule file.

use std::cell::RefCell;
use std::fmt;

use serde::de::{
    self, Deserialize, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess,
    IntoDeserializer, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde_saphyr::{Location, Spanned};

/// A key no struct of the config model has, where it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownKey {
    /// The key's position.
    pub at: Location,
    /// The key as written.
    pub key: String,
    /// The keys allowed in that mapping.
    pub expected: &'static [&'static str],
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The same words serde-saphyr uses when it stops at the key.
        write!(
            f,
            "unknown field `{}`, expected one of {}",
            self.key,
            self.expected.join(", ")
        )
    }
}

/// Parses `text` as `T`, skipping (and returning) every unknown key of
/// every struct; any other error stops the parse, as serde would.
pub fn parse<T: DeserializeOwned>(text: &str) -> Result<(T, Vec<UnknownKey>), serde_saphyr::Error> {
    let found = RefCell::new(Vec::new());
    let value = serde_saphyr::with_deserializer_from_str(text, |de| {
        T::deserialize(Collect { de, found: &found })
    })?;
    Ok((value, found.into_inner()))
}

/// Where unknown keys are recorded while a document is read.
type Found = RefCell<Vec<UnknownKey>>;

/// A deserializer that hands every visitor a [`Wrap`].
struct Collect<'c, D> {
    de: D,
    found: &'c Found,
}

/// A visitor whose maps filter their keys when `fields` is set (it came
/// from `deserialize_struct`), and whose nested values are collected too.
struct Wrap<'c, V> {
    visitor: V,
    found: &'c Found,
    fields: Option<&'static [&'static str]>,
}

impl<'c, V> Wrap<'c, V> {
    fn new(visitor: V, found: &'c Found) -> Self {
        Self {
            visitor,
            found,
            fields: None,
        }
    }
}

/// A seed whose deserializer is collected.
struct Seed<'c, S> {
    seed: S,
    found: &'c Found,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Collect {
            de,
            found: self.found,
        })
    }
}

macro_rules! forward_deserialize {
    ($($method:ident)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
                self.de.$method(Wrap::new(visitor, self.found))
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Collect<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
        deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
        deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
        deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
        deserialize_option deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_unit_struct(name, Wrap::new(visitor, self.found))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        // The name is passed on as is: serde-saphyr's `Spanned` is a
        // newtype struct it recognises by name.
        self.de
            .deserialize_newtype_struct(name, Wrap::new(visitor, self.found))
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_tuple(len, Wrap::new(visitor, self.found))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_tuple_struct(name, len, Wrap::new(visitor, self.found))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let wrap = Wrap {
            visitor,
            found: self.found,
            fields: Some(fields),
        };
        self.de.deserialize_struct(name, fields, wrap)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        self.de
            .deserialize_enum(name, variants, Wrap::new(visitor, self.found))
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty))*) => {
        $(
            fn $method<E: de::Error>(self, v: $ty) -> Result<V::Value, E> {
                self.visitor.$method(v)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.visitor.expecting(f)
    }

    forward_visit! {
        visit_bool(bool) visit_i8(i8) visit_i16(i16) visit_i32(i32) visit_i64(i64)
        visit_i128(i128) visit_u8(u8) visit_u16(u16) visit_u32(u32) visit_u64(u64)
        visit_u128(u128) visit_f32(f32) visit_f64(f64) visit_char(char)
        visit_str(&str) visit_borrowed_str(&'de str) visit_string(String)
        visit_bytes(&[u8]) visit_borrowed_bytes(&'de [u8]) visit_byte_buf(Vec<u8>)
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.visitor.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_some(Collect {
            de,
            found: self.found,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<V::Value, D::Error> {
        self.visitor.visit_newtype_struct(Collect {
            de,
            found: self.found,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_seq(Seq {
            seq,
            found: self.found,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(Map {
            map,
            found: self.found,
            fields: self.fields,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_enum(Enum {
            data,
            found: self.found,
        })
    }
}

/// A sequence whose elements are collected.
struct Seq<'c, A> {
    seq: A,
    found: &'c Found,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<'_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        self.seq.next_element_seed(Seed {
            seed,
            found: self.found,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.seq.size_hint()
    }
}

/// A mapping; a struct's (`fields` set) passes on only the keys it has.
struct Map<'c, A> {
    map: A,
    found: &'c Found,
    fields: Option<&'static [&'static str]>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(fields) = self.fields else {
            return self.map.next_key_seed(Seed {
                seed,
                found: self.found,
            });
        };
        // Bounded by the mapping's own length: each turn consumes an entry.
        loop {
            let Some(key) = self.map.next_key::<Key>()? else {
                return Ok(None);
            };
            if fields.contains(&key.name.as_str()) {
                let name: de::value::StringDeserializer<A::Error> = key.name.into_deserializer();
                return seed.deserialize(name).map(Some);
            }
            self.found.borrow_mut().push(UnknownKey {
                at: key.at,
                key: key.name,
                expected: fields,
            });
            self.map.next_value::<de::IgnoredAny>()?;
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.map.next_value_seed(Seed {
            seed,
            found: self.found,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// A struct's key and where it was written: serde-saphyr gives keys of
/// YAML mappings a location through [`Spanned`]; the structs it makes up
/// itself (a `Spanned`'s own `Location`) have plain string keys, read
/// with no location.
struct Key {
    name: String,
    at: Location,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Key, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key {
                    name: v.to_string(),
                    at: Location::UNKNOWN,
                })
            }
            fn visit_newtype_struct<D: Deserializer<'de>>(self, de: D) -> Result<Key, D::Error> {
                let key = Spanned::<String>::deserialize(Reentered(de))?;
                Ok(Key {
                    name: key.value,
                    at: key.referenced,
                })
            }
        }
        // `Spanned`'s own request, answered below by reading the key through
        // `Spanned` itself (so its locations are serde-saphyr's own).
        de.deserialize_newtype_struct(SPANNED, KeyVisitor)
    }
}

/// The newtype name serde-saphyr answers with a location (`Spanned` asks
/// for it; a deserializer that does not know it ignores the name).
const SPANNED: &str = "__yaml_spanned";

/// The deserializer serde-saphyr handed a newtype visitor, presented to
/// [`Spanned`] as though it had been asked for the newtype again.
struct Reentered<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Reentered<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        visitor.visit_newtype_struct(self.0)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple tuple_struct map struct
        enum identifier ignored_any
    }
}

/// An enum whose variant's content is collected.
struct Enum<'c, A> {
    data: A,
    found: &'c Found,
}

impl<'de, 'c, A: EnumAccess<'de>> EnumAccess<'de> for Enum<'c, A> {
    type Error = A::Error;
    type Variant = Variant<'c, A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<(T::Value, Self::Variant), A::Error> {
        let (value, variant) = self.data.variant_seed(seed)?;
        Ok((
            value,
            Variant {
                variant,
                found: self.found,
            },
        ))
    }
}

/// One variant's content, collected.
struct Variant<'c, A> {
    variant: A,
    found: &'c Found,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<'_, A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.variant.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.variant.newtype_variant_seed(Seed {
            seed,
            found: self.found,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.variant
            .tuple_variant(len, Wrap::new(visitor, self.found))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        let wrap = Wrap {
            visitor,
            found: self.found,
            fields: Some(fields),
        };
        self.variant.struct_variant(fields, wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[serde(default)]
        a: Option<Spanned<i64>>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        #[serde(default)]
        inner: Option<Spanned<Inner>>,
        #[serde(default)]
        list: Vec<Spanned<Inner>>,
        #[serde(default)]
        name: Option<String>,
    }

    #[test]
    fn every_unknown_key_is_collected_with_its_place_and_the_rest_is_read() {
        let text =
            "typo: 1\ninner:\n  a: 5\n  b: { deep: [1, 2] }\nlist:\n  - { a: 1, c: 2 }\nname: x\n";
        let (outer, unknown) = parse::<Outer>(text).expect("parses");
        let got: Vec<(u64, u64, &str)> = unknown
            .iter()
            .map(|u| (u.at.line(), u.at.column(), u.key.as_str()))
            .collect();
        assert_eq!(got, [(1, 1, "typo"), (4, 3, "b"), (6, 13, "c")]);
        assert_eq!(
            unknown[0].to_string(),
            "unknown field `typo`, expected one of inner, list, name"
        );
        // Known keys after the unknown ones keep their values and places.
        let a = outer.inner.and_then(|i| i.value.a).expect("inner.a");
        assert_eq!((a.value, a.referenced.line()), (5, 3));
        assert_eq!(outer.list[0].value.a.as_ref().map(|a| a.value), Some(1));
        assert_eq!(outer.name.as_deref(), Some("x"));
    }

    #[test]
    fn other_errors_still_stop_the_parse() {
        let err = parse::<Outer>("x: 1\ninner: { a: lots }\n")
            .map(|_| ())
            .unwrap_err();
        let at = err.location().map(|l| (l.line(), l.column()));
        assert_eq!(at, Some((2, 13)), "{err}");
    }
}
