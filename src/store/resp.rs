//! RESP2, the Redis wire format, for the two transactions every winner
//! makes (reserve and commit): a MULTI/EXEC written straight into one
//! buffer, and a reply reader that yields `redis::Value`s, the type the
//! rest of the store reads.
//!
//! Hand-written, not redis-rs's codec: redis-rs builds a `Cmd` per command
//! and packs it again, and its combine-based reader cost about 21k
//! instructions per winner of the 187k a winner costs in all (callgrind,
//! issue 10). The subset a transaction needs (arrays of bulk strings out;
//! simple strings, errors, integers, bulk strings and arrays back) is
//! small, and the reader is held to redis-rs's own reader by a property
//! test. Error replies, which only a broken or late step meets, are
//! handed to redis-rs's reader so that they carry its error kinds.

use redis::Value;

/// How deep arrays may nest in a reply: a transaction's replies nest two
/// levels; deeper is a broken stream, not a reply.
const MAX_DEPTH: usize = 8;

/// Longest bulk string or array a reply may declare (Redis's own 512 MiB
/// limit); more is a broken stream.
const MAX_LEN: i64 = 512 * 1024 * 1024;

/// One command argument, written as a RESP bulk string.
pub trait Arg {
    /// Appends `$<len>\r\n<bytes>\r\n` to `out`.
    fn put(&self, out: &mut Vec<u8>);
}

/// Appends one bulk string.
pub fn put_bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    put_len(out, b'$', bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends one command, outside any transaction: its name and arguments.
pub fn put_command(out: &mut Vec<u8>, name: &str, args: &[&dyn Arg]) {
    put_len(out, b'*', args.len() + 1);
    put_bulk(out, name.as_bytes());
    for a in args {
        a.put(out);
    }
}

/// Appends one bulk string made of `parts`, joined (a key in parts).
pub fn put_bulk_parts(out: &mut Vec<u8>, parts: &[&str]) {
    put_len(out, b'$', parts.iter().map(|p| p.len()).sum());
    for p in parts {
        out.extend_from_slice(p.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one bulk string made of byte `chunks`, joined.
pub fn put_bulk_chunks(out: &mut Vec<u8>, chunks: &[&[u8]]) {
    put_len(out, b'$', chunks.iter().map(|c| c.len()).sum());
    for c in chunks {
        out.extend_from_slice(c);
    }
    out.extend_from_slice(b"\r\n");
}

fn put_len(out: &mut Vec<u8>, tag: u8, n: usize) {
    // Most counts and key lengths have one or two digits: one copy.
    if n < 10 {
        out.extend_from_slice(&[tag, b'0' + n as u8, b'\r', b'\n']);
    } else if n < 100 {
        out.extend_from_slice(&[
            tag,
            b'0' + (n / 10) as u8,
            b'0' + (n % 10) as u8,
            b'\r',
            b'\n',
        ]);
    } else {
        out.push(tag);
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

impl Arg for str {
    fn put(&self, out: &mut Vec<u8>) {
        put_bulk(out, self.as_bytes());
    }
}

impl Arg for [u8] {
    fn put(&self, out: &mut Vec<u8>) {
        put_bulk(out, self);
    }
}

impl Arg for String {
    fn put(&self, out: &mut Vec<u8>) {
        put_bulk(out, self.as_bytes());
    }
}

impl<T: Arg + ?Sized> Arg for &T {
    fn put(&self, out: &mut Vec<u8>) {
        (**self).put(out);
    }
}

macro_rules! int_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn put(&self, out: &mut Vec<u8>) {
                put_bulk(out, itoa::Buffer::new().format(*self).as_bytes());
            }
        }
    )*};
}
int_arg!(u16, u32, u64, i64);

/// A MULTI/EXEC transaction, or a plain pipeline, encoded as it is
/// built.
pub struct Transaction {
    buf: Vec<u8>,
    commands: usize,
    multi: bool,
}

impl Transaction {
    /// An empty transaction with room for `bytes` of commands.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 32);
        buf.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
        Self {
            buf,
            commands: 0,
            multi: true,
        }
    }

    /// An empty pipeline (no MULTI/EXEC) with room for `bytes` of
    /// commands: for steps each of which is atomic on its own, where
    /// Redis then need not queue them.
    pub fn pipeline(bytes: usize) -> Self {
        Self {
            buf: Vec::with_capacity(bytes),
            commands: 0,
            multi: false,
        }
    }

    /// Whether this is a MULTI/EXEC transaction.
    pub fn is_multi(&self) -> bool {
        self.multi
    }

    /// Adds one command: its name and arguments.
    pub fn cmd(&mut self, name: &str, args: &[&dyn Arg]) -> &mut Self {
        put_command(&mut self.buf, name, args);
        self.commands += 1;
        self
    }

    /// Commands added so far (MULTI and EXEC not counted).
    pub fn commands(&self) -> usize {
        self.commands
    }

    /// The bytes to send, EXEC included, and the number of replies they
    /// get: MULTI's, one per command (`QUEUED`) and EXEC's; a pipeline's,
    /// one per command.
    pub fn finish(mut self) -> (Vec<u8>, usize) {
        if !self.multi {
            return (self.buf, self.commands);
        }
        self.buf.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
        (self.buf, self.commands + 2)
    }
}

/// A reply stream that is not RESP2: the connection cannot be trusted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("redis protocol error: {0}")]
pub struct ProtocolError(pub &'static str);

/// Reads one whole reply from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the reply and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut at = 0;
    Ok(value(buf, &mut at, 0)?.map(|v| (v, at)))
}

/// The line at `*at` without its CRLF, moving `*at` past it.
fn line<'a>(buf: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, ProtocolError> {
    let rest = &buf[*at..];
    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
        return Ok(None);
    };
    if end == 0 || rest[end - 1] != b'\r' {
        return Err(ProtocolError("a line not ended by CRLF"));
    }
    *at += end + 1;
    Ok(Some(&rest[..end - 1]))
}

