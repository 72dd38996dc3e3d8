//! Path templates like `/api/seckill/{sku}/order`: literal segments and
//! whole-segment captures, matched against a request's canonical path
//! (`rules::canonical`) per the rule's [`Spelling`], and rendered back
//! into the path the backend receives.

use super::canonical::{percent_normalize, Fold, NormalPath, Spelling};

/// One segment of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// A literal, in canonical form (see `canonical::percent_normalize`).
    Literal(String),
    Capture(String),
}

/// A compiled path template and how it treats other spellings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
    trailing_slash: bool,
    spelling: Spelling,
}

impl PathTemplate {
    /// Compiles a template with the default [`Spelling`]; the error
    /// message names the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path template {text:?} must start with '/'"));
        };
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        // A trailing slash is part of the rule's spelling; the root has none.
        let (body, trailing_slash) = match rest.strip_suffix('/') {
            Some(body) => (body, true),
            None => (rest, false),
        };
        let pieces = if rest.is_empty() {
            None
        } else {
            Some(body.split('/'))
        };
        for seg in pieces.into_iter().flatten() {
            if seg.contains('?') || seg.contains('#') {
                return Err(format!(
                    "path template {text:?} must not contain a query or fragment"
                ));
            }
            if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let valid = !inner.is_empty()
                    && inner.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(format!(
                        "path template {text:?}: capture {{{inner}}} must be a name of letters, digits and _"
                    ));
                }
                if names.contains(&inner) {
                    return Err(format!(
                        "path template {text:?}: capture {{{inner}}} appears twice"
                    ));
                }
                names.push(inner);
                segments.push(Segment::Capture(inner.to_string()));
            } else if seg.contains('{') || seg.contains('}') {
                return Err(format!(
                    "path template {text:?}: a capture must be a whole segment, like /{{sku}}/"
                ));
            } else {
                let literal =
                    canonical_literal(seg).map_err(|e| format!("path template {text:?}: {e}"))?;
                segments.push(Segment::Literal(literal));
            }
        }
        Ok(Self {
            text: text.to_string(),
            segments,
            trailing_slash,
            spelling: Spelling::DEFAULT,
        })
    }

    /// The same template with other spelling options.
    pub fn with_spelling(mut self, spelling: Spelling) -> Self {
        self.spelling = spelling;
        self
    }

    /// How the template treats other spellings.
    pub fn spelling(&self) -> &Spelling {
        &self.spelling
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the template has a capture of this name.
    pub fn has_capture(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) if n == name))
    }

    /// Matches a canonical path (normalized with this template's
    /// `params` option); on success returns the captured values in
    /// template order as `(name, value)`.
    pub fn matches<'p>(&self, path: &'p NormalPath) -> Option<Vec<(&str, &'p str)>> {
        let mut captures = Vec::new();
        let mut parts = path.segments();
        let last = self.segments.len().saturating_sub(1);
        for (i, seg) in self.segments.iter().enumerate() {
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) => {
                    if !self.literal_matches(lit, part, i == last) {
                        return None;
                    }
                }
                // Never empty: the canonical form has no empty segment.
                Segment::Capture(name) => captures.push((name.as_str(), part)),
            }
        }
        if parts.next().is_some() {
            return None;
        }
        if self.spelling.trailing_slash == Fold::Strict
            && path.trailing_slash() != self.trailing_slash
        {
            return None;
        }
        Some(captures)
    }

    /// Whether a path that is already canonical (`canonical::is_canonical`)
    /// is exactly this template: literals byte for byte, a capture per
    /// segment, the trailing slash as written. Allocates nothing, so the
    /// read cache can try every pass-through GET against its rules.
    pub fn matches_exactly(&self, path: &str) -> bool {
        let body = path.get(1..).unwrap_or_default();
        let (body, trailing) = match body.strip_suffix('/') {
            Some(b) => (b, true),
            None => (body, false),
        };
        if trailing != self.trailing_slash && !body.is_empty() {
            return false;
        }
        let mut parts = body.split('/').filter(|s| !s.is_empty());
        for seg in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            if let Segment::Literal(lit) = seg {
                if lit != part {
                    return false;
                }
            }
        }
        parts.next().is_none()
    }

    /// The rule's own spelling of a path it matched: its literals as
    /// written (in canonical form), the captures, its trailing slash.
    pub fn render(&self, captures: &[(&str, &str)]) -> String {
        let mut values = captures.iter().map(|(_, v)| *v);
        // Sized once: grown push by push, the reallocations cost more
        // than the copying (callgrind).
        let size = self
            .segments
            .iter()
            .map(|seg| match seg {
                Segment::Literal(lit) => lit.len() + 1,
                Segment::Capture(_) => 1,
            })
            .sum::<usize>()
            + captures.iter().map(|(_, v)| v.len()).sum::<usize>()
            + 1;
        let mut out = String::with_capacity(size);
        for seg in &self.segments {
            out.push('/');
            match seg {
                Segment::Literal(lit) => out.push_str(lit),
                Segment::Capture(_) => out.push_str(values.next().unwrap_or_default()),
            }
        }
        if out.is_empty() || self.trailing_slash {
            out.push('/');
        }
        out
    }

    /// Whether a request segment is this literal, per case and suffix.
    fn literal_matches(&self, lit: &str, part: &str, last: bool) -> bool {
        let ci = self.spelling.case == Fold::Ignore;
        if same_text(lit, part, ci) {
            return true;
        }
        last && self.spelling.suffix == Fold::Ignore && has_suffix(part, lit, ci)
    }

    /// Whether two templates can match the same path (ambiguous rules),
    /// with their spelling options.
    pub fn overlaps(&self, other: &PathTemplate) -> bool {
        if self.segments.len() != other.segments.len() {
            return false;
        }
        let slash_strict = self.spelling.trailing_slash == Fold::Strict
            && other.spelling.trailing_slash == Fold::Strict;
        if slash_strict && self.trailing_slash != other.trailing_slash {
            return false;
        }
        let ci = self.spelling.case == Fold::Ignore || other.spelling.case == Fold::Ignore;
        let last = self.segments.len().saturating_sub(1);
        self.segments
            .iter()
            .zip(&other.segments)
            .enumerate()
            .all(|(i, pair)| match pair {
                (Segment::Literal(a), Segment::Literal(b)) => {
                    same_text(a, b, ci)
                        || (i == last
                            && ((self.spelling.suffix == Fold::Ignore && has_suffix(b, a, ci))
                                || (other.spelling.suffix == Fold::Ignore && has_suffix(a, b, ci))))
                }
                _ => true,
            })
    }
}

