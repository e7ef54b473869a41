//! Per-thread scheduling.
#![allow(unsafe_code)] // `setpriority`, `tgkill`, `membarrier`

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

/// Sends SIGBUS to thread `tid` of this process (`tgkill`): how a handler
/// thread makes a parked faulting thread fail its access where the kernel
/// has no poison markers. The thread takes it when it returns from the
/// fault.
pub(crate) fn sigbus_thread(tid: u32) -> SysResult<()> {
    let pid = std::process::id();
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            pid as libc::c_long,
            tid as libc::c_long,
            libc::SIGBUS as libc::c_long,
        )
    };
    if ret == -1 {
        return Err(SysError::last("tgkill(SIGBUS)").arg("tid", u64::from(tid)));
    }
    Ok(())
}

const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

/// Registers this process for [`membarrier_all_threads`] (Linux 4.14+).
pub(crate) fn membarrier_register() -> SysResult<()> {
    membarrier(
        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
        "membarrier(REGISTER_PRIVATE_EXPEDITED)",
    )
}

/// Makes every running thread of this process execute a full memory
/// barrier before this returns (`membarrier(PRIVATE_EXPEDITED)`): what lets
/// the other side of a Dekker-style handshake use a compiler fence only.
pub(crate) fn membarrier_all_threads() -> SysResult<()> {
    membarrier(
        MEMBARRIER_CMD_PRIVATE_EXPEDITED,
        "membarrier(PRIVATE_EXPEDITED)",
    )
}

fn membarrier(cmd: libc::c_long, op: &'static str) -> SysResult<()> {
    // SAFETY: plain syscall with integer arguments.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_long,
            0 as libc::c_long,
        )
    };
    if ret == -1 {
        return Err(SysError::last(op));
    }
    Ok(())
}