/// A decimal integer, as Redis writes them (an optional `-`, then
/// digits); by hand, without a UTF-8 check and `str::parse` per reply.
fn int(text: &[u8]) -> Result<i64, ProtocolError> {
    const BAD: ProtocolError = ProtocolError("a malformed integer");
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return Err(BAD);
    }
    // Accumulated negative: i64::MIN has no positive counterpart.
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(BAD);
        }
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_sub(i64::from(d - b'0')))
            .ok_or(BAD)?;
    }
    if negative {
        Ok(n)
    } else {
        n.checked_neg().ok_or(BAD)
    }
}

/// The length of the simple-string reply (`+...`) at the start of `buf`
/// when it is whole, `Ok(None)` when it is not one or not whole yet: a
/// transaction's `OK` and `QUEUED`s are only looked at when they are
/// errors, so they are stepped over without being built.
pub fn simple_len(buf: &[u8]) -> Result<Option<usize>, ProtocolError> {
    if buf.first() != Some(&b'+') {
        return Ok(None);
    }
    let mut at = 1;
    Ok(line(buf, &mut at)?.map(|_| at))
}

/// A declared length: -1 (nil) up to `MAX_LEN`.
fn len(text: &[u8]) -> Result<i64, ProtocolError> {
    match int(text)? {
        n @ -1..=MAX_LEN => Ok(n),
        _ => Err(ProtocolError("a length out of range")),
    }
}

