//! Path templates like `/api/seckill/{sku}/order`: literal segments and
//! whole-segment captures.

/// One segment of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

/// A compiled path template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathTemplate {
    text: String,
    segments: Vec<Segment>,
}

impl PathTemplate {
    /// Compiles a template; the error message names the problem.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!("path template {text:?} must start with '/'"));
        };
        let mut segments = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for seg in rest.split('/') {
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
                segments.push(Segment::Literal(seg.to_string()));
            }
        }
        Ok(Self {
            text: text.to_string(),
            segments,
        })
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

    /// Matches a request path (without query); on success returns the
    /// captured values in template order as `(name, value)`.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<(&str, &'p str)>> {
        let rest = path.strip_prefix('/')?;
        let mut captures = Vec::new();
        let mut parts = rest.split('/');
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) => {
                    if lit != part {
                        return None;
                    }
                }
                Segment::Capture(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    captures.push((name.as_str(), part));
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(captures)
    }

    /// Whether two templates can match the same path (ambiguous rules).
    pub fn overlaps(&self, other: &PathTemplate) -> bool {
        self.segments.len() == other.segments.len()
            && self
                .segments
                .iter()
                .zip(&other.segments)
                .all(|pair| match pair {
                    (Segment::Literal(a), Segment::Literal(b)) => a == b,
                    _ => true,
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_and_captures() {
        let t = PathTemplate::parse("/api/seckill/{sku}/order").expect("valid");
        assert_eq!(
            t.matches("/api/seckill/p100/order"),
            Some(vec![("sku", "p100")])
        );
        assert_eq!(t.matches("/api/seckill//order"), None);
        assert_eq!(t.matches("/api/seckill/p100/order/"), None);
        assert_eq!(t.matches("/api/seckill/p100"), None);
        assert_eq!(t.matches("/api/other/p100/order"), None);
        assert!(t.has_capture("sku"));
        assert!(!t.has_capture("user"));
    }

    #[test]
    fn literal_template() {
        let t = PathTemplate::parse("/buy").expect("valid");
        assert_eq!(t.matches("/buy"), Some(vec![]));
        assert_eq!(t.matches("/buy/x"), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for bad in [
            "api/x",
            "/a/{}/b",
            "/a/{s-k}/b",
            "/a/x{sku}/b",
            "/a/{sku}/{sku}",
            "/a?x=1",
        ] {
            assert!(PathTemplate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn overlap_detection() {
        let a = PathTemplate::parse("/api/{sku}/order").expect("valid");
        let b = PathTemplate::parse("/api/p1/order").expect("valid");
        let c = PathTemplate::parse("/api/{sku}/cancel").expect("valid");
        assert!(a.overlaps(&b));
        assert!(!a.overlaps(&c));
    }
}
