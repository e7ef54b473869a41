//! RESP2: parsing requests (arrays of bulk strings, and inline commands as
//! `redis-cli` and telnet send them) and writing replies. Limits and error
//! texts follow Redis.

/// Longest bulk string accepted (Redis' `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 << 20;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command.
const MAX_INLINE: usize = 64 << 10;

use std::io::Write as _;
use std::ops::Range;

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command, the bytes it took; its arguments are in the ranges
    /// `parse` was given.
    Command(usize),
    /// More bytes are needed.
    Incomplete,
    /// The client broke the protocol: reply this error and close.
    Error(String),
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(digits: &[u8]) -> Option<i64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Parses one command from the front of `buf`; its arguments' byte ranges
/// in `buf` replace what `args` held (a vector reused from command to
/// command: parsing allocates nothing once it is large enough).
pub fn parse(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    args.clear();
    let Some(&first) = buf.first() else {
        return Parsed::Incomplete;
    };
    if first != b'*' {
        return parse_inline(buf, args);
    }
    let Some((head, mut at)) = line(buf) else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big mbulk count string".into())
        } else {
            Parsed::Incomplete
        };
    };
    let count = match number(&head[1..]) {
        Some(n) if n <= MAX_ARGS as i64 => n,
        _ => return Parsed::Error("Protocol error: invalid multibulk length".into()),
    };
    if count <= 0 {
        return Parsed::Command(at);
    }
    for _ in 0..count {
        let rest = &buf[at..];
        let Some(&kind) = rest.first() else {
            return Parsed::Incomplete;
        };
        if kind != b'$' {
            return Parsed::Error(format!(
                "Protocol error: expected '$', got '{}'",
                char::from(kind)
            ));
        }
        let Some((head, taken)) = line(rest) else {
            return Parsed::Incomplete;
        };
        let len = match number(&head[1..]) {
            Some(n) if (0..=MAX_BULK as i64).contains(&n) => n as usize,
            _ => return Parsed::Error("Protocol error: invalid bulk length".into()),
        };
        let body = &rest[taken..];
        if body.len() < len + 2 {
            return Parsed::Incomplete;
        }
        if &body[len..len + 2] != b"\r\n" {
            return Parsed::Error("Protocol error: bulk string not terminated by CRLF".into());
        }
        let start = at + taken;
        args.push(start..start + len);
        at += taken + len + 2;
    }
    Parsed::Command(at)
}

fn parse_inline(buf: &[u8], args: &mut Vec<Range<usize>>) -> Parsed {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request".into())
        } else {
            Parsed::Incomplete
        };
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && !text[i].is_ascii_whitespace() {
            i += 1;
        }
        args.push(start..i);
    }
    Parsed::Command(end + 1)
}

/// The arguments of a parsed command, copied (tests and the fuzzer).
#[allow(dead_code)] // the server borrows them instead
pub fn owned(buf: &[u8], args: &[Range<usize>]) -> Vec<Vec<u8>> {
    args.iter().map(|r| buf[r.clone()].to_vec()).collect()
}

/// Appends replies to an output buffer.
pub struct Reply<'a>(pub &'a mut Vec<u8>);

impl Reply<'_> {
    // Replies are written straight into the buffer (`write!` into a
    // `Vec<u8>` formats without allocating).

    /// `+OK`-style status.
    pub fn simple(&mut self, s: &str) {
        self.line(b'+', s);
    }

    /// `-ERR ...`-style error (the text includes its prefix word).
    pub fn error(&mut self, s: &str) {
        self.line(b'-', s);
    }

    fn line(&mut self, kind: u8, s: &str) {
        self.0.push(kind);
        self.0.extend_from_slice(s.as_bytes());
        self.0.extend_from_slice(b"\r\n");
    }

    /// `:n`.
    pub fn int(&mut self, n: i64) {
        let _ = write!(self.0, ":{n}\r\n");
    }

    /// `$len` + bytes.
    pub fn bulk(&mut self, b: &[u8]) {
        self.bulk_header(b.len());
        self.0.extend_from_slice(b);
        self.0.extend_from_slice(b"\r\n");
    }

    /// `$len`, for a caller that appends the `len` bytes and `\r\n`.
    pub fn bulk_header(&mut self, len: usize) {
        let _ = write!(self.0, "${len}\r\n");
    }

    /// `$-1`.
    pub fn null(&mut self) {
        self.0.extend_from_slice(b"$-1\r\n");
    }

    /// `*n`; the caller writes n elements.
    pub fn array(&mut self, n: usize) {
        let _ = write!(self.0, "*{n}\r\n");
    }
}
