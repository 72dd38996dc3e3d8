//! The shared vocabulary of Sluice: the small value types that every
//! layer speaks (tickets, sku keys, upstream ids, kept answers, release
//! reasons, store op names) and the one rule for what an id may look
//! like. A leaf: it imports nothing else of the crate, so any module can
//! use it without creating a cycle.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// The longest valid user id or sku, in characters (all ASCII, so also bytes).
pub const MAX_ID_LEN: usize = 128;

/// What a message says an id must be.
pub const ID_SHAPE: &str = "must be 1-128 characters of A-Z a-z 0-9 . _ : -";

/// Whether `s` is a valid user id or sku: 1-128 chars of `[A-Za-z0-9._:-]`.
pub fn valid_id(s: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Index of an upstream in `Config::upstreams`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamId(pub usize);

/// Milliseconds since the epoch, now (wall clock: shared across nodes).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A (rule, sku) pair: the unit of stock.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SkuKey {
    /// Rule name.
    pub rule: Arc<str>,
    /// Sku id (validated: 1-128 of `[A-Za-z0-9._:-]`).
    pub sku: Arc<str>,
}

impl SkuKey {
    /// A key from a rule name and a sku.
    pub fn new(rule: &str, sku: &str) -> Self {
        Self {
            rule: Arc::from(rule),
            sku: Arc::from(sku),
        }
    }
}

impl fmt::Display for SkuKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.rule, self.sku)
    }
}

/// A ticket: 128 random bits, written as 32 lowercase hex characters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId(pub u128);

impl TicketId {
    /// A fresh random ticket.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses 32 lowercase hex characters.
    pub fn parse(s: &str) -> Option<Self> {
        let lower_hex = s.len() == 32
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !lower_hex {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }
}

impl TicketId {
    /// Its 32 lowercase hex characters, on the stack. A winner's ticket
    /// is written into half a dozen keys and headers; `{:032x}` through
    /// the formatter cost more than the rest of each key (callgrind).
    pub fn hex(self) -> TicketHex {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            let nibble = (self.0 >> (124 - 4 * i)) & 0xf;
            *b = DIGITS[nibble as usize];
        }
        TicketHex(out)
    }
}

/// A ticket written out ([`TicketId::hex`]).
#[derive(Clone, Copy)]
pub struct TicketHex([u8; 32]);

impl TicketHex {
    /// The 32 characters.
    pub fn as_str(&self) -> &str {
        // Only hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::ops::Deref for TicketHex {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for TicketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.hex())
    }
}

/// Why units went back to stock (`reason` label of `sluice_released_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    /// The backend could not be connected.
    ConnectError,
    /// The backend timed out.
    Timeout,
    /// The backend answered 5xx.
    Status5xx,
    /// The backend answered 4xx.
    Status4xx,
    /// The client went away before the backend was asked.
    ClientGone,
    /// An operator or the backend released it through the admin API.
    Admin,
    /// No slot was free and the queue was full.
    QueueFull,
    /// Neither committed nor released within its lease (its node died, the
    /// store was unreachable, or it waited in the queue too long).
    LeaseExpired,
    /// `sluice reconcile --apply`: the backend did not place it.
    Reconcile,
    /// A reservation whose reply was lost, undone once it could be read.
    Interrupted,
}

impl ReleaseReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [ReleaseReason; 10] = [
        ReleaseReason::ConnectError,
        ReleaseReason::Timeout,
        ReleaseReason::Status5xx,
        ReleaseReason::Status4xx,
        ReleaseReason::ClientGone,
        ReleaseReason::Admin,
        ReleaseReason::QueueFull,
        ReleaseReason::LeaseExpired,
        ReleaseReason::Reconcile,
        ReleaseReason::Interrupted,
    ];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReleaseReason::ConnectError => "connect_error",
            ReleaseReason::Timeout => "timeout",
            ReleaseReason::Status5xx => "5xx",
            ReleaseReason::Status4xx => "4xx",
            ReleaseReason::ClientGone => "client_gone",
            ReleaseReason::Admin => "admin",
            ReleaseReason::QueueFull => "queue_full",
            ReleaseReason::LeaseExpired => "lease_expired",
            ReleaseReason::Reconcile => "reconcile",
            ReleaseReason::Interrupted => "interrupted",
        }
    }
}

/// A backend answer kept for replay to duplicates and ticket polls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Content-Type, if any.
    pub content_type: Option<String>,
    /// The body (bounded by the caller).
    pub body: Bytes,
}

/// A store operation name (`op` label of store metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Reservation.
    Reserve,
    /// Commit.
    Commit,
    /// Release.
    Release,
    /// Restock / set available.
    SetAvailable,
    /// Reads (stock view, ticket, availability).
    Read,
}

impl StoreOp {
    /// Every op, for pre-registering metric series.
    pub const ALL: [StoreOp; 5] = [
        StoreOp::Reserve,
        StoreOp::Commit,
        StoreOp::Release,
        StoreOp::SetAvailable,
        StoreOp::Read,
    ];

    /// Label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            StoreOp::Reserve => "reserve",
            StoreOp::Commit => "commit",
            StoreOp::Release => "release",
            StoreOp::SetAvailable => "set_available",
            StoreOp::Read => "read",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_ids_are_32_lowercase_hex_and_round_trip() {
        let t = TicketId::random();
        let s = t.to_string();
        assert_eq!(s.len(), 32);
        assert!(s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(TicketId::parse(&s), Some(t));
        assert_eq!(TicketId(1).to_string(), "00000000000000000000000000000001");
        // The hand-written hex is what the formatter wrote before it.
        for v in [0, 1, 0xabc, u128::MAX, u128::MAX / 3, t.0] {
            assert_eq!(TicketId(v).hex().as_str(), format!("{v:032x}"));
        }
        for bad in [
            "",
            "abc",
            &s.to_uppercase(),
            &format!("{s}0"),
            "g0000000000000000000000000000000",
        ] {
            if bad != s {
                assert_eq!(TicketId::parse(bad), None, "{bad}");
            }
        }
    }

    #[test]
    fn valid_id_bounds() {
        assert!(valid_id("a"));
        assert!(valid_id("Az09._:-"));
        assert!(valid_id(&"x".repeat(128)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(129)));
        for bad in [
            "a b", "a/b", "a%b", "a+b", "é", "a\0", "a\n", "<script>", "a,b",
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
