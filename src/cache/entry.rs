//! One cached answer: status, the headers kept to replay it, the body,
//! and when it was made (wall clock, so every node and the Redis tier
//! agree on its age); its freshness at a given instant; its weight in the
//! memory tier; and its byte form in the Redis tier.
//!
//! The byte form is hand-written (a versioned, length-prefixed layout of
//! a dozen lines) rather than a serde format crate: the body is stored as
//! is, without the escaping or copying a text format would add, and the
//! decoder refuses anything it does not recognise.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode};
use pingora_http::ResponseHeader;

/// A stored answer.
#[derive(Debug)]
pub struct Entry {
    /// The path it answers (purges go by path prefix).
    pub path: Box<str>,
    /// Status and the headers replayed with it (no hop-by-hop headers, no
    /// `Content-Length`, `Age` or `X-Sluice-*`: those are written per answer).
    pub header: ResponseHeader,
    /// The body.
    pub body: Bytes,
    /// When its age was zero, ms since the epoch (the backend's `Age`
    /// counted in).
    pub born_ms: u64,
    /// How long it is fresh.
    pub fresh_for: Duration,
    /// After that, how long it serves while one refresh runs.
    pub stale_while_revalidate: Duration,
    /// After that, how long it serves while the backend fails.
    pub stale_if_error: Duration,
    /// A marker that the key's answers are not cacheable (too big): its
    /// requests go straight to the backend until it expires.
    pub pass: bool,
}

/// How an entry may serve now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Within `ttl`.
    Fresh,
    /// Past it, within `stale_while_revalidate`: serve, refresh behind.
    Revalidate,
    /// Past both: only a failing backend makes it servable again (within
    /// `stale_if_error`).
    Stale,
}

/// Entries carry this much beyond their bytes in the memory tier (the
/// `Arc`, the header map, moka's node): an estimate that keeps a flood of
/// tiny answers within the bound too.
const OVERHEAD: usize = 256;

/// The Redis byte form's version tag.
const MAGIC: &[u8; 4] = b"SLC1";

impl Entry {
    /// Its age at `now_ms`.
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.born_ms))
    }

    /// How it may serve at `now_ms`.
    pub fn freshness(&self, now_ms: u64) -> Freshness {
        let age = self.age(now_ms);
        if age < self.fresh_for {
            Freshness::Fresh
        } else if age < self.fresh_for + self.stale_while_revalidate {
            Freshness::Revalidate
        } else {
            Freshness::Stale
        }
    }

    /// Whether it may stand in for a failing backend at `now_ms`.
    pub fn serves_on_error(&self, now_ms: u64) -> bool {
        !self.pass && self.age(now_ms) < self.fresh_for + self.stale_if_error
    }

    /// How long it is worth keeping from `now_ms` on (then it expires).
    pub fn remaining(&self, now_ms: u64) -> Duration {
        let life = self.fresh_for + self.stale_while_revalidate.max(self.stale_if_error);
        life.saturating_sub(self.age(now_ms))
    }

    /// Its weight in the memory tier, in bytes (at most `u32::MAX`).
    pub fn weight(&self, key: &str) -> u32 {
        let headers: usize = self
            .header
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let total = OVERHEAD + key.len() + self.path.len() + headers + self.body.len();
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// The validator `If-None-Match` is compared with.
    pub fn etag(&self) -> Option<&HeaderValue> {
        self.header.headers.get(http::header::ETAG)
    }

    /// The date `If-Modified-Since` is compared with.
    pub fn last_modified(&self) -> Option<&HeaderValue> {
        self.header.headers.get(http::header::LAST_MODIFIED)
    }

    /// The Redis byte form.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(64 + self.body.len());
        out.put_slice(MAGIC);
        out.put_u64(self.born_ms);
        for d in [
            self.fresh_for,
            self.stale_while_revalidate,
            self.stale_if_error,
        ] {
            out.put_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        out.put_u16(self.header.status.as_u16());
        let headers: Vec<_> = self.header.headers.iter().collect();
        out.put_u16(u16::try_from(headers.len()).unwrap_or(u16::MAX));
        for (name, value) in headers.into_iter().take(usize::from(u16::MAX)) {
            put_bytes(&mut out, name.as_str().as_bytes());
            put_bytes(&mut out, value.as_bytes());
        }
        put_bytes(&mut out, self.path.as_bytes());
        put_bytes(&mut out, &self.body);
        out.freeze()
    }

    /// An entry from its Redis byte form; `None` when the bytes are not
    /// one this version wrote.
    pub fn decode(mut b: Bytes) -> Option<Entry> {
        // Magic, four u64 and two u16 come before the first length prefix.
        if b.len() < MAGIC.len() + 4 * 8 + 2 * 2 || &b[..4] != MAGIC {
            return None;
        }
        b.advance(MAGIC.len());
        let born_ms = b.get_u64();
        let mut ms = || Duration::from_millis(b.get_u64());
        let (fresh_for, stale_while_revalidate, stale_if_error) = (ms(), ms(), ms());
        let status = StatusCode::from_u16(b.get_u16()).ok()?;
        let count = b.get_u16();
        let mut header = ResponseHeader::build(status, Some(usize::from(count))).ok()?;
        for _ in 0..count {
            let name = HeaderName::from_bytes(&take_bytes(&mut b)?).ok()?;
            let value = HeaderValue::from_maybe_shared(take_bytes(&mut b)?).ok()?;
            header.append_header(name, value).ok()?;
        }
        let path = String::from_utf8(take_bytes(&mut b)?.to_vec()).ok()?;
        let body = take_bytes(&mut b)?;
        b.is_empty().then_some(Entry {
            path: path.into_boxed_str(),
            header,
            body,
            born_ms,
            fresh_for,
            stale_while_revalidate,
            stale_if_error,
            pass: false,
        })
    }
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    out.put_u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.put_slice(&b[..b.len().min(u32::MAX as usize)]);
}

