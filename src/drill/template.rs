//! Text with placeholders (`{user}`, `{sku}`, `{n}`, `{qty}`), compiled
//! once and rendered per request into a reused buffer: the drill's hot
//! loop writes its requests without allocating.
//!
//! Anything in braces that is not a known placeholder stays as written, so
//! a JSON body like `{"user":"{user}"}` needs no escaping.

use std::io::Write as _;

/// What a request is rendered from.
#[derive(Clone, Copy, Debug)]
pub struct Vars<'a> {
    /// The user id prefix (`u` in `u17`).
    pub user_prefix: &'a str,
    /// The user's number (1-based).
    pub user: u64,
    /// The sku.
    pub sku: &'a str,
    /// The request's sequence number in the drill (0-based).
    pub n: u64,
    /// Units asked for.
    pub qty: u32,
    /// The user's signed token, when the rule reads a JWT.
    pub token: &'a str,
}

/// One piece of a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text as written.
    Lit(String),
    /// The user id.
    User,
    /// The sku.
    Sku,
    /// The request's sequence number.
    N,
    /// The quantity.
    Qty,
    /// The user's token (only made by a rule-derived plan).
    Token,
}

/// A compiled template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

impl Template {
    /// Compiles `text`: the four placeholders become pieces, the rest is
    /// literal.
    pub fn parse(text: &str) -> Self {
        let mut t = Template::default();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let (before, from) = rest.split_at(open);
            t.lit(before);
            let known = [
                ("{user}", Piece::User),
                ("{sku}", Piece::Sku),
                ("{n}", Piece::N),
                ("{qty}", Piece::Qty),
            ]
            .into_iter()
            .find(|(name, _)| from.starts_with(name));
            match known {
                Some((name, piece)) => {
                    t.pieces.push(piece);
                    rest = &from[name.len()..];
                }
                None => {
                    t.lit("{");
                    rest = &from[1..];
                }
            }
        }
        t.lit(rest);
        t
    }

    /// Appends literal text.
    pub fn lit(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(Piece::Lit(last)) = self.pieces.last_mut() {
            last.push_str(text);
        } else {
            self.pieces.push(Piece::Lit(text.to_string()));
        }
    }

    /// Appends a placeholder.
    pub fn push(&mut self, piece: Piece) {
        match piece {
            Piece::Lit(text) => self.lit(&text),
            other => self.pieces.push(other),
        }
    }

    /// Appends another template.
    pub fn append(&mut self, other: &Template) {
        for p in &other.pieces {
            self.push(p.clone());
        }
    }

    /// Whether the template uses this placeholder.
    pub fn uses(&self, piece: &Piece) -> bool {
        self.pieces.contains(piece)
    }

    /// Whether nothing is in it.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Writes the rendered text at the end of `out`.
    pub fn render(&self, v: &Vars<'_>, out: &mut Vec<u8>) {
        for p in &self.pieces {
            // Writing into a Vec cannot fail.
            let _ = match p {
                Piece::Lit(s) => {
                    out.extend_from_slice(s.as_bytes());
                    Ok(())
                }
                Piece::User => write!(out, "{}{}", v.user_prefix, v.user),
                Piece::Sku => {
                    out.extend_from_slice(v.sku.as_bytes());
                    Ok(())
                }
                Piece::N => write!(out, "{}", v.n),
                Piece::Qty => write!(out, "{}", v.qty),
                Piece::Token => {
                    out.extend_from_slice(v.token.as_bytes());
                    Ok(())
                }
            };
        }
    }

    /// The template as written, placeholders by name (for the report).
    pub fn pattern(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Lit(s) => s.as_str(),
                Piece::User => "{user}",
                Piece::Sku => "{sku}",
                Piece::N => "{n}",
                Piece::Qty => "{qty}",
                Piece::Token => "{token}",
            })
            .collect()
    }

    /// The rendered text as a string (for messages and tests).
    pub fn render_string(&self, v: &Vars<'_>) -> String {
        let mut out = Vec::new();
        self.render(v, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars<'static> {
        Vars {
            user_prefix: "u",
            user: 7,
            sku: "p1",
            n: 41,
            qty: 2,
            token: "t.o.k",
        }
    }

    #[test]
    fn placeholders_are_replaced_and_other_braces_kept() {
        let t = Template::parse(r#"{"user":"{user}","sku":"{sku}","qty":{qty},"n":{n},"x":{y}}"#);
        assert_eq!(
            t.render_string(&vars()),
            r#"{"user":"u7","sku":"p1","qty":2,"n":41,"x":{y}}"#
        );
        assert!(t.uses(&Piece::User) && t.uses(&Piece::N) && !t.uses(&Piece::Token));
    }

    #[test]
    fn a_template_without_placeholders_is_one_literal() {
        let t = Template::parse("/goods/{");
        assert_eq!(t.pieces, vec![Piece::Lit("/goods/{".into())]);
        assert_eq!(t.render_string(&vars()), "/goods/{");
    }
}
