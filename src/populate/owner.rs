//! Identifying the process behind a `Filling` claim, and telling whether it
//! is still alive, robustly against pid reuse.

use super::state::Owner;

/// Start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` if there is no such process.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its last ')' are plain numbers.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3 (state); field 22 is the 20th from there.
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Owner {
    /// This process as a claim owner.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner::new(pid, start_time(pid).unwrap_or(0) as u32)
    }

    /// Whether the process that made this claim still runs. A process that
    /// reuses the pid has a different start time, so it does not count.
    pub fn is_alive(self) -> bool {
        match start_time(self.pid) {
            Some(t) => Owner::new(self.pid, t as u32).token == self.token,
            None => false,
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
    fn a_reaped_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let owner = Owner::new(child.id(), start_time(child.id()).unwrap_or(0) as u32);
        child.wait().unwrap();
        assert!(!owner.is_alive());
    }
}