fn take_bytes(b: &mut Bytes) -> Option<Bytes> {
    if b.len() < 4 {
        return None;
    }
    let n = b.get_u32() as usize;
    (b.len() >= n).then(|| b.split_to(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut header = ResponseHeader::build(200, None).expect("header");
        header
            .append_header("content-type", "application/json")
            .expect("ct");
        header.append_header("etag", "\"v1\"").expect("etag");
        Entry {
            path: "/api/goods/1".into(),
            header,
            body: Bytes::from_static(b"{\"id\":1}"),
            born_ms: 1_000,
            fresh_for: Duration::from_secs(2),
            stale_while_revalidate: Duration::from_secs(10),
            stale_if_error: Duration::from_secs(300),
            pass: false,
        }
    }

    #[test]
    fn freshness_follows_the_windows() {
        let e = entry();
        assert_eq!(e.freshness(1_000), Freshness::Fresh);
        assert_eq!(e.freshness(2_999), Freshness::Fresh);
        assert_eq!(e.freshness(3_000), Freshness::Revalidate);
        assert_eq!(e.freshness(13_000), Freshness::Stale);
        assert!(e.serves_on_error(300_000));
        assert!(!e.serves_on_error(303_000));
        assert_eq!(e.remaining(1_000), Duration::from_secs(302));
        assert_eq!(e.remaining(400_000), Duration::ZERO);
        // A clock that went back reads as age 0, never a panic.
        assert_eq!(e.age(0), Duration::ZERO);
    }

    #[test]
    fn the_redis_form_round_trips_and_refuses_garbage() {
        let e = entry();
        let back = Entry::decode(e.encode()).expect("decodes");
        assert_eq!(back.path, e.path);
        assert_eq!(back.header.status, e.header.status);
        assert_eq!(back.etag(), e.etag());
        assert_eq!(
            back.header.headers.get("content-type"),
            e.header.headers.get("content-type")
        );
        assert_eq!(back.body, e.body);
        assert_eq!(
            (back.born_ms, back.fresh_for, back.stale_if_error),
            (e.born_ms, e.fresh_for, e.stale_if_error)
        );
        let bytes = e.encode();
        for cut in [0, 3, 10, 40, bytes.len() - 1] {
            assert!(Entry::decode(bytes.slice(..cut)).is_none(), "cut at {cut}");
        }
        let mut longer = BytesMut::from(&bytes[..]);
        longer.put_u8(0);
        assert!(Entry::decode(longer.freeze()).is_none());
        assert!(Entry::decode(Bytes::from_static(
            b"SLC0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        ))
        .is_none());
    }
}