fn same_text(a: &str, b: &str, ignore_case: bool) -> bool {
    if ignore_case {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// Whether `part` is `lit` followed by a `.` suffix (`order.json`).
fn has_suffix(part: &str, lit: &str, ignore_case: bool) -> bool {
    part.as_bytes().get(lit.len()) == Some(&b'.')
        && part
            .get(..lit.len())
            .is_some_and(|p| same_text(p, lit, ignore_case))
}

/// A template's literal segment in canonical form, or why it cannot be
/// one: a route is written once, in the spelling the backend expects.
fn canonical_literal(seg: &str) -> Result<String, String> {
    if seg.is_empty() {
        return Err("empty segment (//): write each slash once".into());
    }
    if seg.contains(';') {
        return Err("';' starts path parameters, which are not part of a route".into());
    }
    let bytes = seg.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        let allowed =
            !b.is_ascii() || b.is_ascii_alphanumeric() || b"-._~!$&'()*+,=:@%".contains(&b);
        if !allowed {
            return Err(format!(
                "character {:?} must be percent-encoded",
                char::from(b)
            ));
        }
        let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
        if b == b'%' && !(hex(i + 1) && hex(i + 2)) {
            return Err("'%' must start an escape like %2F".into());
        }
    }
    let literal = percent_normalize(seg).into_owned();
    if literal == "." || literal == ".." {
        return Err("dot segments (. and ..) are not allowed".into());
    }
    Ok(literal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::canonical::{normalize, Variants};

    /// Matches `path` the way the rule set does: normalized with the
    /// template's `params` option first.
    fn m(t: &PathTemplate, path: &str) -> Option<Vec<(String, String)>> {
        let n = normalize(path, t.spelling().params);
        t.matches(&n).map(|c| {
            c.into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
    }

    fn caps(pairs: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    const STRICT: Spelling = Spelling {
        variants: Variants::Forward,
        case: Fold::Strict,
        trailing_slash: Fold::Strict,
        params: Fold::Strict,
        suffix: Fold::Strict,
    };

    #[test]
    fn matches_and_captures() {
        let t = PathTemplate::parse("/api/seckill/{sku}/order").expect("valid");
        assert_eq!(m(&t, "/api/seckill/p100/order"), caps(&[("sku", "p100")]));
        // Merged slashes leave three segments: another path.
        assert_eq!(m(&t, "/api/seckill//order"), None);
        assert_eq!(m(&t, "/api/seckill/p100"), None);
        assert_eq!(m(&t, "/api/other/p100/order"), None);
        assert!(t.has_capture("sku"));
        assert!(!t.has_capture("user"));
    }

    #[test]
    fn other_spellings_match_by_default_and_render_the_rules_own() {
        let t = PathTemplate::parse("/api/seckill/{sku}/order").expect("valid");
        for spelling in [
            "/api/seckill/p100/order/",
            "//api//seckill/p100///order",
            "/api/./seckill/x/../p100/order",
            "/api/seckill/%70100/order",
            "/%61pi/seckill/p100/order",
            "/api/seckill/p100;x=1/order;jsessionid=ABC",
            "/api/seckill/p100/order.json",
            "/API/SecKill/p100/ORDER",
            "/api/seckill/p100/order/..;/order",
        ] {
            let got = m(&t, spelling);
            assert_eq!(got, caps(&[("sku", "p100")]), "{spelling}");
            let captures: Vec<(&str, &str)> = got
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(t.render(&captures), "/api/seckill/p100/order");
        }
        // Captures keep their case and take no suffix off.
        assert_eq!(
            m(&t, "/api/seckill/P100.json/order"),
            caps(&[("sku", "P100.json")])
        );
    }

    #[test]
    fn strict_options_keep_spellings_apart() {
        let t = PathTemplate::parse("/api/seckill/{sku}/order")
            .expect("valid")
            .with_spelling(STRICT);
        assert_eq!(m(&t, "/api/seckill/p1/order"), caps(&[("sku", "p1")]));
        for other in [
            "/api/seckill/p1/order/",
            "/api/seckill/p1/order;jsessionid=1",
            "/api/seckill/p1/order.json",
            "/API/seckill/p1/order",
        ] {
            assert_eq!(m(&t, other), None, "{other}");
        }
        // The RFC 3986 steps are never optional.
        assert_eq!(
            m(&t, "//api/./seckill/x/../%70%31/order"),
            caps(&[("sku", "p1")])
        );
    }

    #[test]
    fn a_trailing_slash_is_part_of_the_rules_spelling() {
        let t = PathTemplate::parse("/api/order/").expect("valid");
        assert_eq!(m(&t, "/api/order"), caps(&[]));
        assert_eq!(t.render(&[]), "/api/order/");
        let strict = t.clone().with_spelling(STRICT);
        assert_eq!(m(&strict, "/api/order"), None);
        assert_eq!(m(&strict, "/api/order/"), caps(&[]));
        let root = PathTemplate::parse("/").expect("valid");
        assert_eq!(m(&root, "/"), caps(&[]));
        assert_eq!(m(&root, "/./"), caps(&[]));
        assert_eq!(root.render(&[]), "/");
    }

    #[test]
    fn literals_are_kept_in_canonical_form() {
        let t = PathTemplate::parse("/api/%7euser/%e7%a7%92").expect("valid");
        assert_eq!(t.render(&[]), "/api/~user/%E7%A7%92");
        // Raw UTF-8 and its escapes are one path.
        assert_eq!(m(&t, "/api/~user/秒"), caps(&[]));
        assert_eq!(m(&t, "/api/%7Euser/%E7%A7%92"), caps(&[]));
    }

    #[test]
    fn literal_template() {
        let t = PathTemplate::parse("/buy").expect("valid");
        assert_eq!(m(&t, "/buy"), caps(&[]));
        assert_eq!(m(&t, "/buy/x"), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for (bad, why) in [
            ("api/x", "must start with '/'"),
            ("/a/{}/b", "must be a name"),
            ("/a/{s-k}/b", "must be a name"),
            ("/a/x{sku}/b", "whole segment"),
            ("/a/{sku}/{sku}", "appears twice"),
            ("/a?x=1", "query or fragment"),
            ("/a//b", "empty segment"),
            ("//", "empty segment"),
            ("/a/./b", "dot segments"),
            ("/a/%2e%2E/b", "dot segments"),
            ("/a;jsessionid=1/b", "path parameters"),
            ("/a\\b", "percent-encoded"),
            ("/a b", "percent-encoded"),
            ("/a%zz", "escape"),
            ("/a%4", "escape"),
        ] {
            match PathTemplate::parse(bad) {
                Ok(_) => panic!("{bad} was accepted"),
                Err(e) => assert!(e.contains(why), "{bad}: {e}"),
            }
        }
    }

    #[test]
    fn overlap_detection() {
        let p = |t: &str| PathTemplate::parse(t).expect("valid");
        let a = p("/api/{sku}/order");
        assert!(a.overlaps(&p("/api/p1/order")));
        assert!(!a.overlaps(&p("/api/{sku}/cancel")));
        // Spellings the default folds together overlap.
        assert!(p("/api/order").overlaps(&p("/API/Order")));
        assert!(p("/api/order").overlaps(&p("/api/order.json")));
        assert!(p("/api/order").overlaps(&p("/api/order/")));
        assert!(!p("/api/order").overlaps(&p("/api/orders")));
        // ... and strict ones on both sides keep them apart.
        let s = |t: &str| p(t).with_spelling(STRICT);
        assert!(!s("/api/order").overlaps(&s("/API/Order")));
        assert!(!s("/api/order").overlaps(&s("/api/order.json")));
        assert!(!s("/api/order").overlaps(&s("/api/order/")));
        // One lenient side is enough to share a spelling.
        assert!(p("/api/order").overlaps(&s("/api/order.json")));
        assert!(s("/api/order.json").overlaps(&p("/api/order")));
    }
}
