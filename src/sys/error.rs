//! The one error type of the syscall layer: which call failed, with which
//! arguments, and the errno.
//!
//! It never allocates, so the population engine can build one inside a
//! signal handler.

use std::fmt;

pub use nix::errno::Errno;

/// The most arguments a [`SysError`] records.
const MAX_ARGS: usize = 4;

/// A failed system call: the operation, the arguments that matter and the errno.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SysError {
    op: &'static str,
    args: [(&'static str, u64); MAX_ARGS],
    nargs: u8,
    errno: Errno,
}

/// Result of a syscall-layer operation.
pub(crate) type SysResult<T> = Result<T, SysError>;

impl SysError {
    /// A failure of `op` with `errno` and no arguments recorded yet.
    pub fn new(op: &'static str, errno: Errno) -> Self {
        SysError {
            op,
            args: [("", 0); MAX_ARGS],
            nargs: 0,
            errno,
        }
    }

    /// The failure of `op` described by the calling thread's `errno`.
    pub fn last(op: &'static str) -> Self {
        Self::new(op, Errno::last())
    }

    /// Records an argument; arguments past the fourth are dropped.
    #[must_use]
    pub fn arg(mut self, name: &'static str, value: u64) -> Self {
        if (self.nargs as usize) < MAX_ARGS {
            self.args[self.nargs as usize] = (name, value);
            self.nargs += 1;
        }
        self
    }

    /// The operation that failed, e.g. `"UFFDIO_CONTINUE"`.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The errno the kernel returned.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// The value of the argument called `name`, if it was recorded.
    pub fn arg_value(&self, name: &str) -> Option<u64> {
        self.args[..self.nargs as usize]
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }
}

impl fmt::Display for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An operation written as a call already (`open(/dev/userfaultfd)`)
        // gets no second pair of parentheses when it has no arguments.
        if self.nargs == 0 && self.op.ends_with(')') {
            return write!(f, "{} failed: {}", self.op, self.errno);
        }
        write!(f, "{}(", self.op)?;
        for (i, (name, value)) in self.args[..self.nargs as usize].iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            // Addresses, lengths and flags read best in hex; small counts in decimal.
            if *value >= 4096 {
                write!(f, "{name}={value:#x}")?;
            } else {
                write!(f, "{name}={value}")?;
            }
        }
        write!(f, ") failed: {}", self.errno)
    }
}

impl fmt::Debug for SysError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for SysError {}

/// Turns a libc-style return value (`-1` means failure) into a result.
pub(crate) fn check(ret: libc::c_int, op: &'static str) -> SysResult<libc::c_int> {
    if ret == -1 {
        Err(SysError::last(op))
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_names_operation_arguments_and_errno() {
        let e = SysError::new("UFFDIO_CONTINUE", Errno::EEXIST)
            .arg("start", 0x7f00_0000_0000)
            .arg("len", 4096);
        let text = e.to_string();
        assert!(text.starts_with("UFFDIO_CONTINUE(start=0x7f0000000000, len=0x1000)"));
        assert!(text.contains("EEXIST"), "{text}");
        assert_eq!(e.arg_value("len"), Some(4096));
        assert_eq!(e.arg_value("mode"), None);
    }

    #[test]
    fn extra_arguments_are_dropped_not_overflowed() {
        let e = SysError::new("op", Errno::EINVAL)
            .arg("a", 1)
            .arg("b", 2)
            .arg("c", 3)
            .arg("d", 4)
            .arg("e", 5);
        assert_eq!(e.arg_value("d"), Some(4));
        assert_eq!(e.arg_value("e"), None);
    }
}
