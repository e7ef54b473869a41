//! Per-thread scheduling.
#![allow(unsafe_code)] // `setpriority`

use super::error::{SysError, SysResult};

/// Lowers the calling thread's priority to the lowest (`nice` 19), for
/// background work that must not compete with foreground threads.
pub(crate) fn lower_priority() -> SysResult<()> {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: plain syscall; on Linux PRIO_PROCESS with a thread id
    // applies to that thread only.
    let ret = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19) };
    if ret == -1 {
        return Err(SysError::last("setpriority").arg("tid", tid as u64));
    }
    Ok(())
}
