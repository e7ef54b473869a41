//! Identifying the process behind a `Filling` claim, and telling whether it
//! is still alive, robustly against pid reuse.

use super::state::Owner;

/// What `/proc/PID/stat` says about a process.
struct ProcStat {
    /// Field 3: `Z` (zombie) and `X` (dead) mean the process is gone even
    /// though its entry is still there.
    state: u8,
    /// Field 22: start time in clock ticks since boot.
    start_time: u64,
}

/// Reads `/proc/PID/stat` without allocating (the SIGBUS driver calls this
/// from a signal handler); `None` if there is no such process.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;

    let mut path = [0u8; 32];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        path[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    push(b"/proc/");
    let mut digits = [0u8; 10];
    let mut n = pid;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(&digits[at..]);
    push(b"/stat");
    let fd = open(
        &path[..len],
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    // The command name is at most 64 bytes, so field 22 is well inside.
    let mut buf = [0u8; 512];
    let n = nix::unistd::read(&fd, &mut buf).ok()?;
    parse_stat(&buf[..n])
}

/// Parses the fields after the command name, which may itself contain
/// spaces and parentheses: everything after its last `)` is plain.
fn parse_stat(stat: &[u8]) -> Option<ProcStat> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let mut fields = stat[close + 1..]
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    // Field 3 was the state; field 22 is 19 further on.
    let start = fields.nth(18)?;
    let mut start_time = 0u64;
    for &d in start {
        if !d.is_ascii_digit() {
            return None;
        }
        start_time = start_time
            .checked_mul(10)?
            .checked_add(u64::from(d - b'0'))?;
    }
    Some(ProcStat { state, start_time })
}

fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|s| s.start_time)
}

impl Owner {
    /// This process as a claim owner.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner::new(pid, start_time(pid).unwrap_or(0) as u32)
    }

    /// Whether the process that made this claim still runs. A process that
    /// reuses the pid has a different start time, so it does not count; a
    /// zombie (killed, not yet reaped) is dead. Does not allocate.
    pub fn is_alive(self) -> bool {
        match proc_stat(self.pid) {
            Some(s) if s.state != b'Z' && s.state != b'X' => {
                Owner::new(self.pid, s.start_time as u32).token == self.token
            }
            _ => false,
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Owner::current();
        assert!(me.is_alive());
        assert!(!Owner::new(me.pid, me.token ^ 1).is_alive());
    }

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let line = b"42 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 777 19 20\n";
        let s = parse_stat(line).unwrap();
        assert_eq!((s.state, s.start_time), (b'S', 777));
        assert!(parse_stat(b"42 (x) S 1 2").is_none());
    }

    #[test]
    fn a_killed_unreaped_child_is_dead() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let owner = Owner::new(child.id(), start_time(child.id()).unwrap() as u32);
        assert!(owner.is_alive());
        child.kill().unwrap();
        // A zombie until reaped: wait for the state to show it.
        while proc_stat(child.id()).is_some_and(|s| s.state != b'Z') {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!owner.is_alive());
        child.wait().unwrap();
    }

    #[test]
    fn a_reaped_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let owner = Owner::new(child.id(), start_time(child.id()).unwrap_or(0) as u32);
        child.wait().unwrap();
        assert!(!owner.is_alive());
    }
}
