//! Telling a live process from a dead one whose pid may have been reused:
//! a pid with its start time, as the kernel reports them in
//! `/proc/PID/stat`.

use std::io;

/// A process: pid and start time (clock ticks after boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pid: u32,
    start: u32,
}

/// This process.
pub fn me() -> io::Result<ProcessId> {
    let pid = std::process::id();
    let (_, start) = stat(pid).ok_or_else(|| io::Error::other("reading /proc/self/stat failed"))?;
    Ok(ProcessId { pid, start })
}

/// State letter and start time (low 32 bits) of `pid`, if it exists.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: the
    // fields that matter come after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 of the line is the 20th after the name.
    let start: u64 = fields.nth(18)?.parse().ok()?;
    Some((state, start as u32))
}

impl ProcessId {
    /// The id as one word for a shared slot (never 0 for a real process).
    pub fn to_word(self) -> u64 {
        (u64::from(self.start) << 32) | u64::from(self.pid)
    }

    /// The id a slot word holds.
    pub fn from_word(word: u64) -> ProcessId {
        ProcessId {
            pid: word as u32,
            start: (word >> 32) as u32,
        }
    }

    /// Whether the process still runs: its pid exists, is not a zombie,
    /// and started when this id says (a reused pid started later).
    pub fn is_alive(self) -> bool {
        self.pid != 0
            && matches!(stat(self.pid), Some((state, start)) if state != 'Z' && state != 'X' && start == self.start)
    }
}
