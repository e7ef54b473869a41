//! Identifying the process behind a `Filling` claim, and telling whether it
//! is still alive, robustly against pid reuse.
//!
//! A claim is taken over only when its owner is *proven* dead: its
//! `/proc/PID/stat` shows a zombie or another process's start time, or the
//! pid does not exist at all (`kill(pid, 0)` fails with `ESRCH`). Any
//! failure to find out (no descriptor left, `/proc` unreadable or not
//! mounted) counts as alive: the waiter keeps waiting, up to its deadline,
//! and never fills a page a live process is filling.

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
/// from a signal handler). `Ok(None)`: the file does not exist; `Err`: it
/// could not be read (e.g. `EMFILE`), which proves nothing.
fn proc_stat(pid: u32) -> Result<Option<ProcStat>, nix::errno::Errno> {
    use nix::errno::Errno;
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
    let fd = match open(
        &path[..len],
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    // The command name is at most 64 bytes, so field 22 is well inside.
    let mut buf = [0u8; 512];
    let n = match nix::unistd::read(&fd, &mut buf) {
        Ok(n) => n,
        // The process exited between the open and the read.
        Err(Errno::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    parse_stat(&buf[..n]).map(Some).ok_or(Errno::EINVAL)
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

#[cfg(test)]
fn start_time(pid: u32) -> Option<u64> {
    proc_stat(pid).ok().flatten().map(|s| s.start_time)
}

/// What is known about a claim's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    /// It runs (or could not be checked: treated as running).
    Alive,
    /// It is gone, or its pid now belongs to another process.
    Dead,
}

impl Owner {
    /// This process as a claim owner. Fails if its start time cannot be
    /// read (a token of 0 would make every other process think it dead).
    pub fn current() -> Result<Owner, nix::errno::Errno> {
        let pid = std::process::id();
        let stat = proc_stat(pid)?.ok_or(nix::errno::Errno::ENOENT)?;
        Ok(Owner::new(pid, stat.start_time as u32))
    }

    /// Whether the process that made this claim still runs; `Dead` only
    /// when proven (see the module docs). Does not allocate.
    pub fn liveness(self) -> Liveness {
        match proc_stat(self.pid) {
            Ok(Some(s)) if s.state == b'Z' || s.state == b'X' => Liveness::Dead,
            Ok(Some(s)) if Owner::new(self.pid, s.start_time as u32).token != self.token => {
                Liveness::Dead
            }
            Ok(Some(_)) => Liveness::Alive,
            // No /proc entry, or no way to read it: only a pid that does
            // not exist at all is proof.
            Ok(None) | Err(_) => {
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), None) {
                    Err(nix::errno::Errno::ESRCH) => Liveness::Dead,
                    _ => Liveness::Alive,
                }
            }
        }
    }

    /// `liveness() == Alive`.
    pub fn is_alive(self) -> bool {
        self.liveness() == Liveness::Alive
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Owner::current().unwrap();
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
        while proc_stat(child.id())
            .unwrap()
            .is_some_and(|s| s.state != b'Z')
        {
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
