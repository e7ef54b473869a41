//! RESP2: parsing requests (arrays of bulk strings, and inline commands as
//! `redis-cli` and telnet send them) and writing replies. Limits and error
//! texts follow Redis.

/// Longest bulk string accepted (Redis' `proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 << 20;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 1024 * 1024;
/// Longest inline command.
const MAX_INLINE: usize = 64 << 10;

/// The outcome of parsing the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole command and the bytes it took.
    Command(Vec<Vec<u8>>, usize),
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

/// Parses one command from the front of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    let Some(&first) = buf.first() else {
        return Parsed::Incomplete;
    };
    if first != b'*' {
        return parse_inline(buf);
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
        return Parsed::Command(Vec::new(), at);
    }
    let mut args = Vec::with_capacity(count.min(1024) as usize);
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
        args.push(body[..len].to_vec());
        at += taken + len + 2;
    }
    Parsed::Command(args, at)
}

fn parse_inline(buf: &[u8]) -> Parsed {
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > MAX_INLINE {
            Parsed::Error("Protocol error: too big inline request".into())
        } else {
            Parsed::Incomplete
        };
    };
    let text = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let args = text
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Parsed::Command(args, end + 1)
}

/// Appends replies to an output buffer.
pub struct Reply<'a>(pub &'a mut Vec<u8>);

impl Reply<'_> {
    /// `+OK`-style status.
    pub fn simple(&mut self, s: &str) {
        self.0.extend_from_slice(format!("+{s}\r\n").as_bytes());
    }

    /// `-ERR ...`-style error (the text includes its prefix word).
    pub fn error(&mut self, s: &str) {
        self.0.extend_from_slice(format!("-{s}\r\n").as_bytes());
    }

    /// `:n`.
    pub fn int(&mut self, n: i64) {
        self.0.extend_from_slice(format!(":{n}\r\n").as_bytes());
    }

    /// `$len` + bytes.
    pub fn bulk(&mut self, b: &[u8]) {
        self.0
            .extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
        self.0.extend_from_slice(b);
        self.0.extend_from_slice(b"\r\n");
    }

    /// `$-1`.
    pub fn null(&mut self) {
        self.0.extend_from_slice(b"$-1\r\n");
    }

    /// `*n`; the caller writes n elements.
    pub fn array(&mut self, n: usize) {
        self.0.extend_from_slice(format!("*{n}\r\n").as_bytes());
    }
}