fn value(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Value>, ProtocolError> {
    let start = *at;
    let Some(&tag) = buf.get(start) else {
        return Ok(None);
    };
    *at += 1;
    let Some(text) = line(buf, at)? else {
        return Ok(None);
    };
    Ok(Some(match tag {
        b'+' if text == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(
            String::from_utf8(text.to_vec()).map_err(|_| ProtocolError("a status not UTF-8"))?,
        ),
        // Rare (a late commit, a broken step): redis-rs's reader gives the
        // error its kind and code.
        b'-' => redis::parse_redis_value(&buf[start..*at])
            .map_err(|_| ProtocolError("an unreadable error reply"))?,
        b':' => Value::Int(int(text)?),
        b'$' => {
            let n = len(text)?;
            if n < 0 {
                return Ok(Some(Value::Nil));
            }
            let n = n as usize;
            let Some(body) = buf.get(*at..*at + n + 2) else {
                return Ok(None);
            };
            if &body[n..] != b"\r\n" {
                return Err(ProtocolError("a bulk string not ended by CRLF"));
            }
            *at += n + 2;
            Value::BulkString(body[..n].to_vec())
        }
        b'*' => {
            let n = len(text)?;
            if n < 0 {
                return Ok(Some(Value::Nil));
            }
            if depth >= MAX_DEPTH {
                return Err(ProtocolError("arrays nested too deep"));
            }
            // Each element takes at least 3 bytes: never reserve more
            // than the buffer could hold.
            let mut items = Vec::with_capacity((n as usize).min(buf.len() / 3));
            for _ in 0..n {
                match value(buf, at, depth + 1)? {
                    Some(v) => items.push(v),
                    None => return Ok(None),
                }
            }
            Value::Array(items)
        }
        _ => return Err(ProtocolError("an unknown reply type")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(bytes: &[u8]) -> Value {
        let (v, used) = parse(bytes).expect("valid").expect("complete");
        assert_eq!(used, bytes.len());
        v
    }

    #[test]
    fn a_transaction_is_multi_its_commands_and_exec() {
        let mut t = Transaction::with_capacity(64);
        t.cmd("SET", &[&"k", &"v", &"PX", &250u64]);
        let bytes: &[u8] = b"a\r\nb";
        t.cmd("EXISTS", &[&bytes]);
        assert_eq!(t.commands(), 2);
        let (bytes, replies) = t.finish();
        assert_eq!(replies, 4);
        assert_eq!(
            String::from_utf8(bytes).expect("ascii"),
            "*1\r\n$5\r\nMULTI\r\n\
             *5\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\nPX\r\n$3\r\n250\r\n\
             *2\r\n$6\r\nEXISTS\r\n$4\r\na\r\nb\r\n\
             *1\r\n$4\r\nEXEC\r\n"
        );
    }

    #[test]
    fn reads_every_reply_a_transaction_gets() {
        assert_eq!(one(b"+OK\r\n"), Value::Okay);
        assert_eq!(one(b"+QUEUED\r\n"), Value::SimpleString("QUEUED".into()));
        assert_eq!(one(b":-12\r\n"), Value::Int(-12));
        assert_eq!(one(b"$-1\r\n"), Value::Nil);
        assert_eq!(one(b"*-1\r\n"), Value::Nil);
        assert_eq!(one(b"$0\r\n\r\n"), Value::BulkString(vec![]));
        assert_eq!(
            one(b"*3\r\n:1\r\n$2\r\nab\r\n*1\r\n$-1\r\n"),
            Value::Array(vec![
                Value::Int(1),
                Value::BulkString(b"ab".to_vec()),
                Value::Array(vec![Value::Nil]),
            ])
        );
        match one(b"-ERR no such key\r\n") {
            Value::ServerError(e) => assert_eq!(e.code(), "ERR"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_incomplete_reply_waits_and_the_next_one_is_left_alone() {
        let whole = b"*2\r\n$5\r\nhello\r\n:7\r\n+OK\r\n";
        let first = 4 + 11 + 4;
        for cut in 0..first {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        let (v, used) = parse(whole).expect("valid").expect("complete");
        assert_eq!(used, first);
        assert_eq!(
            v,
            Value::Array(vec![Value::BulkString(b"hello".to_vec()), Value::Int(7)])
        );
        assert_eq!(parse(&whole[used..]), Ok(Some((Value::Okay, 5))));
    }

    #[test]
    fn integers_read_as_str_parse_reads_them() {
        for text in [
            "0",
            "-0",
            "7",
            "-12",
            "9223372036854775807",
            "-9223372036854775808",
        ] {
            assert_eq!(
                int(text.as_bytes()),
                Ok(text.parse::<i64>().expect("i64")),
                "{text}"
            );
        }
        for bad in [
            "",
            "-",
            "+1",
            "1 ",
            "9223372036854775808",
            "-9223372036854775809",
            "1a",
        ] {
            assert!(int(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_status_is_stepped_over_only_when_whole() {
        assert_eq!(simple_len(b"+QUEUED\r\n:1\r\n"), Ok(Some(9)));
        assert_eq!(simple_len(b"+QUEU"), Ok(None));
        assert_eq!(simple_len(b"-ERR x\r\n"), Ok(None));
        assert_eq!(simple_len(b""), Ok(None));
        assert!(simple_len(b"+OK\n").is_err());
    }

    #[test]
    fn a_broken_stream_is_an_error_not_a_guess() {
        for bad in [
            &b"?1\r\n"[..],
            b":1\n",
            b":x\r\n",
            b"$3\r\nabcd\r\n",
            b"$-2\r\n",
            b"*99999999999\r\n",
            b"$536870913\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
    }

    fn reply() -> impl Strategy<Value = Vec<u8>> {
        let leaf = prop_oneof![
            Just(b"+OK\r\n".to_vec()),
            "[a-zA-Z ]{0,12}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
            "[A-Z]{1,8} [a-z ]{0,20}".prop_map(|s| format!("-{s}\r\n").into_bytes()),
            any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
            Just(b"$-1\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| {
                let mut out = format!("${}\r\n", b.len()).into_bytes();
                out.extend_from_slice(&b);
                out.extend_from_slice(b"\r\n");
                out
            }),
        ];
        leaf.prop_recursive(3, 40, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(|items| {
                let mut out = format!("*{}\r\n", items.len()).into_bytes();
                for i in items {
                    out.extend_from_slice(&i);
                }
                out
            })
        })
    }

    proptest! {
        /// Whatever Redis may send a transaction, this reader and
        /// redis-rs's read the same value, and every cut of it is
        /// "incomplete", never a wrong value.
        #[test]
        fn reads_as_redis_rs_reads(bytes in reply(), cut in any::<prop::sample::Index>()) {
            let ours = parse(&bytes).expect("valid").expect("complete");
            prop_assert_eq!(ours.1, bytes.len());
            let theirs = redis::parse_redis_value(&bytes).expect("redis-rs reads it");
            prop_assert_eq!(format!("{:?}", ours.0), format!("{theirs:?}"));
            let cut = cut.index(bytes.len());
            prop_assert_eq!(parse(&bytes[..cut]), Ok(None));
        }
    }
}
